"""The SkyPilot backend: each node's TaskSpec goes to a VM that SkyPilot picks and provisions.

The same cluster policy as the local backend: a free warm cluster of the
node's signature is reused (``exec``), else a new one is launched (``launch``
with autostop/down/retry_until_up); nodes running at once get separate
clusters up to ``max_clusters`` per signature; clusters of a run with ``down:
true`` are torn down when the run ends. Spot nodes with ``job_recovery`` run
as managed jobs, so SkyPilot recovers preemptions and they never reach the
engine's retries. Nodes with ``pool:`` run as managed jobs on a SkyPilot pool
of their signature (made once per run, or the team's named one): its warm
workers start a node in seconds where a new VM takes minutes; a run's own pool
goes with the run when ``down``. A node is done only when its job is: the exit code of
``tail_logs`` is checked, never ignored. Every call to SkyPilot goes through
the bridge (``skyvm.skypilot.bridge``).
"""

from __future__ import annotations

import atexit
import logging
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, NoReturn, Optional

from skyvm.backends.base import Backend, JobState, JobStatus, LogSink, NodeRef
from skyvm.errors import InfrastructureError, NodeCancelled
from skyvm.plan import TaskSpec, pool_name
from skyvm.pool import ClusterPool
from skyvm.settings import NodeSettings
from skyvm.skypilot.bridge import FAILED_JOB_EXIT, SkyBridge, get_bridge
from skyvm.skypilot.credentials import CredentialSet, credential_set
from skyvm.skypilot.placing import cap_refusal, place
from skyvm.skypilot.task_config import pool_job_config, pool_task_config, task_config

log = logging.getLogger("skyvm.skypilot")

# How often a node waiting for its cluster to provision looks at its cancel flag.
CANCEL_POLL_S = 0.25
_DONE_OK = {"SUCCEEDED"}
_DONE_BAD = {"FAILED", "FAILED_SETUP", "FAILED_DRIVER", "FAILED_PRECHECKS", "FAILED_NO_RESOURCE", "FAILED_CONTROLLER", "CANCELLED", "CANCELLING"}


def is_managed(spec: TaskSpec) -> bool:
    """Spot with a recovery strategy: a SkyPilot managed job, so preemptions are SkyPilot's to recover."""
    s = spec.settings
    return bool(s.use_spot) and s.job_recovery is not None and str(s.job_recovery).upper() != "NONE"


class SkyPilotBackend(Backend):
    name = "skypilot"
    needs_image = True
    # A SkyPilot job is polled (status and log) by the process's watcher: no thread per node.
    poll_s = 2.0

    def __init__(self, bridge: Optional[SkyBridge] = None, credentials: Optional[CredentialSet] = None):
        self._bridge = bridge
        # The connectors this backend's SkyPilot process launches with (None: SkyPilot's own).
        self.credentials = credentials
        self._lock = threading.Lock()
        self.pool = ClusterPool()
        # SkyPilot pools this process made or found, by name: the runs using them, and whether the
        # last run's end takes them down (a per-run pool with down: true; never a shared one).
        self._pools: dict[str, dict] = {}
        self._pool_locks: dict[str, threading.Lock] = {}
        # max_hourly_cost verdicts by signature (None: within the cap): asked once, not at every exec.
        self._cap_verdicts: dict[str, Optional[str]] = {}

    @property
    def bridge(self) -> SkyBridge:
        with self._lock:  # nodes start in parallel threads: one bridge (one SkyPilot-side process) for all
            if self._bridge is None:
                self._bridge = get_bridge(env=self.credentials.environment() if self.credentials else None)
            elif self.credentials is not None:
                # A long-lived worker or scheduler outlives minted keys: renewed in place before they
                # expire (the set's timer does it too, when nothing calls SkyPilot for a while).
                self.credentials.renew_if_due()
            return self._bridge

    def close(self) -> None:
        """This credential set's bridge, its own local API server and its private files go (at exit)."""
        with self._lock:
            bridge, self._bridge = self._bridge, None
        if bridge is not None and self.credentials is not None:
            try:
                bridge.api_stop()
            except Exception as exc:  # noqa: BLE001 - a server that never started, or a stand-in without one
                log.debug("stopping the API server of %s: %s", self.credentials.names, exc)
        if bridge is not None and hasattr(bridge, "close"):
            bridge.close()
        if self.credentials is not None:
            self.credentials.close()

    # -- launch --------------------------------------------------------------

    def _task(self, spec: TaskSpec) -> dict:
        # spec.registry_auth was minted for this attempt: fresh for every launch and exec (tokens expire).
        return task_config(spec)

    def launch(self, spec: TaskSpec, *, on_log: Optional[LogSink] = None, cancelled=None, follow: bool = True) -> NodeRef:
        task = self._task(spec)
        base = dict(backend=self.name, attempt_id=spec.attempt_id, node=spec.node, run_id=spec.run_id)
        self._check_cost_cap(spec, task)
        if spec.settings.pool is not None:
            return self._launch_on_pool(spec, base, on_log, follow)
        if is_managed(spec):
            job_id = self.bridge.jobs_launch(task, spec.cluster_name, on_log=on_log)["job_id"]
            log.info("node %s: managed job %s", spec.node, job_id)
            return NodeRef(cluster=f"managed-job-{job_id}", job_id=job_id, managed=True, **base)
        if not follow:
            # Nobody in this process waits on it: a cluster of its own, never a warm one another process may hold.
            cluster = spec.cluster_name_for(0)
            try:
                answer, placement = self._launch_fresh(spec, task, cluster, on_log)
            except BaseException as exc:
                _raise_infra(spec, cluster, exc)
            return NodeRef(cluster=cluster, job_id=answer["job_id"], fresh=True, hourly_price=placement.get("hourly_price"), extra={"detached": True}, **base)
        cluster, fresh = self.pool.acquire(spec, cancelled=cancelled)
        try:
            if fresh:
                answer, cluster.placement = self._provision(spec, cluster.name, cancelled, lambda: self._launch_fresh(spec, task, cluster.name, on_log))
            else:
                answer = self.bridge.exec(task, cluster.name, on_log=on_log)
        except BaseException as exc:
            if fresh:  # torn down (or never made): not a warm cluster a later node may exec on
                self.pool.forget(cluster.name)
            else:
                self.pool.free(cluster.name)
            _raise_infra(spec, cluster.name, exc)
        return NodeRef(cluster=cluster.name, job_id=answer["job_id"], fresh=fresh, hourly_price=cluster.placement.get("hourly_price"), **base)

    def _launch_on_pool(self, spec: TaskSpec, base: dict, on_log: Optional[LogSink], follow: bool = True) -> NodeRef:
        """The node as a managed job on its signature's pool: warm workers that already pulled the
        image start it in seconds, where a fresh VM takes minutes. The pool is made once per
        signature and run (or found, when shared or made by another process of the run)."""
        name = pool_name(spec.settings, spec.signature, spec.run_id)
        try:
            self._ensure_pool(spec, name, on_log)
            job_id = self.bridge.jobs_launch(pool_job_config(spec, name), spec.cluster_name, on_log=on_log, pool=name)["job_id"]
        except BaseException as exc:
            _raise_infra(spec, f"pool {name}", exc)
        log.info("node %s: managed job %s on pool %s", spec.node, job_id, name)
        if on_log:
            on_log(f"skyvm: {spec.node} runs as managed job {job_id} on pool {name}")
        extra = {"pool": name}
        if not follow:
            # Nobody in this process ends the run (an Airflow task deferred): the attempt's release
            # takes the run's own pool down instead, as it would a detached node's own cluster.
            extra.update(detached=True, own_pool=not spec.settings.pool.shared)
        return NodeRef(cluster=name, job_id=job_id, managed=True, extra=extra, **base)

    def _ensure_pool(self, spec: TaskSpec, name: str, on_log: Optional[LogSink]) -> None:
        pool = spec.settings.pool
        with self._lock:
            lock = self._pool_locks.setdefault(name, threading.Lock())
        with lock:  # nodes of one signature start in parallel: one pool_apply among them
            known = self._pools.get(name)
            if known is None:
                if not self.bridge.pool_status([name]):
                    line = f"skyvm: making pool {name} ({pool.workers} worker(s)) for node {spec.node}"
                    log.info(line)
                    if on_log:
                        on_log(line)
                    self.bridge.pool_apply(pool_task_config(spec, name, pool.workers), name, on_log=on_log)
                known = self._pools[name] = {"runs": set(), "down": spec.settings.down and not pool.shared}
            known["runs"].add(spec.run_id)

    def _provision(self, spec: TaskSpec, cluster_name: str, cancelled, launch: Callable[[], tuple]) -> tuple:
        """Provisioning can take as long as a cloud does: a cancel meanwhile tears the half-made cluster
        down now and returns, rather than after ``sky.launch`` does. The abandoned launch runs on in
        its thread; whatever it made by the time it ends is torn down too."""
        if cancelled is None:
            return launch()
        done: Future = Future()

        def provision() -> None:
            try:
                done.set_result(launch())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting node below
                done.set_exception(exc)

        threading.Thread(target=provision, daemon=True, name=f"skyvm-provision-{cluster_name}").start()
        while True:
            try:
                return done.result(timeout=CANCEL_POLL_S)
            except FutureTimeout:
                if cancelled():
                    break
        self._down(cluster_name)
        # A launch that got through in spite of the down left a VM: it goes as soon as the launch returns.
        done.add_done_callback(lambda f: f.exception() is None and self._down(cluster_name))
        raise NodeCancelled(f"node {spec.node!r} was cancelled while its cluster {cluster_name} was provisioning; the cluster is torn down")

    def _check_cost_cap(self, spec: TaskSpec, task: dict) -> None:
        """max_hourly_cost: refuse the node before anything is provisioned when its cheapest feasible
        placement costs more; the judgement ``skyvm plan`` prints (placing.judge), from SkyPilot's
        optimizer on its catalogs. The cap also goes to SkyPilot itself (resources.max_hourly_cost)."""
        if spec.settings.max_hourly_cost is None:
            return
        with self._lock:
            known = spec.signature in self._cap_verdicts
        if not known:
            resources = {k: v for k, v in task["resources"].items() if k != "labels"}  # one answer per signature, not per node
            (row,) = place(self.bridge, [resources])
            with self._lock:
                self._cap_verdicts[spec.signature] = cap_refusal(row)
        refusal = self._cap_verdicts[spec.signature]
        if refusal:
            raise InfrastructureError(f"node {spec.node!r}: {refusal}; raise max_hourly_cost or ask for less")

    def _launch_fresh(self, spec: TaskSpec, task: dict, cluster_name: str, on_log: Optional[LogSink]) -> tuple[dict, dict]:
        """``sky.launch`` on a new cluster: SkyPilot's answer and where it landed. A failed launch
        tears down what was half-made: never a VM left behind."""
        s = spec.settings
        # SkyPilot's own autostop form, when given, lives in the task's resources: launch arguments would override it.
        idle, down = (None, False) if s.autostop is not None else (s.idle_minutes_to_autostop, s.down)
        options = {"options": dict(s.skypilot["launch"])} if s.skypilot.get("launch") else {}
        try:
            answer = self.bridge.launch(task, cluster_name, idle_minutes_to_autostop=idle, down=down, retry_until_up=s.retry_until_up, on_log=on_log, **options)
        except BaseException:
            self._down(cluster_name)
            raise
        placement = {k: answer[k] for k in ("cloud", "region", "zone", "instance_type", "use_spot", "hourly_price") if k in answer}
        if placement:
            line = (
                f"skyvm: {spec.node} launched {cluster_name} on {placement.get('cloud')} {placement.get('region')} "
                f"{placement.get('instance_type')}{' (spot)' if placement.get('use_spot') else ''} at ${placement.get('hourly_price', 0):.4f}/h"
            )
            log.info(line)
            if on_log:
                on_log(line)
        return answer, placement

    # -- following -------------------------------------------------------------

    def _job_status(self, ref: NodeRef) -> Optional[str]:
        if ref.managed:
            return self.bridge.jobs_status(ref.job_id).get("status")
        return self.bridge.job_status(ref.cluster, ref.job_id)

    def _exit_code(self, ref: NodeRef) -> int:
        if ref.managed:
            return self.bridge.jobs_logs(ref.job_id, on_log=lambda _line: None, follow=False)
        return self.bridge.tail_logs(ref.cluster, ref.job_id, on_log=lambda _line: None, follow=False)

    def status(self, ref: NodeRef) -> JobStatus:
        try:
            status = self._job_status(ref)
        except InfrastructureError as exc:
            if "ClusterDoesNotExist" in str(exc) or "does not exist" in str(exc):
                return JobStatus(JobState.GONE, None, f"cluster {ref.cluster} is gone: {exc}")
            raise  # anything else may pass (a busy API server): the caller retries
        if status is None:
            return JobStatus(JobState.GONE, None, f"cluster {ref.cluster} has no job {ref.job_id}")
        if status in ("CANCELLED", "CANCELLING"):
            return JobStatus(JobState.CANCELLED, None, status)
        if status in _DONE_OK:
            # The job's status alone decides nothing: tail_logs' exit code must agree (never ignore it).
            code = self._exit_code(ref)
            if code == 0:
                return JobStatus(JobState.SUCCEEDED, 0, status)
            return JobStatus(JobState.FAILED, code or FAILED_JOB_EXIT, f"job status {status} but tail_logs exit code {code}")
        if status in _DONE_BAD:
            return JobStatus(JobState.FAILED, FAILED_JOB_EXIT, f"job status {status}")
        return JobStatus(JobState.RUNNING, None, str(status))

    def read_log(self, ref: NodeRef, offset: int = 0) -> tuple[str, int]:
        """The job's log from ``offset`` (characters) on: what has not been shown yet."""
        lines: list[str] = []
        if ref.managed:
            self.bridge.jobs_logs(ref.job_id, on_log=lines.append, follow=False)
        else:
            self.bridge.tail_logs(ref.cluster, ref.job_id, on_log=lines.append, follow=False)
        text = "".join(line + "\n" for line in lines)
        return text[offset:], max(offset, len(text))

    def cancel(self, ref: NodeRef) -> None:
        if ref.managed:
            self.bridge.jobs_cancel(ref.job_id)
        else:
            self.bridge.cancel(ref.cluster, ref.job_id)

    def release(self, ref: NodeRef, down: bool, discard: bool = False) -> None:
        if ref.managed:
            if down and ref.extra.get("detached") and ref.extra.get("own_pool"):
                self._pool_down(ref.extra["pool"])
            return  # a managed job's cluster went with the job
        if not ref.extra.get("detached") and self.pool.get(ref.cluster) is not None:
            if not (discard and down):
                self.pool.free(ref.cluster)
                return
            # A cancelled node's VM goes now when down says so.
            self.pool.forget(ref.cluster)
        if down:
            self._down(ref.cluster)

    def end_run(self, run_id: str) -> None:
        """The run is over: tear down its ``down`` clusters, in parallel."""
        threads = [threading.Thread(target=self._down, args=(c.name,), daemon=True) for c in self.pool.end_run(run_id)]
        threads += [threading.Thread(target=self._pool_down, args=(name,), daemon=True) for name in self._pools_ending(run_id)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _pools_ending(self, run_id: str) -> list[str]:
        """The run is over: its ``down`` pools no other run of this process uses, forgotten."""
        with self._lock:
            doomed = []
            for name, known in list(self._pools.items()):
                if run_id in known["runs"]:
                    known["runs"].discard(run_id)
                    if known["down"] and not known["runs"]:
                        doomed.append(name)
                        del self._pools[name]
            return doomed

    def _pool_down(self, name: str) -> None:
        try:
            self.bridge.pool_down(name)
        except Exception as exc:  # noqa: BLE001 - report, do not hide the original error
            log.error("could not tear down pool %s: %s (run `sky jobs pool down %s`)", name, exc, name)

    def _down(self, name: str) -> None:
        try:
            self.bridge.down(name)
        except Exception as exc:  # noqa: BLE001 - report, do not hide the original error
            log.error("could not tear down cluster %s: %s (run `sky down %s`)", name, exc, name)


BUCKET_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://")


def missing_for_vms(settings: NodeSettings) -> list[tuple[str, str]]:
    """What a VM needs that a laptop does not, as (field, problem): a bucket store and a pullable image.

    Read from the settings alone, so the run refuses before it builds an image or uploads a payload.
    """
    problems = []
    store = settings.payload_store or "a local directory (the default)"
    if not store.startswith(BUCKET_SCHEMES):
        problems.append(
            ("payload_store", f"backend 'skypilot' needs a payload store the VM can reach; got {store}; "
             "set payload_store: s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX] or az://CONTAINER[/PREFIX]")
        )
    if settings.image is None and settings.registry is None:
        problems.append(
            ("registry", "a VM cannot pull skyvm's locally built node image; "
             "set registry: {server, username, password} to push it, or image: to one the VM can pull")
        )
    return problems


def _raise_infra(spec: TaskSpec, cluster: str, exc: BaseException) -> NoReturn:
    """Every failure to get a node running reaches the engine as an InfrastructureError (not a user failure)."""
    if isinstance(exc, (InfrastructureError, NodeCancelled)):
        raise exc
    raise InfrastructureError(f"node {spec.node!r}: SkyPilot could not run it on {cluster}: {exc}") from exc


_backend: Optional[SkyPilotBackend] = None
_backend_lock = threading.Lock()
# One backend (one SkyPilot process, one local API server state) per set of connectors.
_with_credentials: dict[str, SkyPilotBackend] = {}


def skypilot_backend(settings: Optional[NodeSettings] = None) -> SkyPilotBackend:
    global _backend
    creds = credential_set(settings) if settings is not None else None
    with _backend_lock:
        if creds is not None:
            if creds.key not in _with_credentials:
                _with_credentials[creds.key] = SkyPilotBackend(credentials=creds)
            return _with_credentials[creds.key]
        if _backend is None:
            _backend = SkyPilotBackend()
        return _backend


def all_backends() -> list[SkyPilotBackend]:
    with _backend_lock:
        return [b for b in [_backend, *_with_credentials.values()] if b is not None]


@atexit.register
def _close_credentialed() -> None:
    for backend in list(_with_credentials.values()):
        backend.close()
