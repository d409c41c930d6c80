"""``SkyVMTrigger``: waits on a node its operator let go of, in the triggerer, so no worker slot is held meanwhile.

When the node is stopped, and when it is not:

- The trigger stops because the triggerer restarts, is redeployed, or hands the trigger to another
  triggerer (HA): the node keeps running. The next trigger built from the same serialized kwargs
  picks it up where it is. ``cleanup()`` never stops a node.
- A user marks the deferred task failed or success, or clears it: the node is stopped and its
  cluster released. Airflow 3.3+ calls the trigger's ``on_kill()`` for exactly these actions. Older
  Airflow has no such hook, so on cancellation the trigger asks Airflow for the task instance's
  state (``safe_to_cancel``): only when it is no longer ``deferred`` is the node stopped.
- The deferral times out (``execution_timeout``): Airflow will fail the task, so the node is
  stopped too.

Trouble while waiting becomes an event (``status: "error"`` with a message naming the node and
what to do), never an exception of the trigger. A check that fails (status or log read raises, or
the cluster is reported unreachable or gone) is retried with backoff; only ``status_tries``
failures in a row make the node count as gone.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from typing import Any, AsyncIterator, Optional

from airflow.triggers.base import BaseTrigger, TriggerEvent

from skyvm.api import NodeHandle, teardown
from skyvm.redact import redact

# Airflow 3.3+ calls BaseTrigger.on_kill() when a user acts on the deferred task (apache/airflow#65590).
AIRFLOW_CALLS_TRIGGER_ON_KILL = "on_kill" in vars(BaseTrigger)


class NodeUnreachable(Exception):
    """One status check of a node failed (the check raised, or the cluster did not answer)."""


def _unreachable(status) -> bool:
    """A status that says the cluster did not answer, or is gone: believed only when it repeats."""
    return getattr(status.state, "name", "") == "GONE" or "unreachable" in (status.detail or "")


class SkyVMTrigger(BaseTrigger):
    """Polls a node launched by ``SkyVMOperator(deferrable=True)`` until it finishes.

    :param node: ``NodeHandle.let_go()``'s reference: where the node runs (no secrets in it)
    :param poll_interval: seconds between checks
    :param log_offset: where in the node's log to start streaming
    """

    #: status checks in a row that may fail before the node counts as gone
    status_tries = 5
    #: first and largest wait (seconds) between failed status checks; doubles each time
    status_backoff = (1.0, 16.0)

    def __init__(self, node: dict[str, Any], poll_interval: float = 2.0, log_offset: int = 0):
        super().__init__()
        self.node = node
        self.poll_interval = poll_interval
        self.log_offset = log_offset
        self._fired = False  # an event went out: the operator owns the node from here
        self._unanswered = 0  # failed status checks, all told
        self._stopped = False

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"node": self.node, "poll_interval": self.poll_interval, "log_offset": self.log_offset},
        )

    # -- waiting ---------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"node {self.node.get('node')!r} on cluster {self.node.get('cluster')}"

    async def _check(self, node: NodeHandle):
        """One status check, then the log written since the last one: NodeUnreachable if either fails."""
        try:
            status = await asyncio.to_thread(node.status)
            if _unreachable(status):
                raise NodeUnreachable(status.detail)
            text, self.log_offset = await asyncio.to_thread(node.read_log, self.log_offset)
        except NodeUnreachable:
            raise
        except Exception as exc:  # noqa: BLE001 - the backend's trouble, whatever its kind
            raise NodeUnreachable(f"{type(exc).__name__}: {exc}") from exc
        for line in text.splitlines():
            self.log.info("%s", redact(line))
        return status

    def _event(self, status: str, **fields: Any) -> TriggerEvent:
        self._fired = True
        return TriggerEvent({"status": status, "node": self.node, "log_offset": self.log_offset, "unanswered_checks": self._unanswered, **fields})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        failures = 0
        try:
            node = NodeHandle.attach(self.node)
            while True:
                try:
                    status = await self._check(node)
                except NodeUnreachable as exc:
                    failures += 1
                    self._unanswered += 1
                    if failures >= self.status_tries:
                        yield self._event("error", message=self._gone_message(failures, str(exc)))
                        return
                    wait = min(self.status_backoff[0] * 2 ** (failures - 1), self.status_backoff[1])
                    self.log.warning("skyvm: %s did not answer (check %d of %d), retrying in %gs: %s", self._where, failures, self.status_tries, wait, exc)
                    await asyncio.sleep(wait)
                    continue
                if failures:
                    self.log.info("skyvm: %s answers again", self._where)
                failures = 0
                if status.state.finished:
                    # When it ended, as near as this poll knows: the task's summary ends the node's duration there.
                    yield self._event(status.state.value, exit_code=status.exit_code, detail=status.detail, finished_at=time.time())
                    return
                await asyncio.sleep(self.poll_interval)
        except asyncio.CancelledError:
            try:
                await self._on_cancelled()
            except Exception:  # noqa: BLE001 - the cancellation goes on; Airflow must see it as one
                self.log.exception("skyvm: stopping %s failed", self._where)
            raise
        except Exception as exc:  # noqa: BLE001 - becomes the task's error, with the node named
            yield self._event(
                "error",
                message=f"skyvm: waiting on {self._where} failed: {type(exc).__name__}: {exc}. "
                "Fix: see the error above; the node's cluster is released as the task fails, so clearing the task runs the node afresh.",
            )

    def _gone_message(self, failures: int, last: str) -> str:
        return (
            f"skyvm: {self._where} did not answer {failures} status checks in a row; it counts as gone. "
            f"Last answer: {last}. "
            "Fix: check that the cluster still exists (local backend: `docker ps -a`; SkyPilot: `sky status`), "
            "then clear the task to run the node afresh."
        )

    # -- when the trigger stops ------------------------------------------------------------

    async def _on_cancelled(self) -> None:
        """The triggerer stopped this trigger: stop the node only if the task is really over."""
        if self._fired:
            return
        if self._deadline_passed():
            await self._stop_node("the deferral timed out")
        elif not AIRFLOW_CALLS_TRIGGER_ON_KILL and await self.safe_to_cancel():
            await self._stop_node("the task is no longer deferred (marked failed or success, or cleared)")
        # Otherwise (a triggerer restart, a deploy, another triggerer taking over): the node runs on.

    def _deadline_passed(self) -> bool:
        deadline: Optional[datetime.datetime] = getattr(self, "timeout_after", None)
        if deadline is None:
            return False
        if deadline.tzinfo is None:
            deadline = deadline.replace(tzinfo=datetime.timezone.utc)
        return deadline < datetime.datetime.now(datetime.timezone.utc)

    async def safe_to_cancel(self) -> bool:
        """Whether the task instance left ``deferred`` (the user acted on it): asks Airflow, not the trigger.

        Any doubt (no task instance, no answer) keeps the node running.
        """
        ti = self.task_instance
        if ti is None:
            return False
        try:
            from asgiref.sync import sync_to_async
            from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

            map_index = getattr(ti, "map_index", -1)
            map_index = -1 if map_index is None else map_index
            states = await asyncio.wait_for(
                sync_to_async(RuntimeTaskInstance.get_task_states)(dag_id=ti.dag_id, task_ids=[ti.task_id], run_ids=[ti.run_id], map_index=map_index),
                timeout=30,
            )
            key = ti.task_id if map_index < 0 else f"{ti.task_id}_{map_index}"
            state = states[ti.run_id][key]
        except Exception as exc:  # noqa: BLE001
            self.log.warning("skyvm: could not read the state of %s (%s); %s keeps running", getattr(ti, "task_id", "?"), exc, self._where)
            return False
        state = getattr(state, "value", state)
        self.log.info("skyvm: task instance %s is %s", ti.task_id, state)
        return state != "deferred"

    async def _stop_node(self, why: str) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.log.info("skyvm: %s: stopping %s and releasing its cluster", why, self._where)
        await asyncio.to_thread(lambda: teardown(NodeHandle.attach(self.node)))

    async def on_kill(self) -> None:
        """Airflow 3.3+: a user marked the deferred task failed or success, or cleared it."""
        if not self._fired:
            await self._stop_node("the task was marked failed or success, or cleared, while deferred")

    async def cleanup(self) -> None:
        """Runs whenever this trigger stops, a triggerer restart included: never stops the node."""
