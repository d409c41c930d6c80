"""The launcher's end of a cluster's agent (``skyvm.agent``): one long-lived channel per cluster.

Every node a process runs on the cluster goes over the same authenticated connection
(``multiprocessing.connection``, the cluster's key): its payload inline, its log stream, its exit,
its cancel. One reader thread per channel hands each message to the attempt it names. A channel
that drops while attempts run ends them as GONE, naming the cluster; the next node opens a new
one (or the backend falls back to an exec when the agent is gone).

Holds: ``AgentChannel``, ``AgentGone``, ``agent_dir`` (where a cluster's socket and key live on
this host) and ``new_key``. May import: the standard library, skyvm.backends.base, skyvm.home.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import secrets
import tempfile
import threading
import time
from multiprocessing.connection import Client
from pathlib import Path
from typing import Callable, Optional

from skyvm.backends.base import JobState, JobStatus, LogSink, state_of_exit
from skyvm.home import Home

log = logging.getLogger("skyvm.agent")

SOCKET = "agent.sock"
KEY = "key"
# AF_UNIX paths are limited to 108 bytes; a deep home falls back to a short directory under /tmp.
MAX_SOCKET_PATH = 100
# An attempt's payload travels inline up to this size; larger ones are read from the store on the node.
INLINE_PAYLOAD_MAX = 8 << 20
# How many ended attempts a channel remembers for status() when nobody followed them.
KEEP_EXITS = 1024


class AgentGone(Exception):
    """The cluster's agent cannot be reached (the cluster stopped, or the agent died)."""


def agent_dir(cluster: str) -> Path:
    """Where cluster ``cluster`` of this install keeps its agent's socket and key (bind-mounted at the same path)."""
    home = Home.current()
    digest = hashlib.sha256(cluster.encode()).hexdigest()[:12]
    path = home.resolved / "agents" / digest
    if len(str(path / SOCKET)) > MAX_SOCKET_PATH:
        path = Path(tempfile.gettempdir()) / "skyvm-agents" / f"{home.id[:8]}-{digest}"
    return path


def new_key(directory: Path) -> bytes:
    """A fresh key for a cluster's agent, readable by its owner alone."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    key = secrets.token_hex(32).encode()
    path = directory / KEY
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


class _Follow:
    """One attempt on the channel: its followers, or what came before anyone followed it."""

    def __init__(self):
        self.on_log: Optional[LogSink] = None
        self.on_exit: Optional[Callable[[JobStatus], None]] = None
        self.dropped = False
        self.early: list[bytes] = []
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.partial = ""
        self.pid: Optional[int] = None
        self.ended: Optional[JobStatus] = None  # it ended before anyone followed it

    def lines(self, data: bytes, final: bool = False) -> list[str]:
        text = self.partial + self.decoder.decode(data, final=final)
        *done, self.partial = text.split("\n")
        if final and self.partial:
            done.append(self.partial)
            self.partial = ""
        return done


class AgentChannel:
    """One connection to one cluster's agent, shared by every attempt this process runs there."""

    def __init__(self, cluster: str, socket_path: str, key: bytes, *, connect_timeout: float = 60.0, alive: Optional[Callable[[], bool]] = None):
        self.cluster = cluster
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._attempts: dict[str, _Follow] = {}
        self._exits: dict[str, JobStatus] = {}
        self._closed = False
        self.lost: Optional[str] = None
        self._conn = self._connect(socket_path, key, connect_timeout, alive)
        self._reader = threading.Thread(target=self._read, name=f"skyvm-agent-{cluster}", daemon=True)
        self._reader.start()

    def _connect(self, path: str, key: bytes, timeout: float, alive):
        """Connect, waiting while the agent starts (its socket appears once it listens)."""
        deadline = time.monotonic() + timeout
        delay, checked = 0.002, time.monotonic()
        while True:
            try:
                return Client(path, family="AF_UNIX", authkey=key)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                now = time.monotonic()
                if now >= deadline:
                    raise AgentGone(f"the agent of cluster {self.cluster} did not answer within {timeout:g}s ({exc})") from None
                if alive is not None and now - checked >= 1.0:
                    checked = now
                    if not alive():
                        raise AgentGone(f"cluster {self.cluster} stopped before its agent answered") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.01)  # a fresh cluster's agent is waited for within ~10 ms of listening
            except Exception as exc:  # noqa: BLE001 - a refused key (AuthenticationError) and the like
                raise AgentGone(f"the agent of cluster {self.cluster} refused this launcher: {type(exc).__name__}: {exc}") from None

    # -- attempts ----------------------------------------------------------------

    def run(self, attempt: str, payload: Optional[bytes], payload_url: str, result_url: str, env: dict) -> None:
        """Start an attempt; it reports back over this channel. AgentGone when the channel is down."""
        with self._lock:
            self._attempts[attempt] = _Follow()
        if payload is not None and len(payload) > INLINE_PAYLOAD_MAX:
            payload = None
        self._send(("run", {"attempt": attempt, "payload": payload, "payload_url": payload_url, "result_url": result_url, "env": env}))

    def follow(self, attempt: str, on_log: LogSink, on_exit: Callable[[JobStatus], None]) -> bool:
        """Push the attempt's log and exit to these; False when this channel does not know it."""
        with self._lock:
            follow = self._attempts.get(attempt)
            ended = self._exits.get(attempt)
            if follow is None and ended is None:
                return False
            if follow is not None:
                follow.on_log, follow.on_exit = on_log, on_exit
                early, follow.early = follow.early, []
                if follow.ended is not None:
                    self._attempts.pop(attempt, None)
        if follow is None:
            on_exit(ended)
            return True
        for data in early:
            self._deliver_log(follow, data)
        if follow.ended is not None:
            self._deliver_log(follow, b"", final=True)
            on_exit(follow.ended)
        return True

    def drop(self, attempt: str) -> bool:
        """Nobody here follows the attempt any longer: its messages are dropped (its log stays in the cluster)."""
        with self._lock:
            follow = self._attempts.get(attempt)
            if follow is None:
                return False
            follow.dropped = True
            follow.early = []
        return True

    def knows(self, attempt: str) -> bool:
        with self._lock:
            return attempt in self._attempts or attempt in self._exits

    def status(self, attempt: str) -> Optional[JobStatus]:
        with self._lock:
            if attempt in self._exits:
                return self._exits[attempt]
            follow = self._attempts.get(attempt)
        if follow is None:
            return None
        return JobStatus(JobState.RUNNING if follow.pid else JobState.PENDING, None, "running" if follow.pid else "starting")

    def cancel(self, attempt: str, grace_s: float) -> None:
        self._send(("cancel", attempt, grace_s))

    def ping(self) -> None:
        self._send(("ping",))

    # -- the connection ----------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.lost is None and not self._closed

    def _send(self, msg: tuple) -> None:
        if self.lost is not None:
            raise AgentGone(self.lost)
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (OSError, EOFError, ValueError) as exc:
            self._lose(f"the channel to the agent of cluster {self.cluster} broke: {exc}")
            raise AgentGone(self.lost) from None

    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError) as exc:
                if not self._closed:
                    why = "the agent's channel closed" if isinstance(exc, EOFError) else f"reading from its agent failed: {exc}"
                    self._lose(f"the agent of cluster {self.cluster} is gone ({why}): the cluster stopped or its agent died")
                return
            op = msg[0]
            if op == "log":
                self._on_log(msg[1], msg[2])
            elif op == "exit":
                self._on_exit(msg[1], JobStatus(state_of_exit(msg[2]), msg[2], "exited"))
            elif op == "started":
                self._on_started(msg[1], msg[2])

    def _on_started(self, attempt: str, pid: int) -> None:
        # A method of its own: a local of the reader's loop would keep the attempt (and its follower) alive.
        with self._lock:
            follow = self._attempts.get(attempt)
            if follow is not None:
                follow.pid = pid

    def _on_log(self, attempt: str, data: bytes) -> None:
        with self._lock:
            follow = self._attempts.get(attempt)
            if follow is None or follow.dropped:
                return
            if follow.on_log is None:
                follow.early.append(data)
                return
        self._deliver_log(follow, data)

    @staticmethod
    def _deliver_log(follow: _Follow, data: bytes, final: bool = False) -> None:
        for line in follow.lines(data, final):
            try:
                follow.on_log(line)
            except Exception:  # noqa: BLE001 - a follower's failure never stops the channel
                log.exception("a log follower failed")

    def _on_exit(self, attempt: str, status: JobStatus) -> None:
        with self._lock:
            self._exits[attempt] = status
            while len(self._exits) > KEEP_EXITS:
                self._exits.pop(next(iter(self._exits)))
            follow = self._attempts.get(attempt)
            if follow is not None and follow.on_exit is None and not follow.dropped:
                follow.ended = status  # follow() replays its log, then its end
                return
            self._attempts.pop(attempt, None)
            if follow is None or follow.dropped:
                return
        self._deliver_log(follow, b"", final=True)
        try:
            follow.on_exit(status)
        except Exception:  # noqa: BLE001
            log.exception("an exit follower failed")

    def _lose(self, why: str) -> None:
        with self._lock:
            if self.lost is not None:
                return
            self.lost = why
            pending = list(self._attempts)
        for attempt in pending:
            self._on_exit(attempt, JobStatus(JobState.GONE, None, why))

    def close(self) -> None:
        self._closed = True
        try:
            self._conn.close()
        except OSError:
            pass
