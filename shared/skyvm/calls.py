"""What travels to a node: a function call or a shell command, cloudpickled.

Made on the launcher's side (``Run.submit``, the adapters) and read by the node
runtime (``skyvm.node``). May import: cloudpickle, skyvm.errors.
"""

from __future__ import annotations

import io
import os
import sys
import sysconfig
import types
from typing import Any, Callable

import cloudpickle

from skyvm.errors import PayloadError

# Modules from these paths are in the image (site-packages, the stdlib): pickled by reference.
_INSTALLED_PATHS = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}


def ship_by_value(fn: Callable) -> None:
    """Make cloudpickle send the function's own module by value when the image cannot import it.

    Modules installed in site-packages (or the stdlib) are pickled by
    reference and must be in the image (``requirements``); the user's own
    modules (the flow file, the DAG file, a tests folder) travel with the call.
    """
    module_name = getattr(fn, "__module__", None)
    if not module_name or module_name == "__main__" or module_name.split(".")[0] in ("skyvm", "prefect_skyvm", "airflow_skyvm"):
        return
    module = sys.modules.get(module_name)
    origin = getattr(module, "__file__", None)
    if module is None or origin is None:
        return
    # Once per module and file: the answer is the same for every call of a map (realpath is a few stat()s),
    # and cloudpickle keeps what it registered by the module's name.
    key = (module_name, origin)
    if key in _SHIPPED:
        return
    _ship(module, origin)
    _SHIPPED.add(key)


_SHIPPED: set[tuple[str, str]] = set()


def _ship(module, origin: str) -> None:
    origin = os.path.realpath(origin)
    if any(origin.startswith(os.path.realpath(p) + os.sep) for p in _INSTALLED_PATHS):
        return
    try:
        cloudpickle.register_pickle_by_value(module)
    except ValueError:
        pass


class _ShippingPickler(cloudpickle.Pickler):
    """cloudpickle's pickler, shipping by value (``ship_by_value``) the module of every function it meets, not
    only the called one's: a flow that names a task of another of the user's modules, a callback in an
    argument. Each is registered before it is pickled, so it travels by value in this very payload."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.FunctionType:
            ship_by_value(obj)
        return super().reducer_override(obj)


def dumps(obj: Any) -> bytes:
    """``cloudpickle.dumps``, every user module a function in ``obj`` comes from shipped by value."""
    with io.BytesIO() as file:
        _ShippingPickler(file, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(obj)
        return file.getvalue()


def make_call_payload(fn, args=(), kwargs=None, *, node: str = "") -> bytes:
    ship_by_value(fn)
    call = {"kind": "call", "fn": fn, "args": tuple(args), "kwargs": dict(kwargs or {})}
    try:
        return dumps(call)
    except Exception as exc:
        raise PayloadError(_unpicklable(node, fn, call, exc)) from exc


def _unpicklable(node: str, fn, call: dict, exc: Exception) -> str:
    """Name the part of a call that cannot travel, since cloudpickle's own error names none.

    A lock, an open file, a client or a connection cannot be sent to another
    machine; the fix is to pass what makes it (a path, a URL) and make it on the node.
    """
    parts = [("the function", fn)] + [(f"argument {i}", a) for i, a in enumerate(call["args"])]
    parts += [(f"argument '{k}'", v) for k, v in call["kwargs"].items()]
    culprit = "the call"
    for label, value in parts:
        try:
            cloudpickle.dumps(value)
        except Exception:
            culprit = f"{label} ({type(value).__module__}.{type(value).__qualname__})"
            break
    where = f"node '{node}': " if node else ""
    return (
        f"{where}{culprit} of {getattr(fn, '__qualname__', fn)!r} cannot be sent to the node: {type(exc).__name__}: {exc}. "
        "Locks, open files, clients and connections cannot travel to another machine: "
        "pass what makes them (a path, a URL, settings) and create them inside the function."
    )


def make_command_payload(command: str) -> bytes:
    return cloudpickle.dumps({"kind": "command", "command": command})
