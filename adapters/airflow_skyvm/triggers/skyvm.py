"""``SkyVMTrigger``: waits on a detached node in the triggerer, so no worker slot is held meanwhile."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from airflow.triggers.base import BaseTrigger, TriggerEvent

from skyvm.api import DetachedNode, teardown


class SkyVMTrigger(BaseTrigger):
    """Polls a node launched by ``SkyVMOperator(deferrable=True)`` until it finishes.

    :param node: ``DetachedNode.to_dict()``: where the node runs (no secrets in it)
    :param poll_interval: seconds between checks
    """

    def __init__(self, node: dict[str, Any], poll_interval: float = 2.0, log_offset: int = 0):
        super().__init__()
        self.node = node
        self.poll_interval = poll_interval
        self.log_offset = log_offset
        self._finished = False

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"node": self.node, "poll_interval": self.poll_interval, "log_offset": self.log_offset},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        node = DetachedNode.from_dict(self.node)
        while True:
            status = await asyncio.to_thread(node.status)
            text, self.log_offset = await asyncio.to_thread(node.read_log, self.log_offset)
            for line in text.splitlines():
                self.log.info("%s", line)
            if status.state.finished or status.exit_code is not None or status.detail.startswith("cluster"):
                self._finished = True
                yield TriggerEvent({"status": status.state.value, "exit_code": status.exit_code, "detail": status.detail, "node": self.node})
                return
            await asyncio.sleep(self.poll_interval)

    async def _teardown_if_unfinished(self) -> None:
        if not self._finished:
            self._finished = True
            await asyncio.to_thread(teardown, DetachedNode.from_dict(self.node))

    async def cleanup(self) -> None:
        # The trigger stops before the node finished (the task was cleared, marked failed, or timed out):
        # do not leave the node running.
        await self._teardown_if_unfinished()

    async def on_kill(self) -> None:  # Airflow 3.3+
        await self._teardown_if_unfinished()
