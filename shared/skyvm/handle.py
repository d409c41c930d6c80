"""The one handle: an attempt of a node, followed from its ``NodeRef`` by whoever holds it.

    handle = run.start_call(...)          # prepared, then launched through the pool; result() follows it
    reference = handle.let_go()           # JSON-able; the attempt runs on, this process stops following it
    node = NodeHandle.attach(reference)   # any process: status(), read_log(), outcome(), result() (polls),
                                          # cancel(), release(), teardown()

Launched here, it releases its cluster as the attempt ends; found again (or let go), on ``release()``/
``teardown()``, and ``down`` means now (no run of this process will end it).

May import: skyvm.context, skyvm.prepare, skyvm.outcome, skyvm.pool, skyvm.backends.base,
skyvm.settings, skyvm.errors, skyvm.redact. Never skyvm.run or skyvm.api (Run is only passed in).
"""

from __future__ import annotations

import contextvars
import dataclasses

import logging
import threading
import time
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Mapping, Optional

from skyvm import redact
from skyvm.backends.base import JobState, JobStatus, NodeRef
from skyvm.context import Context, current
from skyvm.errors import InfrastructureError, NodeCancelled, NodeTimeout
from skyvm.node import RELAY_MARK
from skyvm.outcome import LogTail, Outcome, read_outcome
from skyvm.plan import TaskSpec
from skyvm.pool import pool_of, wake_all
from skyvm.prepare import backend_for, new_attempt_id, node_store, prepare
from skyvm.settings import NodeSettings

log = logging.getLogger("skyvm")


class NodeHandle:
    """An attempt of a node: ``result()``, ``logs()``, ``cancel()``, ``done()``; ``reference()`` finds it again.

    Made by ``Run.start_*`` (``NodeHandle.launch``) or ``NodeHandle.attach(reference)``, never directly.
    """

    def __init__(self, node: str, settings: NodeSettings, *, run=None, ctx: Optional[Context] = None, on_log=None, attempt_id: Optional[str] = None):
        self.run = run  # the Run that launched it here (None: found again, or let go)
        self.node = node
        self.settings = settings
        self.attempt_id = attempt_id or new_attempt_id(node)
        self._ctx = ctx or current()
        self._on_log: Optional[Callable[[str], None]] = on_log
        self._tail = LogTail(self._ctx.knobs.log_tail_lines, self._ctx.knobs.log_tail_chars)
        self._payload: Optional[bytes] = None  # let go of once stored: a payload may be large
        self._future: Future = Future()
        self._cancel = threading.Event()
        self._launched = threading.Event()  # the launch ended: ``ref`` is set, or the future holds why not
        self._timed_out = False
        self._backend = None
        self._store = None
        self._result_url: Optional[str] = None
        self._watcher = None  # the watcher that follows it, while one does
        self._waiter = 0
        self._deadline: Optional[int] = None
        self._log_offset = 0  # how far a poll has read the attempt's log
        self._poll_failures = 0
        self.ref: Optional[NodeRef] = None
        self.spec: Optional[TaskSpec] = None
        self.started_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self.result_meta: dict = {}
        # Until the backend is asked to launch, nothing exists that a cancel must undo (a built
        # image and an uploaded payload are content-addressed and shared): a cancel ends the node at once.
        self._phase_lock = threading.Lock()
        self._launching = False
        self._following = False  # this process follows the attempt (its end completes the future)
        self._let_go = False
        self._completed = False  # _complete runs once (an exit and a watcher's failure may both arrive)
        self._released = False

    @classmethod
    def launch(cls, run, node: str, settings: NodeSettings, payload: bytes, on_log=None) -> "NodeHandle":
        """Prepare and launch the node on the context's launch threads; returns at once."""
        handle = cls(node, settings, run=run, ctx=run.ctx, on_log=on_log)
        handle._payload = payload
        # In a copy of the submitting context: what an engine set there (a task run's progress sink) goes along.
        handle._ctx.launcher().submit(contextvars.copy_context().run, handle._launch)
        return handle

    @classmethod
    def attach(cls, reference: Mapping[str, Any], *, on_log=None) -> "NodeHandle":
        """The attempt ``reference`` (``reference()``/``let_go()``, e.g. through JSON) names, in this process."""
        settings = NodeSettings.model_validate(reference["settings"])
        ref = NodeRef.from_dict(dict(reference))
        handle = cls(ref.node, settings, on_log=on_log, attempt_id=ref.attempt_id)
        handle.ref, handle._result_url = ref, reference["result_url"]
        handle._launching = True
        handle._launched.set()
        return handle

    # -- public ------------------------------------------------------------

    def result(self, timeout: Optional[float] = None) -> Any:
        self._follow_if_found()
        return self._future.result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        self._follow_if_found()
        return self._future.exception(timeout)

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: Optional[float] = None) -> bool:
        try:
            self.exception(timeout)
        except (TimeoutError, FutureTimeout):
            return False
        return True

    def add_done_callback(self, fn: Callable[["NodeHandle"], None]) -> None:
        self._future.add_done_callback(lambda _f: fn(self))

    def logs(self) -> str:
        """The last lines of the node's stdout and stderr (``log_tail_lines``; every line went to ``on_log``)."""
        return "\n".join(self._tail.last())

    @property
    def cluster(self) -> Optional[str]:
        return self.ref.cluster if self.ref else None

    @property
    def hourly_price(self) -> Optional[float]:
        """The price per hour of the VM the node ran on, when the backend knows it."""
        return self.ref.hourly_price if self.ref else None

    @property
    def cost(self) -> Optional[float]:
        """Duration x hourly price (the node's share of its VM while it ran)."""
        if self.hourly_price is None or self.duration_s is None:
            return None
        return self.duration_s * self.hourly_price / 3600

    @property
    def duration_s(self) -> Optional[float]:
        if self.started_at is None:
            return None
        return (self.finished_at or time.time()) - self.started_at

    # -- found again: what any process holding the reference may ask ---------------------------

    def reference(self, timeout: Optional[float] = None) -> dict:
        """Everything needed to find the attempt again, JSON-able and without secret values (an engine
        stores it: Airflow keeps a trigger's kwargs in its DB). Waits for the launch; raises why it failed."""
        if not self._launched.wait(timeout):
            raise InfrastructureError(f"node {self.node!r} was not launched within {timeout:g}s")
        if self.ref is None:
            raise self._future.exception()
        return {**self.ref.to_dict(), "result_url": self._result_url, "settings": self.settings.model_dump(mode="json", exclude={"secrets"})}

    def let_go(self) -> dict:
        """Stop following the attempt without stopping it (Airflow's deferral): it runs on, its cluster
        stays taken, and whoever holds the returned reference ends it. Raises why the launch failed.

        Asked while the node launches (the usual case), this process never follows it at all."""
        with self._phase_lock:
            self._let_go, self._following, self._on_log = True, False, None
        reference = self.reference()
        self._unfollow()
        pool_of(self._backend_of()).let_go(self.ref)  # its cluster leaves this process's book: the reference's holder ends it
        run, self.run = self.run, None
        if run is not None:
            run.forget(self)
        return reference

    def status(self) -> JobStatus:
        return self._backend_of().status(self._ref())

    def read_log(self, offset: int = 0) -> tuple[str, int]:
        return self._backend_of().read_log(self._ref(), offset)

    def outcome(self, status: Optional[JobStatus] = None) -> Outcome:
        """What the finished attempt left (``status``: its final one, when the caller already has it)."""
        status = status or self.status()
        text, _ = self.read_log(0)
        return self._read_outcome(status, text.splitlines()[-30:])

    def release(self, discard: bool = False) -> None:
        """The attempt is done with (or abandoned): its cluster is free, or goes per ``down``. Once.

        ``discard`` (a node that was lost) makes a ``down`` cluster go now, as for a cancelled or
        timed-out one, and for one found again or let go: no run of this process will end its cluster."""
        with self._phase_lock:
            if self._released or self.ref is None:
                return
            self._released = True
        discard = discard or self._cancel.is_set() or self._timed_out or self.run is None
        pool_of(self._backend_of()).release(self.ref, self.settings.down, discard=discard)

    # -- stopping -----------------------------------------------------------------------

    def cancel(self, wait_s: Optional[float] = None) -> bool:
        """Stop the node, in whatever phase it is: queued, building, provisioning or running.

        A node cancelled before it started never starts. Returns False when it had already
        finished. Followed here, it is waited for and InfrastructureError says when it did not
        stop within ``wait_s`` (default: the context's ``cancel_wait_s``); otherwise the backend
        is asked to stop it.
        """
        if self._future.done():
            return False
        if self.run is None and not self._following:  # found again (or let go), and nobody waits here
            if self.status().state.finished:
                return False
            self._cancel.set()
            self._backend_of().cancel(self.ref)
            return True
        wait_s = self._ctx.knobs.cancel_wait_s if wait_s is None else wait_s
        self.request_cancel()
        if not self.wait(wait_s):
            raise InfrastructureError(f"node {self.node!r} did not stop within {wait_s:g}s of being cancelled (cluster {self.cluster})")
        return True

    def request_cancel(self) -> None:
        """Ask the node to stop without waiting (Run.close asks them all at once, then waits once)."""
        self._cancel.set()
        with self._phase_lock:
            if not self._launching:
                self._fail(NodeCancelled(f"node {self.node!r} was cancelled before it started"))
        wake_all()  # a node queued for a cluster looks at its flag now
        if self.ref is not None:
            # Stopping an attempt is a backend call that may take seconds (a grace period): many nodes stop
            # side by side. (An attempt still launching is stopped by its launch thread, which sees the flag.)
            threading.Thread(target=self._stop_attempt, daemon=True, name=f"skyvm-cancel-{self.node[:20]}").start()

    def teardown(self) -> None:
        """Stop the attempt if it still runs, then release its cluster (and end the run that launched
        it here). Safe to call twice."""
        run = self.run
        try:
            self.cancel()
        finally:  # a stop that failed still releases the cluster and ends the run
            if run is None:  # found again or let go (one launched here was released as it ended)
                self.release()
            else:
                run.close(cancel=True)

    # -- the node's life ------------------------------------------------------

    def _ref(self) -> NodeRef:
        if self.ref is None:
            raise InfrastructureError(f"node {self.node!r} has not been launched (yet): nothing to ask")
        return self.ref

    def _backend_of(self):
        if self._backend is None:
            self._backend = backend_for(self.settings, self.ref.backend if self.ref else None)
        return self._backend

    def _log(self, line: str) -> None:
        # A node that prints a credential it was given must not put it in the engine's log.
        line = redact.redact(line)
        before, mark, record = line.partition(RELAY_MARK)
        if mark:
            # A record for the launcher (its own line, unless a print without a newline came just before).
            if before:
                self._log(before)
            self._sink(mark + record)
            return
        self._tail.append(line)
        if self.settings.stream_logs:
            self._sink(line)

    def _sink(self, line: str) -> None:
        sink = self._on_log
        if sink is not None:
            try:
                sink(line)
            except BaseException:  # noqa: BLE001 - the engine's log sink failing (or exiting) must not lose the node
                log.exception("node %s: its log sink failed on a line", self.node)

    def _stop_attempt(self) -> None:
        ref = self.ref
        if ref is not None:
            try:
                self._backend_of().cancel(ref)
            except Exception as exc:  # noqa: BLE001 - the attempt's end still comes through the watcher
                log.warning("cancelling node %s on %s: %s", self.node, ref.cluster, exc)

    def _fail(self, exc: BaseException) -> None:
        self.finished_at = self.finished_at or time.time()
        try:
            self._future.set_exception(exc)
        except InvalidStateError:
            pass  # a cancel before launch ended it already

    def _launch(self) -> None:
        s = self.settings
        try:
            if self._cancel.is_set():
                raise NodeCancelled(f"node {self.node!r} was cancelled before it started")
            self._backend = backend = backend_for(s)
            payload, self._payload = self._payload, None  # the spec (and the store, unless it goes inline) has it from here on
            self._store, spec = prepare(self.run.run_id, self.node, self.attempt_id, s, payload, backend, self._ctx)
            del payload
            self.spec, self._result_url = spec, spec.result_url
            with self._phase_lock:
                if self._cancel.is_set():
                    raise NodeCancelled(f"node {self.node!r} was cancelled before it started")
                self._launching = True
            self.started_at = time.time()
            with self._ctx.active():  # what the pool and backend do for this node uses its context
                self.ref = pool_of(backend).launch(spec, on_log=self._log, cancelled=self._cancel.is_set)
            # The node has its payload (inline through its agent, or from the store): it may be large.
            self.spec = dataclasses.replace(spec, payload=None)
            del spec
        except BaseException as exc:  # noqa: BLE001 - everything is reported through the future
            self._payload = None
            self._fail(exc)
            self._launched.set()
            return
        try:
            self._follow(timeout_s=s.timeout)
        finally:
            self._launched.set()

    def _follow_if_found(self) -> None:
        """A handle found again (or let go) is followed, by polling, once someone waits on it."""
        with self._phase_lock:
            start = self.ref is not None and self.run is None and not self._following and not self._completed
        if start:
            self._follow(timeout_s=None)

    def _follow(self, timeout_s: Optional[float]) -> None:
        """This process follows the attempt: its stream if the backend can push it, else polls, off the
        watcher's thread; told if the watcher gives up, so that nobody waits on this node forever."""
        with self._phase_lock:
            if self._let_go and self.run is not None:
                return  # let go while it launched: nobody here follows it
            self._following = True
        self._watcher = watcher = self._ctx.watcher()
        self._waiter = watcher.add_waiter(self._on_watcher_failed)
        if self._cancel.is_set():
            self._stop_attempt()
        if timeout_s is not None:
            self._deadline = watcher.add_deadline(time.monotonic() + timeout_s - (time.time() - self.started_at), self._on_timeout)
        backend, ref = self._backend_of(), self.ref
        with self._ctx.active():  # a stream goes to this context's watcher
            pushed = backend.watch(ref, self._log, self._on_exit)
        if not pushed:
            watcher.add_polled(self._poll, getattr(backend, "poll_s", 1.0))

    def _unfollow(self) -> None:
        watcher = self._watcher
        if watcher is not None:
            if self._deadline is not None:
                watcher.cancel_deadline(self._deadline)
            watcher.remove_waiter(self._waiter)

    def _poll(self) -> bool:
        """One poll, on a poll thread: the status, then the log written since the last one (read after
        the status, so the poll that finds the attempt over passes on the rest of its log). True once finished."""
        if not self._following:
            return True  # let go meanwhile
        backend, ref = self._backend_of(), self.ref
        try:
            status = backend.status(ref)
            text, self._log_offset = backend.read_log(ref, self._log_offset)
            for line in text.splitlines():
                self._log(line)
        except Exception as exc:  # noqa: BLE001 - a busy API server, a hiccup: try again, a few times
            self._poll_failures += 1
            most = self._ctx.knobs.poll_failures
            if self._poll_failures < most:
                log.debug("node %s: status failed (%d/%d): %s", self.node, self._poll_failures, most, exc)
                return False
            status = JobStatus(JobState.GONE, None, f"{most} status calls in a row failed, the last: {exc}")
        self._poll_failures = 0
        if status.state.finished:
            self._on_exit(status)
        return status.state.finished

    def _on_timeout(self) -> None:
        if self._following and not self._future.done():
            self._timed_out = True
            self._stop_attempt()

    def _on_exit(self, status) -> None:
        if not self._following:
            return  # let go: whoever holds the reference ends it
        # Reading the result may take a while (a bucket): not on the watcher's thread.
        try:
            self._ctx.finisher().submit(self._complete, status)
        except RuntimeError:  # the interpreter is shutting down: no new threads
            self._complete(status)

    def _on_watcher_failed(self, error: BaseException) -> None:
        """The watcher following this node gave up: the node is stopped, and its waiter gets the error."""
        if not self._following:
            return
        lost = InfrastructureError(f"node {self.node!r} on {self.cluster}: {error}; the node was no longer followed, so it was cancelled")

        def abandon() -> None:
            self._stop_attempt()
            self._complete(JobStatus(JobState.GONE, None, str(error)), error=lost)

        threading.Thread(target=abandon, daemon=True, name="skyvm-abandon").start()

    def _complete(self, status, error: Optional[BaseException] = None) -> None:
        with self._phase_lock:
            if self._completed:
                return
            self._completed = True
        self._unfollow()
        try:
            self.release(discard=error is not None)
        except Exception as exc:  # noqa: BLE001 - the node's own outcome matters more
            log.warning("releasing cluster %s: %s", self.cluster, exc)
        self.finished_at = time.time()
        try:
            if error is not None:
                raise error
            if self._timed_out:
                raise NodeTimeout(f"node {self.node!r} exceeded its timeout of {self.settings.timeout:g}s and was cancelled")
            if self._cancel.is_set() and status.state is not JobState.SUCCEEDED:
                raise NodeCancelled(f"node {self.node!r} was cancelled")
            outcome = self._read_outcome(status, self._tail.last(30))
            self.result_meta = outcome.meta
            self._future.set_result(outcome.value())
        except BaseException as exc:  # noqa: BLE001
            if not self._future.done():
                self._future.set_exception(exc)

    def _read_outcome(self, status, log_tail: list[str]) -> Outcome:
        if self._store is None:
            self._store, _conn = node_store(self.settings, self.node)
        backend, ref = self._backend_of(), self.ref
        return read_outcome(self._store, self._result_url, status, self.node, self.cluster, log_tail, fetch=lambda: backend.result_bytes(ref))
