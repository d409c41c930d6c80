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

Node side: ``install()``. Launcher side: ``available()``, ``deliver(line)``.
May import: prefect, the standard library and skyvm.node (this module is imported on the node).
"""

from __future__ import annotations

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
    set_api_log_sink(partial(_put_log, out))
    return True


def _put_log(out: _Output, payload: dict[str, Any]) -> None:
    out.put((_LOG, payload))


# -- in the launcher ------------------------------------------------------------------------


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

                EventsWorker.instance().send(Event.model_validate(payload))
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
