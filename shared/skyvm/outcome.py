"""What an attempt leaves: its outcome (what the node left in its store, read against what the
backend saw) and the bounded tail of its log that errors quote.

``read_outcome`` turns a final ``JobStatus`` and the stored result into an ``Outcome`` (or the error
that says why there is none); ``Outcome.value()`` is the node's return value, or raises NodeFailed
(NodeAborted for a SystemExit/KeyboardInterrupt on the node) with the remote traceback, secrets redacted.

May import: the standard library, skyvm.errors, skyvm.redact, skyvm.backends.base (states), cloudpickle. Nothing that launches.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Optional

import cloudpickle

from skyvm import redact
from skyvm.backends.base import JobState
from skyvm.errors import InfrastructureError, NodeAborted, NodeCancelled, NodeFailed, PayloadError


class Outcome:
    """What a finished node left in the store, read against what the backend saw."""

    def __init__(self, node: str, result: dict, status):
        self.node = node
        self.result = result
        self.status = status
        self.meta = {k: v for k, v in result.items() if k not in ("value", "exc")}

    def value(self) -> Any:
        result, status = self.result, self.status
        if result["ok"]:
            if status.state is not JobState.SUCCEEDED:
                # Never report success for a job the backend saw fail.
                raise InfrastructureError(
                    f"node {self.node!r} wrote a result but its job ended {status.state.value} (exit {status.exit_code}: {status.detail}); "
                    "the result is not trusted: retry the node, and check the cluster's log"
                )
            return result.get("value")
        err = NodeFailed(
            redact.redact(f"node {self.node!r} failed: {result.get('exc_type')}: {result.get('message')}"),
            remote_traceback=redact.redact(result.get("traceback", "")),
            exc_type=result.get("exc_type", ""),
            returncode=result.get("returncode"),
        )
        original = None
        if result.get("exc"):
            try:
                original = cloudpickle.loads(result["exc"])
            except Exception:  # noqa: BLE001 - the exception's class may not exist here
                original = None
        if original is not None and not isinstance(original, Exception):
            # SystemExit, KeyboardInterrupt...: they ended the node; here they would end the launching
            # process (an engine re-raising them), so they are reported, never handed on.
            code = original.code if isinstance(original, SystemExit) else None
            err = NodeAborted(
                redact.redact(f"node {self.node!r} was ended by {result.get('exc_type')}({result.get('message')}) raised by its code"),
                remote_traceback=redact.redact(result.get("traceback", "")),
                exc_type=result.get("exc_type", ""),
                returncode=result.get("returncode"),
                exit_code=code,
            )
            original = None
        # An engine records this exception's text (Prefect's state message, its API logs): no secret in it.
        err.remote_exception = None if original is None else redact.scrub_exception(original)
        raise err


def read_outcome(store, result_url: str, status, node: str, cluster: str, log_tail: list[str], fetch: Optional[Callable[[], Optional[bytes]]] = None) -> Outcome:
    """``fetch``: the result as its backend brought it back (Backend.result_bytes), None when it is in the store."""
    if status.state is JobState.CANCELLED:
        raise NodeCancelled(f"node {node!r} was cancelled")
    if status.state is JobState.GONE:
        raise InfrastructureError(f"node {node!r}: its cluster {cluster} is gone ({status.detail}); the node did not finish")
    try:
        blob = fetch() if fetch is not None else None
        result = cloudpickle.loads(store.get(store.key_of(result_url)) if blob is None else blob)
    except PayloadError as exc:
        tail = "\n".join(log_tail)
        raise InfrastructureError(
            f"node {node!r} on {cluster} exited with code {status.exit_code} and wrote no result ({exc}).\nLast log lines:\n{tail}"
        ) from None
    return Outcome(node, result, status)


class LogTail:
    """The last lines of a log, bounded in lines and characters."""

    def __init__(self, lines: int, chars: int):
        self._lines: deque[str] = deque(maxlen=lines)
        self._max_chars = chars
        self._chars = 0
        self._lock = threading.Lock()

    def append(self, line: str) -> None:
        line = line[-self._max_chars :]
        with self._lock:
            if len(self._lines) == self._lines.maxlen:
                self._chars -= len(self._lines[0])
            self._lines.append(line)
            self._chars += len(line)
            while self._chars > self._max_chars:
                self._chars -= len(self._lines.popleft())

    def last(self, n: Optional[int] = None) -> list[str]:
        with self._lock:
            lines = list(self._lines)
        return lines if n is None else lines[-n:]
