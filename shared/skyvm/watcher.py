"""One watcher per process follows every node in flight: no thread per waiting node.

Streams (a docker exec's socket, a plain process's pipe) are multiplexed with
``selectors`` in one thread: their lines go to each node's log sink as they
come, and their end is the node's end. Attempts that can only be polled (a
SkyPilot job, a node found again from its reference) are asked for their
status and new log lines every ``poll_s``, from the same thread. Timeouts are
checked there too.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

log = logging.getLogger("skyvm.watcher")

LineSink = Callable[[str], None]


@dataclass
class _Stream:
    read: Callable[[int], bytes]  # non-blocking read of up to n bytes; b"" at the end
    on_line: LineSink
    on_end: Callable[[], None]
    docker_frames: bool  # the docker attach protocol (8-byte frame headers), else raw bytes
    buffer: bytes = b""
    text: bytes = b""


@dataclass
class _Polled:
    poll: Callable[[], bool]  # True once the attempt is finished (it reports through its own callbacks)
    every_s: float
    next_at: float = 0.0


@dataclass
class _Deadline:
    at: float
    fire: Callable[[], None]
    done: bool = False


def split_frames(buffer: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Docker's multiplexed stream: (stream id, data) of each whole frame (8-byte header), and the rest."""
    frames = []
    while len(buffer) >= 8:
        size = struct.unpack(">I", buffer[4:8])[0]
        if len(buffer) < 8 + size:
            break
        frames.append((buffer[0], buffer[8 : 8 + size]))
        buffer = buffer[8 + size :]
    return frames, buffer


class Watcher:
    def __init__(self):
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._polled: dict[int, _Polled] = {}
        self._deadlines: dict[int, _Deadline] = {}
        self._ids = iter(range(1, 1 << 62))
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="skyvm-watcher")
        self._thread.start()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # -- registration --------------------------------------------------------

    def add_stream(self, fileobj, read: Callable[[int], bytes], on_line: LineSink, on_end: Callable[[], None], *, docker_frames: bool) -> None:
        with self._lock:
            self._sel.register(fileobj, selectors.EVENT_READ, _Stream(read, on_line, on_end, docker_frames))
        self._wake()

    def add_polled(self, poll: Callable[[], bool], every_s: float) -> int:
        with self._lock:
            key = next(self._ids)
            self._polled[key] = _Polled(poll, every_s, time.monotonic())
        self._wake()
        return key

    def add_deadline(self, at_monotonic: float, fire: Callable[[], None]) -> int:
        with self._lock:
            key = next(self._ids)
            self._deadlines[key] = _Deadline(at_monotonic, fire)
        self._wake()
        return key

    def cancel_deadline(self, key: int) -> None:
        with self._lock:
            self._deadlines.pop(key, None)

    # -- the loop ----------------------------------------------------------------

    def _timeout(self) -> float:
        now = time.monotonic()
        with self._lock:
            times = [p.next_at for p in self._polled.values()] + [d.at for d in self._deadlines.values()]
        return max(0.0, min(times) - now) if times else 5.0

    def _loop(self) -> None:
        while True:
            try:
                events = self._sel.select(self._timeout())
            except OSError:
                events = []
            for key, _mask in events:
                if key.data is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                self._read(key.fileobj, key.data)
            self._run_due()

    def _read(self, fileobj, stream: _Stream) -> None:
        try:
            chunk = stream.read(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if chunk:
            self._feed(stream, chunk)
            return
        with self._lock:
            try:
                self._sel.unregister(fileobj)
            except (KeyError, ValueError):
                pass
        if stream.text:
            self._emit(stream, stream.text)
            stream.text = b""
        try:
            stream.on_end()
        except Exception:  # noqa: BLE001 - one node's bookkeeping must not stop the watcher
            log.exception("node end callback failed")

    def _feed(self, stream: _Stream, chunk: bytes) -> None:
        if not stream.docker_frames:
            self._lines(stream, chunk)
            return
        frames, stream.buffer = split_frames(stream.buffer + chunk)
        for _stream_id, data in frames:
            self._lines(stream, data)

    def _lines(self, stream: _Stream, data: bytes) -> None:
        stream.text += data
        *complete, stream.text = stream.text.split(b"\n")
        for line in complete:
            self._emit(stream, line)

    @staticmethod
    def _emit(stream: _Stream, line: bytes) -> None:
        try:
            stream.on_line(line.decode(errors="replace").rstrip("\r"))
        except Exception:  # noqa: BLE001 - a broken log sink must not stop the node
            log.exception("log sink failed")

    def _run_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            due_polls = [(k, p) for k, p in self._polled.items() if p.next_at <= now]
            due_deadlines = [(k, d) for k, d in self._deadlines.items() if d.at <= now]
            for k, _ in due_deadlines:
                self._deadlines.pop(k, None)
        for _k, deadline in due_deadlines:
            # Firing may block (a cancel): not in this thread, which streams every node's log.
            threading.Thread(target=deadline.fire, daemon=True, name="skyvm-deadline").start()
        for key, polled in due_polls:
            try:
                finished = polled.poll()
            except Exception:  # noqa: BLE001 - a failed poll is retried at the next round
                log.debug("poll failed", exc_info=True)
                finished = False
            with self._lock:
                if finished:
                    self._polled.pop(key, None)
                elif key in self._polled:
                    polled.next_at = time.monotonic() + polled.every_s


_watcher: Optional[Watcher] = None
_watcher_lock = threading.Lock()
_watcher_pid: Optional[int] = None


def watcher() -> Watcher:
    """The process's watcher (a new one after a fork)."""
    global _watcher, _watcher_pid
    with _watcher_lock:
        if _watcher is None or _watcher_pid != os.getpid():
            _watcher, _watcher_pid = Watcher(), os.getpid()
        return _watcher
