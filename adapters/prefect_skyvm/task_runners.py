"""``SkyVMTaskRunner``: every task of a Prefect flow runs in its own container on a VM.

Engine mode (where the node can reach the flow's Prefect API; ``engine_mode`` says the rule): Prefect's
own task engine runs on the node, as prefect-dask and prefect-ray run it on their workers, so
``get_run_logger()``, ``prefect.runtime``, artifacts, nested ``.submit()``, variables and events work
inside the task; the node's final State resolves the future. One node runs all attempts of a task
(retries are the engine's, on the node). The node's output goes to this process's stdout.

Body mode (``prefect_engine: false``, or a node that cannot reach the API): the Prefect task engine
stays in the flow process (states, retries, timeouts, caching and events are Prefect's own, and the
node needs no route to the API); only the task's function body runs on the node, one fresh remote run
per attempt, its output streamed into the task run's logs (``get_run_logger()`` too, when the image
has Prefect).

Either way the call goes through skyvm's core (``skyvm.Run``).

    from prefect import flow, task
    from prefect_skyvm import SkyVMTaskRunner, skyvm_options

    @flow(task_runner=SkyVMTaskRunner("skyvm.yaml"))
    def pipeline():
        with skyvm_options(cpus=4):
            heavy.submit()

Holds ``SkyVMTaskRunner`` and ``NodeCrashed``. May import: prefect, prefect_skyvm's context,
engine_mode and on_node, skyvm's public core (skyvm.api, calls, run_ids, waiting, errors, redact, settings).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import uuid
from contextvars import copy_context
from typing import Any, Iterable, Mapping, Optional, Union

from prefect.futures import PrefectConcurrentFuture, PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from prefect_skyvm import engine_mode, on_node, relay, run_summary
from prefect_skyvm.context import current_options, describe, profile_from_tags
from skyvm import progress, run_ids, waiting
from skyvm.calls import ship_by_value
from skyvm.api import NodeHandle, Run, check_launchable
from skyvm.errors import InfrastructureError, NodeAborted, NodeFailed, PayloadError, SkyVMError
from skyvm.redact import redact
from skyvm.settings import NodeSettings, SkyVMConfig, as_config

SettingsArg = Union[None, str, os.PathLike, Mapping[str, Any], SkyVMConfig]


class NodeCrashed(BaseException):
    """The node could not run (image, registry, container, VM), or its code raised a BaseException
    (``sys.exit``, ``KeyboardInterrupt``: ``NodeAborted``). A BaseException, so Prefect's task engine
    records the run as Crashed, not Failed, and does not spend the task's retries on it; the runner
    turns it into the future's Crashed state, so it never reaches the flow (as with prefect-dask)."""

    def __init__(self, error: SkyVMError):
        super().__init__(str(error))
        self.error = error


def _crashed_state(exc: BaseException):
    """The state a crashed attempt's future resolves to: futures must return states, not raise."""
    from prefect.states import Crashed

    error = exc.error if isinstance(exc, NodeCrashed) else exc
    return Crashed(message=f"skyvm node crashed: {error}", data=error if isinstance(error, Exception) else InfrastructureError(str(error)))


def _task_run_output(task_run_id, node: str) -> Any:
    """An engine-mode node's output (what its code printed; Prefect's own console lines are off on the
    node, its engine sends those to the API) into the task run's logs, as in body mode, and so on this
    process's console; the events and API log records it relays, to this process's workers (``relay``)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    flow_run = ctx.flow_run if ctx else None
    # The fields Prefect's own task run logger carries: its console format names the task run. The run's
    # name is chosen by the engine on the node; until it says, the task's name stands for it.
    extra = {
        "task_run_id": task_run_id,
        "flow_run_id": flow_run.id if flow_run else None,
        "task_run_name": node,
        "task_name": node,
        "flow_run_name": flow_run.name if flow_run else "<unknown>",
        "flow_name": ctx.flow.name if ctx and ctx.flow else "<unknown>",
        "send_to_api": True,
    }
    logger = logging.LoggerAdapter(logging.getLogger("prefect.task_runs"), extra)
    relayed = relay.Deliverer(node)

    def on_line(line: str) -> None:
        if not relayed(line):
            logger.info(redact(line))

    return on_line


def _outcome(handle: NodeHandle) -> Any:
    """The node's return value, or the exception Prefect should see."""
    try:
        return handle.result()
    except NodeAborted as exc:
        # sys.exit(3) in the task's body ended the node; it must not end the flow's process too.
        raise NodeCrashed(exc) from exc
    except NodeFailed as exc:
        original = getattr(exc, "remote_exception", None)
        if isinstance(original, BaseException):
            # The user's own exception type (retry_condition_fn sees it), with the remote traceback chained.
            raise original from exc
        raise
    except InfrastructureError as exc:
        raise NodeCrashed(exc) from exc


class SkyVMTaskRunner(ThreadPoolTaskRunner):
    """Runs each task's function body on a skyvm node, with per-task resources.

    Args:
        settings: the shared settings file (path), a dict shaped like it, or a
            SkyVMConfig; default ``$SKYVM_CONFIG`` / ``./skyvm.yaml`` / built-ins.
        profile: a profile of that file for every task (tags and
            ``skyvm_options(profile=...)`` override it per task).
        max_workers: threads waiting on nodes at once (default: unbounded, as
            nodes run elsewhere; ``max_clusters`` limits what runs per signature).
        **overrides: node settings for every task, above the file's (e.g. ``cpus=2``).

    Per-task settings, lowest first: the file's ``defaults``, the task's profile,
    ``nodes[task name]``, the runner's ``overrides``, then ``skyvm_options(...)``
    around ``.submit()`` / ``.map()``. A ``skyvm:profile=NAME`` tag picks the profile.
    """

    def __init__(self, settings: SettingsArg = None, profile: Optional[str] = None, max_workers: Optional[int] = None, **overrides: Any):
        super().__init__(max_workers=max_workers)
        self.settings = settings
        self.profile = profile
        self.overrides = overrides
        # Validate now: a bad file, profile or override fails when the flow is defined, not mid-run.
        self._config = as_config(settings)
        self._config.resolve("<any task>", profile=profile, code=overrides)
        self._run: Optional[Run] = None
        self._flow_run_id = None  # the flow run whose nodes these are (its summary artifact's)
        self._handles_lock = threading.Lock()
        self._node_cache: dict = {}  # what every node of a flow run gets alike (engine_mode's: its flow, its settings)

    # -- Prefect's TaskRunner protocol ----------------------------------------

    def duplicate(self) -> "SkyVMTaskRunner":
        return type(self)(settings=self.settings, profile=self.profile, max_workers=self._max_workers, **self.overrides)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SkyVMTaskRunner)
            and (self.settings, self.profile, self.overrides, self._max_workers) == (other.settings, other.profile, other.overrides, other._max_workers)
        )

    def __getstate__(self) -> dict[str, Any]:
        # A pickled runner carries its arguments only: no run, no threads, no locks.
        state = super().__getstate__()
        for key in ("_run", "_executor", "_handles_lock", "_config", "_cancel_events", "_node_cache"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._run = None
        self._flow_run_id = None
        self._executor = None
        self._cancel_events = {}
        self._handles_lock = threading.Lock()
        self._node_cache = {}
        self._config = as_config(self.settings)

    def __enter__(self) -> "SkyVMTaskRunner":
        super().__enter__()
        # Entering provisions nothing: the run starts with the first task, clusters with the first node that needs one.
        self._run = None
        self._flow_run_id = None
        return self

    def _current_run(self) -> Run:
        """The run of this flow run's task nodes. Made at the first submission: Prefect enters the task
        runner before the flow run's context exists, and the run id names the flow run (its clusters'
        run-id label, by which a worker finds them when the flow's own node was stopped)."""
        with self._handles_lock:
            if self._run is None:
                from prefect.context import FlowRunContext

                ctx = FlowRunContext.get()
                flow_run_id = ctx.flow_run.id if ctx and ctx.flow_run else uuid.uuid4()
                self._flow_run_id = ctx.flow_run.id if ctx and ctx.flow_run else None
                self._run = Run(self._config, run_id=task_nodes_run_id(flow_run_id))
            return self._run

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        # Nodes still running when the flow is left are cancelled, and their clusters released per `down`.
        run, self._run = self._run, None
        try:
            if run is not None:
                run.close(cancel=True, timeout=_close_bound(run, exc_value))
                run_summary.publish(run.summary(), self._flow_run_id)  # the flow run's nodes, where a Prefect user looks
        finally:
            super().__exit__(exc_type, exc_value, traceback)

    def submit(
        self,
        task,
        parameters: dict[str, Any],
        wait_for: Optional[Iterable[PrefectFuture[Any]]] = None,
        dependencies: Optional[dict[str, set]] = None,
    ) -> PrefectConcurrentFuture:
        if not self._started or self._executor is None:
            raise RuntimeError("Task runner is not started")
        self._current_run()
        from prefect._internal.uuid7 import uuid7
        from prefect.task_engine import run_task_async, run_task_sync

        # Settings are resolved here, in the submitting thread: a mistake raises from .submit() and nothing starts.
        settings = self._resolve(task)
        engine = engine_mode.use_engine(task.name, settings, _run_logger()) and engine_mode.flow_travels(self._node_cache, _run_logger())
        check_launchable(task.name, settings)
        task_run_id = uuid7()
        if engine:
            return self._submit_engine(task, settings, task_run_id, parameters, wait_for, dependencies)
        remote = self._remote_task(task, settings)
        cancel_event = threading.Event()
        self._cancel_events[task_run_id] = cancel_event
        kwargs = dict(
            task=remote,
            task_run_id=task_run_id,
            parameters=parameters,
            wait_for=wait_for,
            return_type="state",
            dependencies=dependencies,
            context=dict(cancel_event=cancel_event),
        )

        def run_to_state():
            # A crash must come back as a Crashed state: a Prefect future's wait() re-raises what its work raised.
            try:
                if remote.isasync:
                    return asyncio.run(run_task_async(**kwargs))
                return run_task_sync(**kwargs)
            except NodeCrashed as exc:
                return _crashed_state(exc)

        future = self._executor.submit(copy_context().run, run_to_state)
        return PrefectConcurrentFuture(task_run_id=task_run_id, wrapped_future=future)

    def _submit_engine(self, task, settings: NodeSettings, task_run_id, parameters, wait_for, dependencies) -> PrefectConcurrentFuture:
        """Engine mode: a node runs Prefect's task engine; its final State resolves the future."""
        run = self._run
        node_cache = self._node_cache

        def run_on_node():
            from prefect.states import Failed

            logger = _run_logger()
            try:
                # Upstream futures are waited for here, off the submitting thread, as ProcessPoolTaskRunner does.
                kwargs, secrets = engine_mode.engine_call(task, task_run_id, _plain(parameters), wait_for, dependencies, node_cache)
                node_settings = engine_mode.engine_settings(settings, secrets)
                logger.info("skyvm: running %s with Prefect's engine on a %s node (%s)", task.name, settings.backend, describe(settings))
                with progress.reporting_to(logger.info):  # a first build's progress, in the task run's log
                    handle = run.start_call(task.name, node_settings, on_node.run_task, (), kwargs, on_log=_task_run_output(task_run_id, task.name))
                # Nothing here raises into this thread (the task's timeout is the engine's, on the node; a cancel
                # stops the node, which ends the wait): a look a second, not ten (a map's waiting threads add up).
                waiting.wait(handle, logger=logger, poll_s=ENGINE_WAIT_POLL_S)
                return handle.result()  # the engine's final State: the task's own errors are in it
            except NodeAborted as exc:
                # Its code ended it (KeyboardInterrupt, SystemExit): the engine on the node said Crashed already.
                return _crashed_state(NodeCrashed(exc))
            except PayloadError as exc:  # an argument that cannot travel: the task's input is at fault
                state = Failed(message=f"skyvm: {exc}", data=exc)
            except SkyVMError as exc:  # the node could not run, or died: nothing on it said how the task ended
                state = _crashed_state(NodeCrashed(exc))
            engine_mode.record_state(task, task_run_id, state, logger)
            return state

        future = self._executor.submit(copy_context().run, run_on_node)
        return PrefectConcurrentFuture(task_run_id=task_run_id, wrapped_future=future)

    # -- skyvm ----------------------------------------------------------------

    def settings_for(self, task) -> NodeSettings:
        """The resolved settings of one task, all layers applied, checked against their backend."""
        settings = self._resolve(task)
        check_launchable(task.name, settings)
        return settings

    def _resolve(self, task) -> NodeSettings:
        from prefect.context import TagsContext

        options = current_options()
        tags = set(task.tags or ()) | set(TagsContext.get().current_tags or ())
        profile = options.pop("profile", None) or profile_from_tags(tags) or self.profile
        return self._config.resolve(task.name, profile=profile, code=self.overrides, override=options)

    def _remote_task(self, task, settings: NodeSettings):
        """A copy of the task whose function ships the call to a node and returns its result."""
        fn = task.fn
        node = task.name
        run = self._run
        node_cache = self._node_cache

        def launch(args, kwargs) -> NodeHandle:
            from prefect.logging import get_run_logger

            logger = get_run_logger()
            logger.info("skyvm: running %s on a %s node (%s)", node, settings.backend, describe(settings))
            args, kwargs = _plain(tuple(args)), _plain(dict(kwargs))
            ship_by_value(fn)
            # The task run's context travels too: where the image has Prefect, get_run_logger() works in the body.
            body = (fn, args, kwargs, engine_mode.body_context(node_cache, task))
            with progress.reporting_to(logger.info):  # a first build's progress, in the task run's log
                handle = run.start_call(node, settings, on_node.run_body, body, on_log=lambda line: logger.info(redact(line)))
            return handle

        if task.isasync:

            @functools.wraps(fn)
            async def remote(*args, **kwargs):
                handle = launch(args, kwargs)
                # Prefect's timeout (or a cancel) interrupting the wait stops the node too.
                await waiting.wait_async(handle, logger=_run_logger())
                return _outcome(handle)

        else:

            @functools.wraps(fn)
            def remote(*args, **kwargs):
                handle = launch(args, kwargs)
                waiting.wait(handle, logger=_run_logger())
                return _outcome(handle)

        copy = task.with_options()
        copy.fn = remote
        return copy


# How often an engine-mode task's waiting thread looks up from its node (``waiting.wait``).
ENGINE_WAIT_POLL_S = 1.0

# Prefect's runner kills a cancelled flow run's process 30 s after its SIGTERM: stopping the nodes must
# leave time, inside those 30 s, to remove their clusters, or they outlive the process that removes them.
TERMINATED_CLOSE_S = 15.0


def _close_bound(run: Run, exc_value: Any) -> Optional[float]:
    """How long leaving the flow waits for its nodes to stop (None: the run's own ``cancel_wait_s``)."""
    from prefect.exceptions import TerminationSignal

    if isinstance(exc_value, TerminationSignal):
        return min(run.ctx.knobs.cancel_wait_s, TERMINATED_CLOSE_S)
    return None


def _run_logger():
    from prefect.logging import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("prefect_skyvm")


def task_nodes_run_id(flow_run_id) -> str:
    """The skyvm run of a flow run's task nodes (its clusters carry it as their run-id label)."""
    return run_ids.run_id(run_ids.PREFECT_TASKS, flow_run_id)


def _plain(value: Any) -> Any:
    """Prefect keeps a mapped result's container type (PrefectFutureList) after resolving it;
    the node has no Prefect, so send plain lists (recursively through lists, tuples and dicts)."""
    from prefect.futures import PrefectFutureList

    if isinstance(value, PrefectFutureList):
        return [_plain(v) for v in value]
    if type(value) in (list, tuple):
        return type(value)(_plain(v) for v in value)
    if type(value) is dict:
        return {k: _plain(v) for k, v in value.items()}
    return value
