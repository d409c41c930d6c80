"""One watcher per process follows every node in flight: no thread per waiting node.

Streams (a docker exec's socket, a plain process's pipe) are multiplexed with
``selectors`` in one thread: their lines go to each node's log sink as they
come, and their end is the node's end (reported on a small pool of threads:
the backend asks its engine how the attempt ended). Timeouts are checked there
too, and fired on a thread of their own (a cancel may take seconds).

The watcher's thread never blocks on a backend: attempts that can only be
polled (a SkyPilot job, a node found again from its reference) are asked for
their status and new log lines every ``every_s`` on a small bounded pool of
poll threads, one poll per attempt in flight at a time. A poll that hangs (a
SkyPilot bridge call may take minutes) holds one poll thread, never another
node's stream or deadline.

The thread is supervised: a callback that raises (even ``SystemExit``) is
logged and the node goes on; a failed round is logged and the next one starts
with everything still registered; after ``LOOP_FAILURES`` failed rounds in a
row it gives up and every waiter (``add_waiter``) gets an error naming it,
rather than waiting forever on a dead thread.

Holds no process-wide state: the process's watcher is its ``skyvm.context``'s.
May import only the standard library.
"""

from __future__ import annotations

import logging
import selectors
import socket
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

log = logging.getLogger("skyvm.watcher")

LineSink = Callable[[str], None]

# Failed rounds in a row after which the watcher gives up (each failure is logged; a round that
# works resets the count): then every waiter gets an error naming it, and the next watcher() is new.
LOOP_FAILURES = 5
# Threads a stream's end is reported on (its backend asks how the attempt ended, then the node completes).
ENDING_THREADS = 4
# Output with no newline is passed on in pieces of this size rather than buffered without bound.
MAX_LINE_BYTES = 64 * 1024


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
    in_flight: bool = False  # its poll runs on a poll thread now: never two at once


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
    """``poll_threads``: the poll pool's size. ``successor()``: where a registration goes once this
    watcher has given up (the context's current watcher)."""

    def __init__(self, poll_threads: int = 8, successor: Optional[Callable[[], "Watcher"]] = None):
        self._poll_threads = poll_threads
        # Made when first needed: the poll threads, and the threads a stream's end is reported on (a
        # backend asks its engine how the attempt ended: a call, never made on this thread).
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._successor = successor or Watcher
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._polled: dict[int, _Polled] = {}
        self._deadlines: dict[int, _Deadline] = {}
        self._waiters: dict[int, Callable[[BaseException], None]] = {}
        self._ids = iter(range(1, 1 << 62))
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        # Set once the loop gave up: the process's next watcher() is a new one.
        self.failed: Optional[BaseException] = None
        self._failures = 0  # failed rounds in a row
        self._thread = threading.Thread(target=self._loop, daemon=True, name="skyvm-watcher")
        self._thread.start()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    @property
    def alive(self) -> bool:
        return self.failed is None and self._thread.is_alive()

    # -- registration --------------------------------------------------------

    # A registration that reaches a watcher which has given up goes to its successor (the context's current one).

    def add_stream(self, fileobj, read: Callable[[int], bytes], on_line: LineSink, on_end: Callable[[], None], *, docker_frames: bool) -> None:
        with self._lock:
            registered = self.failed is None
            if registered:
                self._sel.register(fileobj, selectors.EVENT_READ, _Stream(read, on_line, on_end, docker_frames))
        if not registered:
            return self._successor().add_stream(fileobj, read, on_line, on_end, docker_frames=docker_frames)
        self._wake()

    def add_polled(self, poll: Callable[[], bool], every_s: float) -> int:
        return self._add(self._polled, _Polled(poll, every_s, time.monotonic())) or self._successor().add_polled(poll, every_s)

    def add_deadline(self, at_monotonic: float, fire: Callable[[], None]) -> int:
        return self._add(self._deadlines, _Deadline(at_monotonic, fire)) or self._successor().add_deadline(at_monotonic, fire)

    def _add(self, table: dict, item) -> int:
        """The item's key, or 0 when this watcher has given up (the caller goes to the current one)."""
        with self._lock:
            if self.failed is not None:
                return 0
            key = next(self._ids)
            table[key] = item
        self._wake()
        return key

    def cancel_deadline(self, key: int) -> None:
        with self._lock:
            self._deadlines.pop(key, None)

    def add_waiter(self, on_failure: Callable[[BaseException], None]) -> int:
        """Someone waits on what this watcher follows: told (``on_failure(error)``) if the watcher gives up,
        at once if it already has, so that nobody waits on a dead thread."""
        with self._lock:
            if self.failed is None:
                key = next(self._ids)
                self._waiters[key] = on_failure
                return key
        on_failure(self.failed)
        return 0

    def remove_waiter(self, key: int) -> None:
        with self._lock:
            self._waiters.pop(key, None)

    # -- the loop ----------------------------------------------------------------

    def _timeout(self) -> float:
        now = time.monotonic()
        with self._lock:
            times = [p.next_at for p in self._polled.values() if not p.in_flight] + [d.at for d in self._deadlines.values()]
        # After a failed round the next comes soon: a watcher that keeps failing gives up in seconds.
        idle = 1.0 if self._failures else 5.0
        return min(idle, max(0.0, min(times) - now)) if times else idle

    def _loop(self) -> None:
        """Supervises the rounds: a round that fails is logged and the next starts with every stream,
        poll and deadline still registered; only after LOOP_FAILURES failed rounds in a row does the
        watcher give up, and then every waiter gets an error naming it."""
        while True:
            try:
                self._round()
                self._failures = 0
            except BaseException as exc:  # noqa: BLE001 - this thread follows every node of the process
                self._failures = failures = self._failures + 1
                log.error("skyvm watcher: a round failed (%d in a row of at most %d): %s: %s", failures, LOOP_FAILURES, type(exc).__name__, exc, exc_info=True)
                if failures >= LOOP_FAILURES:
                    self._give_up(exc, failures)
                    return
                self._drop_closed_streams()
                time.sleep(min(0.05 * 2**failures, 1.0))

    def _round(self) -> None:
        try:
            events = self._sel.select(self._timeout())
        except OSError:
            # A stream's file was closed under the watcher (EBADF): find it, or this select fails forever.
            self._drop_closed_streams()
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

    def _drop_closed_streams(self) -> None:
        """End every stream whose file is no longer open (its end is its node's end, as when it reads b"")."""
        with self._lock:
            keys = [k for k in self._sel.get_map().values() if k.data is not None]
        for key in keys:
            try:
                bad = key.fileobj.fileno() < 0
            except (OSError, ValueError):
                bad = True
            if bad:
                self._end(key.fileobj, key.data)

    def _give_up(self, exc: BaseException, failures: int) -> None:
        error = _WatcherFailed(f"skyvm's watcher thread stopped after {failures} failed rounds in a row, the last: {type(exc).__name__}: {exc}")
        with self._lock:
            self.failed = error
            waiters = list(self._waiters.values())
            self._waiters.clear()
            self._polled.clear()
            self._deadlines.clear()
            streams = [k.fileobj for k in self._sel.get_map().values()]
            for fileobj in streams:
                try:
                    self._sel.unregister(fileobj)
                except (KeyError, ValueError):
                    pass
        for executor in self._executors.values():
            executor.shutdown(wait=False)  # a poll running now finds its entry gone and ends there
        log.error("%s: the %d node(s) it followed are told so", error, len(waiters))
        for sock in (self._wake_r, self._wake_w, self._sel):
            try:
                sock.close()
            except OSError:
                pass
        for on_failure in waiters:
            try:
                on_failure(error)
            except BaseException:  # noqa: BLE001 - every waiter is told, whatever one of them does
                log.exception("telling a waiter that the watcher stopped failed")

    def _read(self, fileobj, stream: _Stream) -> None:
        try:
            chunk = stream.read(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        except BaseException:  # noqa: BLE001 - a broken reader ends its stream, not the watcher
            log.exception("reading a node's stream failed: it counts as ended")
            chunk = b""
        if chunk:
            try:
                self._feed(stream, chunk)
            except BaseException:  # noqa: BLE001 - the chunk is lost, the stream goes on
                log.exception("a node's output could not be split into lines")
            return
        self._end(fileobj, stream)

    def _end(self, fileobj, stream: _Stream) -> None:
        with self._lock:
            try:
                self._sel.unregister(fileobj)
            except (KeyError, ValueError):
                pass
        if stream.text:
            self._emit(stream, stream.text)
            stream.text = b""
        try:
            self._executor("end", ENDING_THREADS).submit(self._call_end, stream.on_end)
        except RuntimeError:  # shutting down: no new threads
            self._call_end(stream.on_end)

    @staticmethod
    def _call_end(on_end: Callable[[], None]) -> None:
        try:
            on_end()
        except BaseException:  # noqa: BLE001 - one node's bookkeeping must not stop the others'
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
        # Output that never ends a line (a progress bar) goes out in pieces, not held without bound.
        while len(stream.text) >= MAX_LINE_BYTES:
            piece, stream.text = stream.text[:MAX_LINE_BYTES], stream.text[MAX_LINE_BYTES:]
            self._emit(stream, piece)

    @staticmethod
    def _emit(stream: _Stream, line: bytes) -> None:
        try:
            stream.on_line(line.decode(errors="replace").rstrip("\r"))
        except BaseException:  # noqa: BLE001 - a broken log sink (even one raising SystemExit) must not stop the node
            log.exception("log sink failed")

    def _run_due(self) -> None:
        """Fire the deadlines that are due and hand the polls that are due to the poll threads:
        nothing here waits on a backend."""
        now = time.monotonic()
        with self._lock:
            due_polls = [(k, p) for k, p in self._polled.items() if p.next_at <= now and not p.in_flight]
            for _k, polled in due_polls:
                polled.in_flight = True
            due_deadlines = [(k, d) for k, d in self._deadlines.items() if d.at <= now]
            for k, _ in due_deadlines:
                self._deadlines.pop(k, None)
        for key, deadline in due_deadlines:
            try:
                # Firing may block (a cancel): not in this thread, which streams every node's log.
                threading.Thread(target=deadline.fire, daemon=True, name="skyvm-deadline").start()
            except BaseException:  # noqa: BLE001 - no thread to be had now: try again shortly
                log.exception("starting a node's timeout failed; retrying in 1s")
                with self._lock:
                    self._deadlines[key] = _Deadline(time.monotonic() + 1.0, deadline.fire)
        for key, polled in due_polls:
            try:
                self._executor("poll", self._poll_threads).submit(polled.poll).add_done_callback(lambda f, key=key, polled=polled: self._polled_back(key, polled, f))
            except BaseException:  # noqa: BLE001 - no poll thread now (shutting down): try again next round
                log.debug("handing a poll to a poll thread failed", exc_info=True)
                with self._lock:
                    polled.in_flight = False
                    polled.next_at = time.monotonic() + polled.every_s

    def _executor(self, kind: str, threads: int) -> ThreadPoolExecutor:
        with self._lock:
            if kind not in self._executors:
                self._executors[kind] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"skyvm-{kind}")
            return self._executors[kind]

    def _polled_back(self, key: int, polled: _Polled, done: Future) -> None:
        """A poll ended (on its poll thread): finished attempts are dropped, the others polled again in ``every_s``."""
        try:
            finished = done.result()
        except BaseException:  # noqa: BLE001 - a failed poll is retried at its next turn
            log.debug("poll failed", exc_info=True)
            finished = False
        with self._lock:
            polled.in_flight = False
            if finished:
                self._polled.pop(key, None)
            elif key in self._polled:
                polled.next_at = time.monotonic() + polled.every_s
        self._wake()


class _WatcherFailed(RuntimeError):
    pass
