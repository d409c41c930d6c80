"""An engine-mode node's events and API log records, sent through its launcher, as Prefect's own
``ProcessPoolTaskRunner`` sends its subprocesses' through the parent.

Why: a node that talks to the API itself starts, in every fresh process, an events client (a websocket)
and a log worker (an HTTP client), checks the API's version, and waits at its end until both have
drained: most of an engine-mode node's time, and the API server's CPU, for a trivial task. The flow's
process already has both, connected. So a node forked by a cluster's agent (its output reaches the
launcher live, over the agent's channel) writes each event and log record as one line on its output
(``skyvm.node.RELAY_MARK``, then JSON), and the launcher hands them to its own events and log workers
(``deliver``) as it reads them. The task run's states reach the API while the node runs (they are
events), and a node killed mid-run has sent what it emitted until then.

Node side: ``install()``, ``seed_related()``. Launcher side: ``available()``, ``Deliverer``, ``outside_runs()``, ``related_objects()``:
the flow run's flow, which the node's events worker names in every event, read once by the launcher instead
of from the API by every node.
May import: prefect, the standard library and skyvm.node (this module is imported on the node).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import threading
from typing import Any

from skyvm.node import RELAY_MARK

log = logging.getLogger("prefect_skyvm")

# The launcher sets it in an engine-mode node's environment when it reads the node's output for these.
ENV = "SKYVM_PREFECT_RELAY"
_EVENT, _LOG = "event", "log"


def available() -> bool:
    """Whether this Prefect forwards events and API logs as its process pool does (3.9 and later)."""
    try:
        from prefect.events.worker import ProcessPoolForwardingEventsClient  # noqa: F401
        from prefect.logging.handlers import set_api_log_sink  # noqa: F401
    except ImportError:
        return False
    return True


# -- on the node ----------------------------------------------------------------------------


class _Output:
    """A queue (as ``ProcessPoolForwardingEventsClient`` puts to) whose items become lines on the node's
    output: the agent's pipe, below the node's log file (these are not the task's output)."""

    _lock = threading.Lock()

    def put(self, item: tuple[str, Any]) -> None:
        kind, payload = item
        body = payload.model_dump_json() if kind == _EVENT else json.dumps(payload, default=str)
        line = f'{RELAY_MARK}{{"{kind}": {body}}}\n'.encode()
        with self._lock:
            try:
                sys.stdout.flush()  # what the task printed so far comes first, and is not split by this line
            except (OSError, ValueError):
                pass
            view = memoryview(line)
            while view:
                view = view[os.write(1, view):]


def install() -> bool:
    """In a node forked by an agent whose launcher asked for it: events and API logs go to the node's
    output. Returns whether they do (otherwise the node sends them to the API itself, as before)."""
    if os.environ.get(ENV) != "1" or os.environ.get("SKYVM_AGENT_CHILD") != "1" or not available():
        return False
    from functools import partial

    from prefect.events.worker import EventsWorker, ProcessPoolForwardingEventsClient
    from prefect.logging.handlers import set_api_log_sink

    out = _Output()
    EventsWorker.set_client_override(ProcessPoolForwardingEventsClient, event_queue=out, item_type=_EVENT)
    _emit_inline(EventsWorker, _InlineEvents(out))
    set_api_log_sink(partial(_put_log, out))
    return True


class _InlineEvents:
    """Prefect's events worker as a relaying node's synchronous code meets it: each event gets the related
    resources Prefect's worker would attach (its own method, in the emitting thread's context) and is
    written out at once. Why: the worker proper starts a loop thread and an API client in every fresh
    process and is drained at its end, about a third of a trivial node's CPU, to put lines on a pipe."""

    def __init__(self, out: _Output) -> None:
        from prefect.events.worker import ProcessPoolForwardingEventsClient

        self.client_type = ProcessPoolForwardingEventsClient  # what emit_event checks: a client that sends
        self._out = out
        self._orchestration_client = _ClientOnMiss()  # read only when a related object is not cached
        self._loops = threading.local()  # a loop per emitting thread (a nested task's pool thread has its own)

    def send(self, event) -> None:
        import asyncio

        from prefect.events.worker import EventsWorker

        loop = getattr(self._loops, "loop", None)
        if loop is None:
            loop = self._loops.loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(EventsWorker.attach_related_resources_from_context(self, event))
        except Exception:  # noqa: BLE001 - the event still goes (the run it names is in it), without the rest
            log.debug("skyvm: related resources not attached to event %s", event.event, exc_info=True)
        self._out.put((_EVENT, event))


class _ClientOnMiss:
    """Stands for the events worker's API client: Prefect names its readers up front, and awaits one only
    for an object its cache lacks (a deployed run's deployment, work queue, pool): a client made then."""

    def __getattr__(self, reader: str):
        async def read(*args: Any, **kwargs: Any) -> Any:
            from prefect.client.orchestration import get_client

            async with get_client() as client:
                return await getattr(client, reader)(*args, **kwargs)

        return read


def _emit_inline(worker_class, inline: _InlineEvents) -> None:
    """``EventsWorker.instance()`` answers ``inline`` in a thread that runs no event loop; in one that does
    (an async task's) it answers Prefect's worker, as before: the inline sink would have to block that loop.
    Only while the relay's client override is in place: whoever resets it (``set_client_override(None)``, a
    test in the launcher's process) gets Prefect's own workers back."""
    import asyncio

    prefect_instance = worker_class.__dict__.get("_skyvm_prefect_instance") or worker_class.instance.__func__
    worker_class._skyvm_prefect_instance = prefect_instance  # a second install wraps Prefect's, not ours

    def instance(cls, client_type=None):
        override = cls._client_override
        ours = override is not None and dict(override[1]).get("event_queue") is inline._out
        if ours and client_type is None and asyncio._get_running_loop() is None:
            return inline
        return prefect_instance(cls, client_type)

    worker_class.instance = classmethod(instance)


def _put_log(out: _Output, payload: dict[str, Any]) -> None:
    out.put((_LOG, payload))


def seed_related(related: dict[str, Any]) -> None:
    """The flow run's related objects (its flow), read once by the launcher, put where Prefect's events
    worker looks first: it names them in every event, and would read them from the API in each node
    (``related_objects``)."""
    if not related:
        return
    import prefect.types._datetime as datetimes
    from prefect.events.related import RESOURCE_CACHE

    now = datetimes.now("UTC")
    for name, obj in related.items():
        kind = name.split(".", 1)[0]
        RESOURCE_CACHE.setdefault(name, ({"kind": kind, "object": obj}, now))


# -- in the launcher ------------------------------------------------------------------------


# The objects Prefect's events worker names as related to every event of a flow run's tasks (besides the
# runs themselves, which are in the context): (kind, the flow run's field naming it, the client's reader).
# Only the flow: a deployment, its work queue and pool (a deployed run's) may hold job variables, which
# must not travel in a payload; a node reads those itself, as before.
_RELATED = (("flow", "flow_id", "read_flow"),)


def related_objects(cache: dict) -> dict[str, Any]:
    """The flow run's related objects, as Prefect's events worker caches them (``RESOURCE_CACHE`` keys:
    ``flow.<id>``...), read once per flow run. A node seeds its own cache with them (``seed_related``): its
    events worker would otherwise read the flow from the API in every node, a round trip in each and,
    as its last events wait on it, at each node's end. One that cannot be read here is left for the node
    to read itself, as before."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    flow_run = getattr(ctx, "flow_run", None)
    if flow_run is None:
        return {}
    key = ("related", flow_run.id)
    with _RELATED_LOCK:  # a map's tasks reach here at once: one of them reads, the others wait for it
        if key not in cache:
            cache[key] = _read_related(flow_run)
    return cache[key]


_RELATED_LOCK = threading.Lock()


def _read_related(flow_run) -> dict[str, Any]:
    from prefect.events.related import RESOURCE_CACHE

    from prefect.client.orchestration import get_client

    found: dict[str, Any] = {}
    for kind, field, reader in _RELATED:
        obj_id = getattr(flow_run, field, None)
        if not obj_id:
            continue
        name = f"{kind}.{obj_id}"
        entry = RESOURCE_CACHE.get(name)
        try:
            if entry is not None:
                found[name] = entry[0].get("object")
            else:
                with get_client(sync_client=True) as client:
                    found[name] = getattr(client, reader)(obj_id)
        except Exception as exc:  # noqa: BLE001 - the node reads it, as Prefect's worker does
            log.debug("skyvm: %s %s not read for the nodes (%s): each node reads it", kind, obj_id, exc)
    return {name: obj for name, obj in found.items() if obj is not None}


def outside_runs(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with the run contexts explicitly unset, not merely absent, for the events it emits.
    Prefect's events worker lays the emitter's context over its own thread's, and that thread keeps the
    context of the flow run that first started it: an event emitted where no run context is set would
    name that (an earlier, other) flow run as related."""

    def unset() -> Any:
        from prefect.context import FlowRunContext, TaskRunContext

        FlowRunContext.__var__.set(None)
        TaskRunContext.__var__.set(None)
        return fn(*args)

    return contextvars.Context().run(unset)


class Deliverer:
    """Hands a node's relayed lines to this process's events and log workers (the flow's, connected)."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._off: set[str] = set()  # a worker that is shutting down (the flow's end) is not asked again

    def __call__(self, line: str) -> bool:
        """Whether ``line`` was a relayed record (delivered, or dropped with a warning)."""
        if not line.startswith(RELAY_MARK):
            return False
        try:
            ((kind, payload),) = json.loads(line[len(RELAY_MARK):]).items()
        except (ValueError, TypeError) as exc:
            log.warning("skyvm: node %s relayed a line that is not a record (%s): dropped", self.node, exc)
            return True
        if kind in self._off:
            return True
        try:
            if kind == _EVENT:
                from prefect.events import Event
                from prefect.events.worker import EventsWorker

                # Sent with no run context: the node attached the run's related resources already, in the task
                # run's context; the flow's context here would have the worker work them out again for each event,
                # only to find them there (a quarter of this process's CPU in a map of trivial tasks).
                outside_runs(EventsWorker.instance().send, Event.model_validate(payload))
            elif kind == _LOG:
                from prefect.logging.handlers import APILogWorker

                APILogWorker.instance().send(payload)
            else:
                log.warning("skyvm: node %s relayed a record of unknown kind %r: dropped", self.node, kind)
        except RuntimeError:
            self._off.add(kind)  # as Prefect's process pool: its worker is stopping, later ones are dropped too
            log.debug("skyvm: node %s: %s relay off (the worker is stopping)", self.node, kind, exc_info=True)
        except Exception:  # noqa: BLE001 - one bad record must not end the node's log stream
            log.exception("skyvm: node %s: a relayed %s could not be sent to the Prefect API", self.node, kind)
        return True
