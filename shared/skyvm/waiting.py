"""Waiting on nodes from an adapter: until they end or a deadline passes, and stopping them when the
wait is interrupted.

An adapter waits on a node in a thread or a coroutine that the orchestrator may interrupt: Prefect's
task timeout or a cancel (an exception raised into the waiting thread between two waits, or a
coroutine's cancellation), a scheduler told to stop, Ctrl-C. Whatever ends a wait early stops the
node before it propagates, so no node runs on with nobody waiting for it; a stop that fails is
logged, and the interruption stays the error the caller sees.

Holds ``wait``, ``wait_async``, ``wait_all`` and ``stop``. They take any handle with ``done()``,
``wait(timeout) -> bool``, ``cancel()`` and ``node`` (``skyvm.api.NodeHandle``).
May import: the standard library only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Iterable, Optional

# A waiting thread checks for an interruption this often: an exception raised into it (Prefect's
# sync timeout) arrives between two waits, never during one.
POLL_S = 0.1
# A waiting coroutine looks at its node this often (the event loop runs meanwhile).
ASYNC_POLL_S = 0.05

_log = logging.getLogger("skyvm")


def stop(handle: Any, logger: Optional[logging.Logger] = None) -> None:
    """Stop a node whose wait was interrupted. A stop that fails is logged, never raised: the
    interruption is the error the caller reports."""
    try:
        handle.cancel()
    except Exception as exc:  # noqa: BLE001 - the original error is the one the caller reports
        (logger or _log).warning("skyvm: stopping node %s after its wait was interrupted failed: %s", handle.node, exc)


def wait(handle: Any, timeout: Optional[float] = None, *, logger: Optional[logging.Logger] = None, poll_s: float = POLL_S) -> bool:
    """Block until the node ends (True) or ``timeout`` seconds pass (False); stop it if interrupted.

    ``poll_s``: how soon an exception raised into the waiting thread arrives. Longer where nothing raises
    into it (a thread the orchestrator never times out): each look is a wake-up of the waiting thread."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while not handle.wait(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))):
            if deadline is not None and time.monotonic() >= deadline:
                return False
        return True
    except BaseException:
        stop(handle, logger)
        raise


async def wait_async(handle: Any, timeout: Optional[float] = None, *, logger: Optional[logging.Logger] = None) -> bool:
    """Await the node's end (True) or ``timeout`` seconds (False); stop it if the coroutine is
    cancelled (the stop runs in a thread: it may take a while, and must not hold the event loop)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while not handle.done():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(ASYNC_POLL_S)
        return True
    except BaseException:
        await asyncio.to_thread(stop, handle, logger)
        raise


def wait_all(handles: Iterable[Any], timeout: Optional[float] = None, *, logger: Optional[logging.Logger] = None) -> list[Any]:
    """Wait for every node, all within one ``timeout``; the ones still running when it passes.
    An interruption stops every node not yet ended."""
    handles = list(handles)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        for handle in handles:
            handle.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
    except BaseException:
        for handle in handles:
            if not handle.done():
                stop(handle, logger)
        raise
    return [h for h in handles if not h.done()]
