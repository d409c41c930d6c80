"""The engine-neutral API the adapters use: submit a call or a command as a node, get a handle.

    import skyvm
    handle = skyvm.submit(train, data, node="train", options={"cpus": 2, "memory": 4})
    handle.result()      # the return value, or raises NodeFailed / InfrastructureError
    handle.logs()        # the last lines of the node's stdout and stderr (every line goes to on_log as it comes)
    handle.cancel()      # stop it; its cluster goes per `down`

A ``Run`` groups nodes (one flow run, one DAG run): clusters are shared by
signature within it, and ``Run.close()`` tears down its ``down: true``
clusters. ``skyvm.submit`` uses one default run per process, closed at exit.

A run may live as long as the process (an Airflow scheduler's executor): it
holds only its unfinished nodes and a bounded cost summary of the finished
ones; a handle lets go of its payload once the payload is stored, and keeps
only a bounded tail of its log. Every wait is bounded (``CANCEL_WAIT_S``, the
nodes' own ``timeout``, ``CLOSE_WAIT_S``).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Mapping, Optional, Union

import cloudpickle

from skyvm import node as node_runtime
from skyvm import redact
from skyvm.connectors.base import DEFAULT_NODE_TTL_S
from skyvm.backends.base import JobState, JobStatus, NodeRef
from skyvm.errors import InfrastructureError, NodeAborted, NodeCancelled, NodeFailed, NodeTimeout, PayloadError, SettingsError, SkyVMError
from skyvm.payloads import open_store
from skyvm.plan import TaskSpec, plan_node
from skyvm.settings import NodeSettings, SkyVMConfig, as_config
from skyvm.watcher import watcher

log = logging.getLogger("skyvm")

def resolve_secret(name: str, value: str) -> str:
    """A reference (``env:VAR``, ``file:PATH``, ``airflow:CONN_ID``, ``prefect:secret/NAME``) is read
    in the launching process; anything else is the value itself. Either way it is redacted from now on."""
    from skyvm.connectors import refs

    if refs.is_reference(value):
        try:
            return refs.resolve(value, f"secrets.{name}")
        except SkyVMError as exc:
            raise InfrastructureError(f"secret {name}: {exc}") from None
    redact.register(value)
    return value


def node_store(settings: NodeSettings, node: str):
    """The node's payload store, opened on this host with its connector's credentials: (store, connector)."""
    from skyvm import connectors

    conn = connectors.for_store(settings, settings.payload_store)
    options = conn.renewing_fs_options(settings.payload_store, settings.payload_store_endpoint) if conn else None
    return open_store(settings.payload_store, settings.payload_store_endpoint, storage_options=options, node=node), conn


def check_launchable(node: str, settings: NodeSettings) -> None:
    """Refuse, before any image build or upload, a node its backend could not run.

    Settings validate one file; what a backend needs (a VM reaches no local
    directory and no local image) is checked here, where the backend is known.
    """
    if settings.backend != "skypilot":
        return
    from skyvm.backends.skypilot import missing_for_vms

    problems = missing_for_vms(settings)
    if problems:
        raise SettingsError([(f"nodes.{node}.{field}", msg) for field, msg in problems], source=f"node '{node}'")


# A backend's name (NodeRef.backend) -> the ``backend`` setting that reaches it. The local backend is
# Docker, or plain processes on a host without an engine: both are "local".
BACKEND_SETTING = {"local": "local", "local-process": "local", "skypilot": "skypilot"}


def backend_for(settings: NodeSettings, name: Optional[str] = None):
    """The backend that runs nodes of these settings, or, given ``name`` (a ``NodeRef.backend``: a node
    found again), the one that launched it, whatever ``settings.backend`` says."""
    kind = settings.backend if name is None else BACKEND_SETTING.get(name)
    if kind == "local":
        from skyvm.backends.local import local_backend

        return local_backend()
    if kind == "skypilot":
        from skyvm.backends.skypilot import skypilot_backend

        return skypilot_backend(settings if settings.backend == "skypilot" else settings.model_copy(update={"backend": "skypilot"}))
    what = f"backend name {name!r}" if name is not None else f"backend {settings.backend!r}"
    raise SettingsError([("backend", f"unknown {what}: accepted are {', '.join(BACKEND_SETTING)}")])


_image_cache: dict[tuple, str] = {}
_image_lock = threading.Lock()


def node_image(settings: NodeSettings) -> str:
    """The image a node runs in: ``image`` as given, else skyvm's node image built for its requirements."""
    if settings.image:
        return settings.image
    if os.environ.get("SKYVM_NODE_IMAGE") and not settings.requirements and not settings.registry:
        # A node started from a node (a flow on a node whose tasks use SkyVMTaskRunner) has no source
        # checkout to build skyvm's image from: its nodes run in the image it runs in.
        return os.environ["SKYVM_NODE_IMAGE"]
    key = (tuple(settings.requirements), settings.registry)
    with _image_lock:
        if key not in _image_cache:
            from skyvm import connectors
            from skyvm.images import build_node_image

            login = connectors.registry_login(settings, settings.registry)
            _image_cache[key] = build_node_image(requirements=settings.requirements, registry=settings.registry, login=login).ref
        return _image_cache[key]


def _registry_prefix(settings: NodeSettings) -> str:
    """Images under this prefix come from the node's registry (and need its login)."""
    return settings.registry.server.rstrip("/") + "/" if settings.registry else "\0"


def new_attempt_id(node: str) -> str:
    """Unique per attempt; safe in file names and object keys."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]", "-", node[:40]) + "-" + uuid.uuid4().hex[:12]


# Launching (payload upload, image build, waiting for a cluster slot, provisioning) runs on a
# bounded pool of threads; waiting on a running node takes none (the process's one watcher).
LAUNCH_THREADS = int(os.environ.get("SKYVM_LAUNCH_THREADS", "32"))
# Consecutive failed status calls before a polled node counts as gone.
POLL_FAILURES = 5
# How long cancel() waits for a node to stop before it says so (Run.close waits this long once, for all).
CANCEL_WAIT_S = float(os.environ.get("SKYVM_CANCEL_WAIT_S", "60"))
# Run.close(cancel=False) waits at most this long for a node that has no ``timeout`` of its own.
CLOSE_WAIT_S = float(os.environ.get("SKYVM_CLOSE_WAIT_S", "3600"))
# What a handle keeps of its log in memory (its error messages and logs() use it): the last lines, up to
# this many and this many characters in all. Every line goes to on_log as it comes.
LOG_TAIL_LINES = int(os.environ.get("SKYVM_LOG_TAIL_LINES", "1000"))
LOG_TAIL_CHARS = 1 << 20
# Cost rows of finished nodes a run keeps for its summary (the total counts them all).
COST_ROWS = 1000
_launcher: Optional[ThreadPoolExecutor] = None
_launcher_lock = threading.Lock()


def launcher() -> ThreadPoolExecutor:
    global _launcher
    with _launcher_lock:
        if _launcher is None:
            _launcher = ThreadPoolExecutor(max_workers=LAUNCH_THREADS, thread_name_prefix="skyvm-launch")
        return _launcher


_finisher: Optional[ThreadPoolExecutor] = None


def finisher() -> ThreadPoolExecutor:
    """Where a finished node's result is read and its cluster released: never behind launches, which
    may all be waiting for the very clusters these releases free."""
    global _finisher
    with _launcher_lock:
        if _finisher is None:
            _finisher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="skyvm-finish")
        return _finisher


class LogTail:
    """The last lines of a log, bounded in lines and characters."""

    def __init__(self, lines: Optional[int] = None, chars: Optional[int] = None):
        self._lines: deque[str] = deque(maxlen=LOG_TAIL_LINES if lines is None else lines)
        self._max_chars = LOG_TAIL_CHARS if chars is None else chars
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


class NodeHandle:
    """A submitted node: ``result()``, ``logs()``, ``cancel()``, ``done()``."""

    def __init__(self, run: "Run", node: str, settings: NodeSettings, payload: bytes, on_log: Optional[Callable[[str], None]]):
        self.run = run
        self.node = node
        self.settings = settings
        self.attempt_id = new_attempt_id(node)
        self._payload: Optional[bytes] = payload  # let go of once stored: a payload may be large
        self._on_log = on_log
        self._tail = LogTail()
        self._waiter = 0  # the watcher's key for this node while it is followed
        self._future: Future = Future()
        self._cancel = threading.Event()
        self._timed_out = False
        self._backend = None
        self._store = None
        self._deadline: Optional[int] = None
        self.ref: Optional[NodeRef] = None
        self.spec: Optional[TaskSpec] = None
        self.started_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self.result_meta: dict = {}
        # Until the backend is asked to launch, nothing exists that a cancel must undo (a built
        # image and an uploaded payload are content-addressed and shared): a cancel ends the node at once.
        self._phase_lock = threading.Lock()
        self._launching = False
        self._completed = False  # _complete runs once (an exit and a watcher's failure may both arrive)
        launcher().submit(self._launch)

    # -- public ------------------------------------------------------------

    def result(self, timeout: Optional[float] = None) -> Any:
        return self._future.result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        return self._future.exception(timeout)

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: Optional[float] = None) -> bool:
        try:
            self._future.exception(timeout)
        except (TimeoutError, FutureTimeout):
            return False
        return True

    def add_done_callback(self, fn: Callable[["NodeHandle"], None]) -> None:
        self._future.add_done_callback(lambda _f: fn(self))

    def logs(self) -> str:
        """The last lines of the node's stdout and stderr (``LOG_TAIL_LINES``; every line went to ``on_log``)."""
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

    def cancel(self, wait_s: Optional[float] = None) -> bool:
        """Stop the node, in whatever phase it is: queued, building, provisioning or running.

        A node cancelled before it started never starts. Returns False when it had already
        finished; raises InfrastructureError when it did not stop within ``wait_s``
        (default ``CANCEL_WAIT_S``).
        """
        if self._future.done():
            return False
        wait_s = CANCEL_WAIT_S if wait_s is None else wait_s
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
        from skyvm.pool import wake_all

        wake_all()  # a node queued for a cluster looks at its flag now
        if self.ref is not None:
            # Stopping an attempt is a backend call that may take seconds (a grace period): many nodes stop
            # side by side. (An attempt still launching is stopped by its launch thread, which sees the flag.)
            threading.Thread(target=self._stop_attempt, daemon=True, name=f"skyvm-cancel-{self.node[:20]}").start()

    # -- the node's life ------------------------------------------------------

    def _log(self, line: str) -> None:
        # A node that prints a credential it was given must not put it in the engine's log.
        line = redact.redact(line)
        self._tail.append(line)
        if self._on_log and self.settings.stream_logs:
            try:
                self._on_log(line)
            except BaseException:  # noqa: BLE001 - the engine's log sink failing (or exiting) must not lose the node
                log.exception("node %s: its log sink failed on a line", self.node)

    def _stop_attempt(self) -> None:
        ref, backend = self.ref, self._backend
        if ref is not None and backend is not None:
            try:
                backend.cancel(ref)
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
            payload, self._payload = self._payload, None  # the store has it from here on
            self._store, spec = prepare(self.run.run_id, self.node, self.attempt_id, s, payload, backend)
            del payload
            self.spec = spec
            with self._phase_lock:
                if self._cancel.is_set():
                    raise NodeCancelled(f"node {self.node!r} was cancelled before it started")
                self._launching = True
            self.started_at = time.time()
            self.ref = ref = backend.launch(spec, on_log=self._log, cancelled=self._cancel.is_set)
        except BaseException as exc:  # noqa: BLE001 - everything is reported through the future
            self._payload = None
            self._fail(exc)
            return
        # Told if the process's watcher gives up, so that nobody waits on this node forever.
        self._waiter = watcher().add_waiter(self._on_watcher_failed)
        if self._cancel.is_set():
            self._stop_attempt()
        if s.timeout is not None:
            self._deadline = watcher().add_deadline(time.monotonic() + s.timeout - (time.time() - self.started_at), self._on_timeout)
        if not backend.watch(ref, self._log, self._on_exit):
            offset, failures = [0], [0]

            def poll() -> bool:
                try:
                    text, offset[0] = backend.read_log(ref, offset[0])
                    for line in text.splitlines():
                        self._log(line)
                    status = backend.status(ref)
                except Exception as exc:  # noqa: BLE001 - a busy API server, a hiccup: try again, a few times
                    failures[0] += 1
                    if failures[0] < POLL_FAILURES:
                        log.debug("node %s: status failed (%d/%d): %s", self.node, failures[0], POLL_FAILURES, exc)
                        return False
                    status = JobStatus(JobState.GONE, None, f"{POLL_FAILURES} status calls in a row failed, the last: {exc}")
                failures[0] = 0
                if status.state.finished:
                    self._on_exit(status)
                return status.state.finished

            watcher().add_polled(poll, getattr(backend, "poll_s", 1.0))

    def _on_timeout(self) -> None:
        if not self._future.done():
            self._timed_out = True
            self._stop_attempt()

    def _on_exit(self, status) -> None:
        # Reading the result may take a while (a bucket): not on the watcher's thread.
        try:
            finisher().submit(self._complete, status)
        except RuntimeError:  # the interpreter is shutting down: no new threads
            self._complete(status)

    def _on_watcher_failed(self, error: BaseException) -> None:
        """The watcher following this node gave up: the node is stopped, and its waiter gets the error."""
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
        ref, backend, s = self.ref, self._backend, self.settings
        if self._deadline is not None:
            watcher().cancel_deadline(self._deadline)
        watcher().remove_waiter(self._waiter)
        try:
            backend.release(ref, s.down, discard=self._cancel.is_set() or self._timed_out or error is not None)
        except Exception as exc:  # noqa: BLE001 - the node's own outcome matters more
            log.warning("releasing cluster %s: %s", ref.cluster, exc)
        self.finished_at = time.time()
        try:
            if error is not None:
                raise error
            if self._timed_out:
                raise NodeTimeout(f"node {self.node!r} exceeded its timeout of {s.timeout:g}s and was cancelled")
            if self._cancel.is_set() and status.state is not JobState.SUCCEEDED:
                raise NodeCancelled(f"node {self.node!r} was cancelled")
            outcome = read_outcome(self._store, self.spec.result_url, status, self.node, ref.cluster, self._tail.last(30))
            self.result_meta = outcome.meta
            self._future.set_result(outcome.value())
        except BaseException as exc:  # noqa: BLE001
            if not self._future.done():
                self._future.set_exception(exc)


def prepare(run_id: str, node: str, attempt_id: str, s: NodeSettings, payload: bytes, backend) -> tuple:
    """Store the payload and plan the node: (store, TaskSpec). Secrets are resolved here, on the launching host."""
    from skyvm import connectors

    store, conn = node_store(s, node)
    payload_url = store.put_payload(payload)
    result_url = store.url_for(f"results/{attempt_id}")
    envs: dict[str, str] = {}
    secrets: dict[str, str] = {}
    if conn is not None:
        # The node's own short-lived credentials, scoped to this store: never the launcher's keys.
        ttl = max(DEFAULT_NODE_TTL_S, int((s.timeout or 0) + 600))
        access = conn.node_store_access(store.url, node=node, ttl_s=ttl, endpoint=s.payload_store_endpoint)
        envs.update(access.envs)
        secrets.update(access.secrets)
        log.debug("node %s reaches %s with %s", node, store.url, access.scope)
    secrets.update({name: resolve_secret(name, value) for name, value in s.secrets.items()})
    settings = s.model_copy(update={"envs": {**envs, **s.envs}})
    # Plain processes run the host's own Python: no image to build.
    image = node_image(s) if getattr(backend, "needs_image", True) else "host-python"
    spec = plan_node(
        settings,
        node=node,
        run_id=run_id,
        attempt_id=attempt_id,
        payload_url=payload_url,
        result_url=result_url,
        # Plain processes run the host's own Python: no image to build.
        image=image,
        secrets=secrets,
        # Minted now, for this attempt: every launch and every exec logs in with a fresh token.
        registry_auth=connectors.registry_login(s, s.registry) if image.startswith(_registry_prefix(s)) else None,
    )
    return store, spec


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


def read_outcome(store, result_url: str, status, node: str, cluster: str, log_tail: list[str]) -> Outcome:
    if status.state is JobState.CANCELLED:
        raise NodeCancelled(f"node {node!r} was cancelled")
    if status.state is JobState.GONE:
        raise InfrastructureError(f"node {node!r}: its cluster {cluster} is gone ({status.detail}); the node did not finish")
    try:
        result = cloudpickle.loads(store.get(store.key_of(result_url)))
    except PayloadError as exc:
        tail = "\n".join(log_tail)
        raise InfrastructureError(
            f"node {node!r} on {cluster} exited with code {status.exit_code} and wrote no result ({exc}).\nLast log lines:\n{tail}"
        ) from None
    return Outcome(node, result, status)


class DetachedNode:
    """A node launched without a process waiting on it (Airflow's deferrable mode).

    Everything needed to find it again is in ``to_dict()`` (JSON): the backend's
    ``NodeRef`` plus where its result goes and its settings (no secret values), so
    a trigger in another process can poll it, read its log, fetch its result,
    cancel it and release its cluster.
    """

    def __init__(self, ref: dict):
        self.ref = dict(ref)
        self.settings = NodeSettings.model_validate(ref["settings"])
        self.node = ref["node"]
        self.node_ref = NodeRef.from_dict(ref)

    def to_dict(self) -> dict:
        return dict(self.ref)

    @classmethod
    def from_dict(cls, ref: dict) -> "DetachedNode":
        return cls(ref)

    @property
    def cluster(self) -> str:
        return self.node_ref.cluster

    def _backend(self):
        return backend_for(self.settings, self.node_ref.backend)

    def status(self):
        return self._backend().status(self.node_ref)

    def read_log(self, offset: int = 0) -> tuple[str, int]:
        return self._backend().read_log(self.node_ref, offset)

    def outcome(self, status=None) -> Outcome:
        status = status or self.status()
        store, _ = node_store(self.settings, self.node)
        text, _ = self.read_log(0)
        return read_outcome(store, self.ref["result_url"], status, self.node, self.cluster, text.splitlines()[-30:])

    def cancel(self) -> None:
        self._backend().cancel(self.node_ref)

    def release(self) -> None:
        """The node is done with (or abandoned): tear its cluster down if ``down`` says so."""
        self._backend().release(self.node_ref, self.settings.down)


class Run:
    """A group of nodes sharing clusters by signature; ``close()`` ends it."""

    def __init__(self, settings: Union[None, str, os.PathLike, Mapping[str, Any], SkyVMConfig] = None, run_id: Optional[str] = None):
        self.config = as_config(settings)
        self.run_id = run_id or f"run-{uuid.uuid4().hex[:12]}"
        # Only unfinished nodes are held: a finished one leaves its cost row and is dropped.
        self._live: dict[str, NodeHandle] = {}
        self._costs: deque[dict] = deque(maxlen=COST_ROWS)
        self._cost_total = 0.0
        self._cost_nodes = 0
        self._lock = threading.Lock()
        self._backends: set = set()
        self._closed = False
        from skyvm.home import Home

        self._lease = Home.current().hold_run(self.run_id)  # gc spares the run's clusters while it is held

    def resolve(self, node: str, *, profile: Optional[str] = None, options: Optional[Mapping[str, Any]] = None, override: Optional[Mapping[str, Any]] = None) -> NodeSettings:
        return self.config.resolve(node, profile=profile, code=options, override=override)

    def submit(
        self,
        fn: Callable,
        *args: Any,
        node: Optional[str] = None,
        profile: Optional[str] = None,
        options: Optional[Mapping[str, Any]] = None,
        override: Optional[Mapping[str, Any]] = None,
        on_log: Optional[Callable[[str], None]] = None,
        **kwargs: Any,
    ) -> NodeHandle:
        """Run ``fn(*args, **kwargs)`` as a node. Settings are resolved (and checked) before anything starts."""
        node = node or getattr(fn, "__name__", "node")
        settings = self.resolve(node, profile=profile, options=options, override=override)
        return self.start_call(node, settings, fn, args, kwargs, on_log=on_log)

    def submit_command(
        self,
        command: str,
        *,
        node: str,
        profile: Optional[str] = None,
        options: Optional[Mapping[str, Any]] = None,
        override: Optional[Mapping[str, Any]] = None,
        on_log: Optional[Callable[[str], None]] = None,
    ) -> NodeHandle:
        """Run a shell command as a node; its result is the last line it printed."""
        settings = self.resolve(node, profile=profile, options=options, override=override)
        return self.start_command(node, settings, command, on_log=on_log)

    # Adapters resolve settings themselves (to fail at submit time), then start with these.
    def start_call(self, node: str, settings: NodeSettings, fn: Callable, args=(), kwargs=None, *, on_log=None) -> NodeHandle:
        return self._start(node, settings, node_runtime.make_call_payload(fn, args, kwargs, node=node), on_log)

    def start_command(self, node: str, settings: NodeSettings, command: str, *, on_log=None) -> NodeHandle:
        return self._start(node, settings, node_runtime.make_command_payload(command), on_log)

    def launch_detached(self, node: str, settings: NodeSettings, payload: bytes) -> DetachedNode:
        """Start a node that runs on without this process; returns what finds it again."""
        check_launchable(node, settings)
        backend = backend_for(settings)
        attempt_id = new_attempt_id(node)
        _store, spec = prepare(self.run_id, node, attempt_id, settings, payload, backend)
        # Nobody here follows it: the reference is what finds it again.
        ref = backend.launch(spec, follow=False)
        return DetachedNode(
            {
                **ref.to_dict(),
                "result_url": spec.result_url,
                # Secrets stay out: this dict is stored by the engine (Airflow keeps triggers in its DB).
                "settings": settings.model_dump(mode="json", exclude={"secrets"}),
            }
        )

    def start_raw(self, node: str, settings: NodeSettings, payload: bytes, *, on_log=None) -> NodeHandle:
        """Start a node from a payload made with skyvm.node.make_call_payload / make_command_payload."""
        return self._start(node, settings, payload, on_log)

    def _start(self, node: str, settings: NodeSettings, payload: bytes, on_log) -> NodeHandle:
        if self._closed:
            raise SkyVMError(f"run {self.run_id} is closed")
        check_launchable(node, settings)
        self._backends.add(backend_for(settings))
        handle = NodeHandle(self, node, settings, payload, on_log)
        with self._lock:
            self._live[handle.attempt_id] = handle
        handle.add_done_callback(self._finished)  # at once when it has already finished
        return handle

    @property
    def handles(self) -> list[NodeHandle]:
        """The run's nodes that have not finished yet. A finished node is dropped (its cost stays in
        ``cost_summary()``): a run may last as long as its process, an Airflow scheduler's."""
        with self._lock:
            return list(self._live.values())

    def _finished(self, handle: NodeHandle) -> None:
        row = _cost_row(handle)
        with self._lock:
            self._live.pop(handle.attempt_id, None)
            if row is not None:
                self._costs.append(row)
                self._cost_total += row["cost"]
                self._cost_nodes += 1

    def cost_summary(self) -> list[dict]:
        """Per node with a known VM price: duration, $/h and cost (duration x price); the last
        ``COST_ROWS`` finished nodes, then those still running (so far)."""
        with self._lock:
            rows = list(self._costs)
            live = list(self._live.values())
        return rows + [row for row in map(_cost_row, live) if row is not None]

    def close(self, cancel: bool = True, timeout: Optional[float] = None) -> None:
        """End the run: cancel what still runs (or wait for it), then release its clusters.

        Every wait is bounded. ``cancel=True``: every unfinished node is asked to stop at once, and
        they are waited for together, at most ``timeout`` seconds (default ``CANCEL_WAIT_S``); nodes
        that did not stop are named in an error log, and their clusters go with the run's anyway.
        ``cancel=False``: the nodes are waited for, at most ``timeout`` seconds; without one, as long
        as the longest of their own ``timeout`` settings (plus ``CANCEL_WAIT_S`` to stop), or
        ``CLOSE_WAIT_S`` for a node without one. Nodes still running then are cancelled as above, the
        run's clusters are released, and ``NodeTimeout`` names them.
        """
        if self._closed:
            return
        self._closed = True
        late: list[NodeHandle] = []
        if cancel:
            self._cancel_all(self.handles, CANCEL_WAIT_S if timeout is None else timeout)
        else:
            pending = self.handles
            bound = self._close_bound(pending) if timeout is None else timeout
            late = self._wait_all(pending, bound, "still running {bound:g}s into close(cancel=False), cancelling them")
            if late:
                self._cancel_all(late, CANCEL_WAIT_S)
        self._log_costs()
        for backend in self._backends:
            backend.end_run(self.run_id)
        self._lease.release()
        if late:
            raise NodeTimeout(
                f"run {self.run_id}: node(s) {', '.join(repr(h.node) for h in late)} did not finish within {bound:g}s of close(cancel=False) and were cancelled"
            )

    @staticmethod
    def _close_bound(handles: list[NodeHandle]) -> float:
        """How long close(cancel=False) waits: the longest of the nodes' own timeouts still to run."""
        bound = 0.0
        now = time.time()
        for h in handles:
            if h.settings.timeout is None:
                bound = max(bound, CLOSE_WAIT_S)
            else:
                ran = now - h.started_at if h.started_at is not None else 0.0
                bound = max(bound, h.settings.timeout - ran + CANCEL_WAIT_S)
        return bound

    def _cancel_all(self, handles: list[NodeHandle], bound: float) -> None:
        """Ask every node to stop at once, then wait once for all of them, at most ``bound`` seconds."""
        handles = [h for h in handles if not h.done()]
        for handle in handles:
            handle.request_cancel()
        self._wait_all(handles, bound, "did not stop within {bound:g}s of being cancelled; their clusters are removed with the run")

    def _wait_all(self, handles: list[NodeHandle], bound: float, unfinished: str) -> list[NodeHandle]:
        """One wait for all the nodes, at most ``bound`` seconds: those still unfinished, named in an error log."""
        wait_futures([h._future for h in handles], timeout=bound)
        late = [h for h in handles if not h.done()]
        if late:
            names = ", ".join(f"{h.node} (cluster {h.cluster})" for h in late)
            log.error("run %s: %d node(s) %s: %s", self.run_id, len(late), unfinished.format(bound=bound), names)
        return late

    def _log_costs(self) -> None:
        with self._lock:
            rows, finished, total = list(self._costs), self._cost_nodes, self._cost_total
            live = list(self._live.values())
        running = [row for row in map(_cost_row, live) if row is not None]
        if not rows and not running:
            return
        lines = [f"  {r['node']:<24} {r['cluster']:<40} {r['duration_s']:>8.1f}s x ${r['hourly_price']:.4f}/h = ${r['cost']:.6f}" for r in rows + running]
        total += sum(r["cost"] for r in running)
        shown = "" if finished <= len(rows) else f" (the last {len(rows)} of {finished} finished nodes listed)"
        log.info("skyvm cost summary of run %s%s:\n%s\n  total $%.6f", self.run_id, shown, "\n".join(lines), total)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close(cancel=True)


def _cost_row(h: NodeHandle) -> Optional[dict]:
    cost = h.cost
    if cost is None:
        return None
    return {"node": h.node, "cluster": h.cluster, "duration_s": round(h.duration_s or 0, 1), "hourly_price": h.hourly_price, "cost": round(cost, 6)}


def teardown(node: Union["NodeHandle", "DetachedNode", "Run", None]) -> None:
    """One teardown for every path (success, failure, kill, a deferred wait's end):
    stop the node if it still runs, then release its cluster per ``down``. Safe to call twice."""
    if node is None:
        return
    if isinstance(node, DetachedNode):
        if not node.status().state.finished:
            node.cancel()
        node.release()
    elif isinstance(node, NodeHandle):
        try:
            node.cancel()
        finally:  # a stop that failed still ends the run and releases its clusters
            node.run.close(cancel=True)
    elif isinstance(node, Run):
        node.close(cancel=True)
    else:
        raise TypeError(f"cannot tear down {type(node).__name__}")


_default_run: Optional[Run] = None
_default_lock = threading.Lock()


def default_run() -> Run:
    global _default_run
    with _default_lock:
        if _default_run is None or _default_run._closed:
            _default_run = Run()
            atexit.register(_default_run.close)
        return _default_run


def submit(
    fn: Callable,
    *args: Any,
    node: Optional[str] = None,
    settings: Union[None, str, os.PathLike, Mapping[str, Any], SkyVMConfig] = None,
    profile: Optional[str] = None,
    options: Optional[Mapping[str, Any]] = None,
    **kwargs: Any,
) -> NodeHandle:
    """Run ``fn(*args, **kwargs)`` as a node of the process's default run.

    ``settings`` is the shared settings file (a path, a dict shaped like it,
    or a SkyVMConfig); ``options`` are this call's settings, above the file's.
    """
    run = default_run()
    node = node or getattr(fn, "__name__", "node")
    config = run.config if settings is None else as_config(settings)
    resolved = config.resolve(node, profile=profile, code=options)
    return run.start_call(node, resolved, fn, args, kwargs)
