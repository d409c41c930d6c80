"""The engine-neutral API the adapters use: submit a call or a command as a node, get a handle.

    import skyvm
    handle = skyvm.submit(train, data, node="train", options={"cpus": 2, "memory": 4})
    handle.result()      # the return value, or raises NodeFailed / InfrastructureError
    handle.logs()        # the node's stdout and stderr so far
    handle.cancel()      # stop it; its cluster goes per `down`

A ``Run`` groups nodes (one flow run, one DAG run): clusters are shared by
signature within it, and ``Run.close()`` tears down its ``down: true``
clusters. ``skyvm.submit`` uses one default run per process, closed at exit.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Mapping, Optional, Union

import cloudpickle

from skyvm import node as node_runtime
from skyvm import redact
from skyvm.connectors.base import DEFAULT_NODE_TTL_S
from skyvm.backends.base import JobState, JobStatus, NodeRef
from skyvm.errors import InfrastructureError, NodeCancelled, NodeFailed, NodeTimeout, PayloadError, SettingsError, SkyVMError
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


def backend_for(settings: NodeSettings):
    if settings.backend == "local":
        from skyvm.backends.local import local_backend

        return local_backend()
    from skyvm.backends.skypilot import skypilot_backend

    return skypilot_backend(settings)


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
# How long cancel() waits for a node to stop before it says so.
CANCEL_WAIT_S = 60.0
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


class NodeHandle:
    """A submitted node: ``result()``, ``logs()``, ``cancel()``, ``done()``."""

    def __init__(self, run: "Run", node: str, settings: NodeSettings, payload: bytes, on_log: Optional[Callable[[str], None]]):
        self.run = run
        self.node = node
        self.settings = settings
        self.attempt_id = new_attempt_id(node)
        self._payload = payload
        self._on_log = on_log
        self._lines: list[str] = []
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
        return "\n".join(self._lines)

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

    def cancel(self, wait_s: float = CANCEL_WAIT_S) -> bool:
        """Stop the node, in whatever phase it is: queued, building, provisioning or running.

        A node cancelled before it started never starts. Returns False when it had already
        finished; raises InfrastructureError when it did not stop within ``wait_s``.
        """
        if self._future.done():
            return False
        self.request_cancel()
        if not self.wait(wait_s):
            raise InfrastructureError(f"node {self.node!r} did not stop within {wait_s:g}s of being cancelled (cluster {self.cluster})")
        return True

    def request_cancel(self) -> None:
        """Ask the node to stop without waiting (Run.close asks them all, then waits)."""
        self._cancel.set()
        with self._phase_lock:
            if not self._launching:
                self._fail(NodeCancelled(f"node {self.node!r} was cancelled before it started"))
        from skyvm.pool import wake_all

        wake_all()  # a node queued for a cluster looks at its flag now
        self._stop_attempt()

    # -- the node's life ------------------------------------------------------

    def _log(self, line: str) -> None:
        # A node that prints a credential it was given must not put it in the engine's log.
        line = redact.redact(line)
        self._lines.append(line)
        if self._on_log and self.settings.stream_logs:
            self._on_log(line)

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
            self._store, spec = prepare(self.run.run_id, self.node, self.attempt_id, s, self._payload, backend)
            self.spec = spec
            with self._phase_lock:
                if self._cancel.is_set():
                    raise NodeCancelled(f"node {self.node!r} was cancelled before it started")
                self._launching = True
            self.started_at = time.time()
            self.ref = ref = backend.launch(spec, on_log=self._log, cancelled=self._cancel.is_set)
        except BaseException as exc:  # noqa: BLE001 - everything is reported through the future
            self._fail(exc)
            return
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
        finisher().submit(self._complete, status)

    def _complete(self, status) -> None:
        ref, backend, s = self.ref, self._backend, self.settings
        if self._deadline is not None:
            watcher().cancel_deadline(self._deadline)
        try:
            backend.release(ref, s.down, discard=self._cancel.is_set() or self._timed_out)
        except Exception as exc:  # noqa: BLE001 - the node's own outcome matters more
            log.warning("releasing cluster %s: %s", ref.cluster, exc)
        self.finished_at = time.time()
        try:
            if self._timed_out:
                raise NodeTimeout(f"node {self.node!r} exceeded its timeout of {s.timeout:g}s and was cancelled")
            if self._cancel.is_set() and status.state is not JobState.SUCCEEDED:
                raise NodeCancelled(f"node {self.node!r} was cancelled")
            outcome = read_outcome(self._store, self.spec.result_url, status, self.node, ref.cluster, self._lines[-30:])
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
        return backend_for(self.settings)

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
        self.handles: list[NodeHandle] = []
        self._backends: set = set()
        self._closed = False
        from skyvm.backends.local import run_lease

        run_lease(self.run_id).write_text(json.dumps({"pid": os.getpid(), "started": time.time()}))

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
        self.handles.append(handle)
        return handle

    def cost_summary(self) -> list[dict]:
        """Per node with a known VM price: duration, $/h and cost (duration x price)."""
        return [
            {"node": h.node, "cluster": h.cluster, "duration_s": round(h.duration_s or 0, 1), "hourly_price": h.hourly_price, "cost": round(h.cost, 6)}
            for h in self.handles
            if h.cost is not None
        ]

    def close(self, cancel: bool = True) -> None:
        """End the run: cancel what still runs (or wait for it), then release its clusters."""
        if self._closed:
            return
        self._closed = True
        if cancel:
            for handle in self.handles:
                if not handle.done():
                    handle.request_cancel()
            for handle in self.handles:
                if not handle.wait(CANCEL_WAIT_S):
                    log.error("node %s did not stop within %gs of being cancelled (cluster %s)", handle.node, CANCEL_WAIT_S, handle.cluster)
        else:
            for handle in self.handles:
                handle.wait()
        summary = self.cost_summary()
        if summary:
            lines = [f"  {r['node']:<24} {r['cluster']:<40} {r['duration_s']:>8.1f}s x ${r['hourly_price']:.4f}/h = ${r['cost']:.6f}" for r in summary]
            total = sum(r["cost"] for r in summary)
            log.info("skyvm cost summary of run %s:\n%s\n  total $%.6f", self.run_id, "\n".join(lines), total)
        for backend in self._backends:
            backend.end_run(self.run_id)
        from skyvm.backends.local import run_lease

        run_lease(self.run_id).unlink(missing_ok=True)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close(cancel=True)


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
        node.cancel()
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
