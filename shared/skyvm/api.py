"""The engine-neutral API the adapters use: submit a call or a command as a node, get a handle.

    import skyvm
    handle = skyvm.submit(train, data, node="train", options={"cpus": 2, "memory": 4})
    handle.result()      # the return value, or raises NodeFailed / InfrastructureError
    handle.logs()        # the last lines of the node's stdout and stderr (every line goes to on_log as it comes)
    handle.cancel()      # stop it; its cluster goes per `down`

A ``Run`` groups nodes (one flow run, one DAG run): clusters are shared by
signature within it, and ``Run.close()`` tears down its ``down: true``
clusters. ``skyvm.submit`` uses the context's default run, closed at exit.

One path for every node: submit -> prepare (``skyvm.prepare``: secrets, store
credentials, image, payload) -> the pool (``skyvm.pool``) -> the backend ->
the watcher (``skyvm.watcher``, through ``skyvm.context``) -> the result
(``skyvm.outcome``). One handle (``skyvm.handle.NodeHandle``) follows an
attempt from its ``NodeRef``, in the launching process or any other
(``NodeHandle.attach(handle.reference())``).

This module is the facade: it holds ``submit`` and ``teardown`` and re-exports
the names the adapters, tests and benches import from it. May import every
room above; none of them imports it.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Union

from skyvm.backends.base import JobState, JobStatus, NodeRef
from skyvm.context import Context, Knobs, current, reset
from skyvm.errors import InfrastructureError, NodeAborted, NodeCancelled, NodeFailed, NodeTimeout, PayloadError, SettingsError, SkyVMError
from skyvm.handle import NodeHandle
from skyvm.outcome import LogTail, Outcome, read_outcome
from skyvm.prepare import BACKEND_SETTING, backend_for, check_launchable, new_attempt_id, node_image, node_store, prepare, resolve_secret
from skyvm.run import Run
from skyvm.settings import NodeSettings, SkyVMConfig, as_config

__all__ = [
    "BACKEND_SETTING",
    "Context",
    "InfrastructureError",
    "JobState",
    "JobStatus",
    "Knobs",
    "LogTail",
    "NodeAborted",
    "NodeCancelled",
    "NodeFailed",
    "NodeHandle",
    "NodeRef",
    "NodeSettings",
    "NodeTimeout",
    "Outcome",
    "PayloadError",
    "Run",
    "SettingsError",
    "SkyVMConfig",
    "SkyVMError",
    "backend_for",
    "check_launchable",
    "current",
    "default_run",
    "new_attempt_id",
    "node_image",
    "node_store",
    "prepare",
    "read_outcome",
    "reset",
    "resolve_secret",
    "submit",
    "teardown",
]


def teardown(node: Union[NodeHandle, Run, None]) -> None:
    """One teardown for every path (success, failure, kill, a deferred wait's end): stop the node if
    it still runs, then release its cluster per ``down`` (a run: all its nodes). Safe to call twice."""
    if node is None:
        return
    if isinstance(node, Run):
        node.close(cancel=True)
    elif isinstance(node, NodeHandle):
        node.teardown()
    else:
        raise TypeError(f"cannot tear down {type(node).__name__}: a NodeHandle or a Run")


def default_run() -> Run:
    """The current context's default run (made when there is none, or it was closed; closed at exit)."""
    ctx = current()
    return ctx.default_run(lambda: Run(ctx=ctx))


def submit(
    fn: Callable,
    *args: Any,
    node: Optional[str] = None,
    settings: Union[None, str, os.PathLike, Mapping[str, Any], SkyVMConfig] = None,
    profile: Optional[str] = None,
    options: Optional[Mapping[str, Any]] = None,
    **kwargs: Any,
) -> NodeHandle:
    """Run ``fn(*args, **kwargs)`` as a node of the process's default run.

    ``settings`` is the shared settings file (a path, a dict shaped like it,
    or a SkyVMConfig); ``options`` are this call's settings, above the file's.
    """
    run = default_run()
    node = node or getattr(fn, "__name__", "node")
    config = run.config if settings is None else as_config(settings)
    resolved = config.resolve(node, profile=profile, code=options)
    return run.start_call(node, resolved, fn, args, kwargs)
