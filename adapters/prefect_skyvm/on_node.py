"""What runs on a node for ``SkyVMTaskRunner``: Prefect's own task engine (engine mode), or the task's
function body inside a Prefect logging context (body mode).

Engine mode is what Prefect's ``ProcessPoolTaskRunner`` does in its subprocesses, on another machine:
the flow's serialized context is hydrated, ``run_task_sync``/``run_task_async`` runs the task (states,
retries, logs, artifacts, events and nested submissions as in Prefect), the events and log workers are
flushed, and the final State is the node's return value.

What may not travel in the payload (the API URL, the API key: any setting Prefect keeps as a secret) was
taken out of the serialized settings by the launcher and reaches the node's environment as skyvm secrets;
``_restore_settings`` puts them back from there.

Imported on every node whose image has Prefect (the resident agent imports it ahead of the nodes, so a
warm node pays no import): Prefect's task engine at module level, nothing of the launcher's side (no
docker, no skyvm.api/run/pool). May import: the standard library, cloudpickle, Prefect (when installed) and skyvm.redact.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Optional

try:  # an image without Prefect still runs bodies (body mode)
    from prefect.context import hydrated_context
    from prefect.events.worker import EventsWorker
    from prefect.task_engine import run_task_async, run_task_sync
except ImportError:  # pragma: no cover - exercised by images without Prefect
    hydrated_context = None

# (path in the serialized settings, environment variable) pairs: the settings that travel as skyvm secrets.
SecretPaths = list[tuple[tuple[str, ...], str]]


def agent_preload() -> None:
    """In a cluster agent's pristine parent (``skyvm.agent``): the work ``hydrated_context`` would do in every
    node before its task runs, once: Prefect's logging configured, its run contexts' models rebuilt."""
    if hydrated_context is None:
        return
    from prefect._internal.result_records import ResultRecordMetadata
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.flows import Flow
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.tasks import Task

    ensure_logging_setup()
    types = dict(Flow=Flow, Task=Task, ResultRecordMetadata=ResultRecordMetadata)
    FlowRunContext.model_rebuild(_types_namespace=types)
    TaskRunContext.model_rebuild(_types_namespace=types)


def agent_child_env() -> None:
    """In a node the agent forked, once its environment is the node's: Prefect's global settings read again
    (the parent read them from its own environment at import: a flow node's PREFECT_API_URL was not there)."""
    if hydrated_context is None:
        return
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()


def run_task(*, env: dict[str, str], secret_paths: SecretPaths, context: dict[str, Any], **engine_kwargs: Any):
    """Run one task with Prefect's engine (``engine_kwargs`` are ``run_task_sync``'s); returns its final State.

    Its events (the task run's own states among them: the API records task runs from them) go from the
    node as they happen, through its events worker, so the UI shows the run while it runs."""
    os.environ.update(env)
    _quiet_console()
    _restore_settings(context, secret_paths)
    _settings_model(context)
    task = engine_kwargs["task"] = _scrubbing(engine_kwargs["task"])
    with hydrated_context(context):
        try:
            if task.isasync:
                import asyncio

                return asyncio.run(run_task_async(**engine_kwargs))
            return run_task_sync(**engine_kwargs)
        finally:
            # The node's process ends with the call: what the task logged and emitted must reach the API first
            # (a crash included: the engine has just proposed the Crashed state).
            _flush()


def _scrubbing(task):
    """The task with its function's exceptions redacted in place as they leave it: Prefect's engine, on this
    node, makes the failed (or crashed) state's message, the traceback it logs and the result it persists from
    the exception's text, and sends them to the API itself, where the launcher's redaction never sees them.
    Log records are scrubbed at creation already (the node registered its secrets with ``skyvm.redact``)."""
    from skyvm import redact

    fn = task.fn
    if not redact.known() or inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        return task  # a generator task's values leave it one by one: its exceptions are left as they are
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def scrubbed(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except BaseException as exc:
                _scrub_chain(exc)
                raise

    else:

        @functools.wraps(fn)
        def scrubbed(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except BaseException as exc:
                _scrub_chain(exc)
                raise

    task.fn = scrubbed
    return task


def _scrub_chain(exc: BaseException) -> None:
    from skyvm import redact

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:  # the cause and context Prefect's traceback shows too
        seen.add(id(exc))
        redact.scrub_exception(exc)
        exc = exc.__cause__ or exc.__context__


def run_body(fn, args: tuple, kwargs: dict, context_blob: Optional[bytes]):
    """Body mode: the task's function itself, inside the task run's Prefect context when Prefect is
    installed, so ``get_run_logger()`` works. Its records go to the node's output (never to the API, which
    this node may not reach), which the launcher streams into the task run's logs."""
    if hydrated_context is None or context_blob is None:
        return fn(*args, **kwargs)
    import cloudpickle
    from prefect.client.orchestration import SyncPrefectClient

    context = cloudpickle.loads(context_blob)
    # A client is part of a run context; this one is never used (no API from a body-mode node).
    with hydrated_context(context, client=SyncPrefectClient("http://skyvm-body-mode.invalid/api")):
        return fn(*args, **kwargs)


def _quiet_console() -> None:
    """Prefect's console lines off on the node: its engine sends them to the API itself, and the node's
    output (what the task prints) goes to the task run's logs through the launcher: once each."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in [logging.getLogger(), *(l for l in logging.Logger.manager.loggerDict.values() if isinstance(l, logging.Logger))]:
        for handler in [h for h in logger.handlers if isinstance(h, PrefectConsoleHandler)]:
            logger.removeHandler(handler)


def _settings_model(context: dict[str, Any]) -> None:
    """The flow's settings as a model, validated from their dict alone: ``hydrated_context`` would build them
    as ``Settings(**dict)``, which also reads every settings source (environment, profiles, .env, toml)
    again, a third of a second per node; the dict already holds every field."""
    settings_context = context.get("settings_context") or {}
    if isinstance(settings_context.get("settings"), dict):
        from prefect.settings import Settings

        settings_context["settings"] = Settings.model_validate(settings_context["settings"])


def _restore_settings(context: dict[str, Any], secret_paths: SecretPaths) -> None:
    settings = (context.get("settings_context") or {}).get("settings")
    if settings is None:
        return
    for path, name in secret_paths:
        if name in os.environ:
            place = settings
            for key in path[:-1]:
                place = place.setdefault(key, {})
            place[path[-1]] = os.environ[name]


def _flush() -> None:
    # Prefect's services (the events worker, the API log worker) share one table of instances: draining
    # through one drains them all. None running: nothing to send, and no client made for nothing.
    with EventsWorker._instance_lock:
        running = bool(EventsWorker._instances)
    if running:
        EventsWorker.drain_all(timeout=60)
