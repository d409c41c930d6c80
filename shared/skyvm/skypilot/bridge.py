"""The one narrow interface to SkyPilot: which bridge a process gets. Nothing else in skyvm imports ``sky``.

A bridge answers the calls of ``interface.SkyBridge`` (launch, exec, job_status, tail_logs,
read_log, cancel, down, autostop, status, jobs_launch (on a pool too), jobs_status, jobs_cancel,
jobs_logs, pool_apply, pool_status, pool_down, optimize, check, api_stop, ssh_info), JSON values in and out,
so the same interface works in-process (``sdk.InProcessBridge``, when ``sky`` is importable) and
across a process boundary (``rpc_client.SubprocessBridge`` talking to ``rpc_server``, run as
``python -m skyvm.skypilot.bridge --serve`` in SkyPilot's own environment: SkyPilot cannot share an
environment with Airflow >= 3.1.3 or some Prefect releases).

The rooms: ``interface`` (the calls and their bounds), ``sdk`` (the SDK adapter, calling ``sky.*``),
``optimizer`` (planning's patch of ``sky.check``), ``logs`` (a job's log read from an offset),
``rpc_client`` and ``rpc_server`` (the JSON-lines transport), ``server_guard`` (a credential set's
API server checked before each call). This module chooses among them (``get_bridge``) and keeps
the names other modules import from it.

May import: the standard library, ``skyvm.errors``, ``skyvm.home`` and ``skyvm.skypilot``'s rooms above.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

from skyvm.errors import InfrastructureError
from skyvm.skypilot.interface import BOUND_ENV, CALLS, FAILED_JOB_EXIT, LOGGING_CALLS, LogSink, SkyBridge, call_bound
from skyvm.skypilot.optimizer import PLANNING_CLOUDS, _clouds_assumed_enabled, _clouds_named
from skyvm.skypilot.rpc_client import SubprocessBridge
from skyvm.skypilot.rpc_server import main, serve
from skyvm.skypilot.sdk import InProcessBridge, placement
from skyvm.skypilot.server_guard import LocalServerGuard, local_server_guard

__all__ = [
    "BOUND_ENV", "CALLS", "FAILED_JOB_EXIT", "LOGGING_CALLS", "PLANNING_CLOUDS", "InProcessBridge", "LocalServerGuard", "LogSink",
    "SkyBridge", "SubprocessBridge", "_clouds_assumed_enabled", "_clouds_named", "call_bound", "get_bridge", "local_server_guard",
    "main", "placement", "serve", "sky_importable", "skypilot_python", "use_bridge",
]


def skypilot_python() -> Optional[str]:
    """The Python of skyvm's own SkyPilot environment (made by `skyvm skypilot install`), if there is one."""
    from skyvm.home import Home

    candidate = Path(os.environ.get("SKYVM_SKYPILOT_PYTHON") or Home.current().skypilot_venv / "bin" / "python")
    return str(candidate) if candidate.exists() else None


def sky_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("sky") is not None


def _merged(env: dict) -> dict:
    """This process's environment with a credential set's on top; a None value removes a variable."""
    return {k: v for k, v in {**os.environ, **env}.items() if v is not None}


# The bridges ``use_bridge`` put in place, innermost last: what get_bridge answers while any is.
_chosen: list[SkyBridge] = []


@contextlib.contextmanager
def use_bridge(bridge: SkyBridge) -> Iterator[SkyBridge]:
    """Every ``get_bridge()`` in this block answers ``bridge`` (e.g. a test's stand-in, or one bridge
    shared by ``skyvm status`` and ``gc``); the choice before it is back when the block ends."""
    _chosen.append(bridge)
    try:
        yield bridge
    finally:
        _chosen.remove(bridge)


def get_bridge(env: Optional[dict] = None) -> SkyBridge:
    """In-process when ``sky`` imports here, else SkyPilot's own environment through a subprocess
    (or the bridge ``use_bridge`` put in place).

    ``env`` (a connector set's credentials and server state) always means a subprocess: SkyPilot
    reads credentials from its process's environment, which must not be the engine's own.
    """
    if _chosen:
        return _chosen[-1]
    try:
        if env is None:
            return InProcessBridge()
        if sky_importable() and not os.environ.get("SKYVM_SKYPILOT_PYTHON"):
            return SubprocessBridge(sys.executable, env=_merged(env))
        raise ImportError
    except ImportError:
        python = skypilot_python()
        if python is None:
            raise InfrastructureError(
                "backend 'skypilot' needs SkyPilot: `pip install 'skyvm[skypilot]'` here, or `skyvm skypilot install` "
                "to make its own environment (SkyPilot cannot share one with Airflow >= 3.1.3)"
            ) from None
        return SubprocessBridge(python, env=None if env is None else _merged(env))


if __name__ == "__main__":
    sys.exit(main())
