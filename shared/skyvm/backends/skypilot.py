"""The SkyPilot backend: each node's TaskSpec goes to a VM that SkyPilot picks and provisions.

The same cluster policy as the local backend: a free warm cluster of the
node's signature is reused (``exec``), else a new one is launched (``launch``
with autostop/down/retry_until_up); nodes running at once get separate
clusters up to ``max_clusters`` per signature; clusters of a run with ``down:
true`` are torn down when the run ends. Spot nodes with ``job_recovery`` run
as managed jobs, so SkyPilot recovers preemptions and they never reach the
engine's retries. A node is done only when its job is: the exit code of
``tail_logs`` is checked, never ignored. Every call to SkyPilot goes through
the bridge (``skyvm.skypilot.bridge``).
"""

from __future__ import annotations

import atexit
import logging
import threading
from dataclasses import dataclass, field
from typing import NoReturn, Optional

from skyvm.backends.base import Job, JobState, JobStatus, LogSink
from skyvm.errors import InfrastructureError
from skyvm.plan import TaskSpec
from skyvm.settings import NodeSettings
from skyvm.skypilot.bridge import FAILED_JOB_EXIT, SkyBridge, get_bridge
from skyvm.skypilot.credentials import CredentialSet, credential_set
from skyvm.skypilot.task_config import task_config

log = logging.getLogger("skyvm.skypilot")

_DONE_OK = {"SUCCEEDED"}
_DONE_BAD = {"FAILED", "FAILED_SETUP", "FAILED_DRIVER", "FAILED_PRECHECKS", "FAILED_NO_RESOURCE", "FAILED_CONTROLLER", "CANCELLED", "CANCELLING"}


def is_managed(spec: TaskSpec) -> bool:
    """Spot with a recovery strategy: a SkyPilot managed job, so preemptions are SkyPilot's to recover."""
    s = spec.settings
    return bool(s.use_spot) and s.job_recovery is not None and str(s.job_recovery).upper() != "NONE"


@dataclass
class _Cluster:
    name: str
    signature: str
    down: bool
    busy: bool = False
    runs: set = field(default_factory=set)
    placement: dict = field(default_factory=dict)


class SkyPilotBackend:
    name = "skypilot"
    needs_image = True

    def __init__(self, bridge: Optional[SkyBridge] = None, credentials: Optional[CredentialSet] = None):
        self._bridge = bridge
        # The connectors this backend's SkyPilot process launches with (None: SkyPilot's own).
        self.credentials = credentials
        self._lock = threading.Lock()
        self._clusters: dict[str, _Cluster] = {}
        self._sems: dict[str, threading.BoundedSemaphore] = {}

    @property
    def bridge(self) -> SkyBridge:
        with self._lock:  # nodes start in parallel threads: one bridge (one SkyPilot-side process) for all
            if self._bridge is None:
                self._bridge = get_bridge(env=self.credentials.environment() if self.credentials else None)
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
        if not spec.payload_url.startswith(("s3://", "gs://", "gcs://", "az://", "abfs://")):
            raise InfrastructureError(
                f"node {spec.node!r}: backend 'skypilot' needs a payload store the VM can reach; "
                f"set payload_store: s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX] or az://CONTAINER[/PREFIX] (got {spec.payload_url.split('/payloads/')[0]})"
            )
        if spec.registry is None and spec.image.startswith("skyvm-node:"):
            raise InfrastructureError(
                f"node {spec.node!r}: a VM cannot pull the locally built image {spec.image}; "
                "set registry: {server, username, password_env} to push it, or image: to one the VM can pull"
            )
        # spec.registry_auth was minted for this attempt: fresh for every launch and exec (tokens expire).
        return task_config(spec)

    def launch(self, spec: TaskSpec, on_log: LogSink) -> Job:
        task = self._task(spec)
        if is_managed(spec):
            job_id = self.bridge.jobs_launch(task, spec.cluster_name, on_log=on_log)["job_id"]
            log.info("node %s: managed job %s", spec.node, job_id)
            job = Job(spec=spec, cluster=f"managed-job-{job_id}", backend_data={"managed": True, "job_id": job_id, "cancelled": False})
            self._follow(job, lambda: self.bridge.jobs_logs(job_id, on_log=on_log))
            return job
        cluster, fresh = self._acquire(spec)
        try:
            if fresh:
                answer, cluster.placement = self._launch_fresh(spec, task, cluster.name, on_log)
            else:
                answer = self.bridge.exec(task, cluster.name, on_log=on_log)
        except BaseException as exc:
            if fresh:
                with self._lock:  # torn down (or never made): not a warm cluster a later node may exec on
                    self._clusters.pop(cluster.name, None)
            self._release_cluster(cluster)
            _raise_infra(spec, cluster.name, exc)
        job = Job(
            spec=spec,
            cluster=cluster.name,
            backend_data={"managed": False, "job_id": answer["job_id"], "cancelled": False, "cluster_state": cluster, "hourly_price": cluster.placement.get("hourly_price")},
        )
        self._follow(job, lambda: self.bridge.tail_logs(cluster.name, answer["job_id"], on_log=on_log))
        return job

    def _launch_fresh(self, spec: TaskSpec, task: dict, cluster_name: str, on_log: Optional[LogSink]) -> tuple[dict, dict]:
        """``sky.launch`` on a new cluster: SkyPilot's answer and where it landed. A failed launch
        tears down what was half-made: never a VM left behind."""
        s = spec.settings
        try:
            answer = self.bridge.launch(task, cluster_name, idle_minutes_to_autostop=s.idle_minutes_to_autostop, down=s.down, retry_until_up=s.retry_until_up, on_log=on_log)
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

    def _follow(self, job: Job, tail) -> None:
        def run():
            try:
                job.backend_data["exit_code"] = tail()
            except Exception as exc:  # noqa: BLE001 - reported through check()
                job.backend_data["error"] = str(exc)
            finally:
                cluster = job.backend_data.get("cluster_state")
                if cluster is not None:
                    self._release_cluster(cluster)

        thread = threading.Thread(target=run, daemon=True, name=f"skyvm-sky-{job.spec.node}")
        job.backend_data["follower"] = thread
        thread.start()

    def _acquire(self, spec: TaskSpec) -> tuple[_Cluster, bool]:
        with self._lock:
            sem = self._sems.setdefault(spec.signature, threading.BoundedSemaphore(spec.settings.max_clusters))
        sem.acquire()
        with self._lock:
            for cluster in self._clusters.values():
                if cluster.signature == spec.signature and not cluster.busy:
                    cluster.busy = True
                    cluster.runs.add(spec.run_id)
                    return cluster, False
            slot = 0
            while spec.cluster_name_for(slot) in self._clusters:
                slot += 1
            cluster = _Cluster(spec.cluster_name_for(slot), spec.signature, spec.settings.down, busy=True, runs={spec.run_id})
            self._clusters[cluster.name] = cluster
            return cluster, True

    def _release_cluster(self, cluster: _Cluster) -> None:
        with self._lock:
            if not cluster.busy:
                return
            cluster.busy = False
        self._sems[cluster.signature].release()

    # -- check / terminate / release -------------------------------------------

    def check(self, job: Job) -> JobStatus:
        data = job.backend_data
        if data["follower"].is_alive():
            return JobStatus(JobState.RUNNING)
        if data["cancelled"]:
            return JobStatus(JobState.CANCELLED, data.get("exit_code"))
        if "error" in data:
            return JobStatus(JobState.FAILED, None, f"following the job failed: {data['error']}")
        code = data.get("exit_code")
        # tail_logs' exit code alone decides nothing: confirm with the job's own status.
        if data["managed"]:
            status = self.bridge.jobs_status(data["job_id"]).get("status")
        else:
            status = self.bridge.job_status(job.cluster, data["job_id"])
        if code == 0 and status in _DONE_OK:
            return JobStatus(JobState.SUCCEEDED, 0, status)
        return JobStatus(JobState.FAILED, code if code not in (None, 0) else FAILED_JOB_EXIT, f"job status {status}")

    def terminate(self, job: Job) -> None:
        data = job.backend_data
        data["cancelled"] = True
        if data["managed"]:
            self.bridge.jobs_cancel(data["job_id"])
        else:
            self.bridge.cancel(job.cluster, data["job_id"])
        data["follower"].join(timeout=60)
        cluster = data.get("cluster_state")
        if cluster is not None:
            self._release_cluster(cluster)
            if cluster.down:
                # A cancelled node's VM goes too when down says so.
                self._forget_and_down(cluster)

    def release(self, run_id: str) -> None:
        """The run is over: tear down its ``down`` clusters, in parallel."""
        with self._lock:
            mine = [c for c in self._clusters.values() if run_id in c.runs]
        threads = []
        for cluster in mine:
            cluster.runs.discard(run_id)
            if cluster.down and not cluster.runs and not cluster.busy:
                t = threading.Thread(target=self._forget_and_down, args=(cluster,), daemon=True)
                t.start()
                threads.append(t)
        for t in threads:
            t.join()

    def _forget_and_down(self, cluster: _Cluster) -> None:
        with self._lock:
            self._clusters.pop(cluster.name, None)
        self._down(cluster.name)

    # -- detached nodes (Airflow's deferrable mode: a trigger in another process polls) --------

    def launch_detached(self, spec: TaskSpec) -> dict:
        """Launch the node and return at once: where it runs and SkyPilot's job id, for the trigger.

        Nobody in this process waits on it, so it gets a cluster of its own (named for its run),
        never a warm one another process might hold.
        """
        task = self._task(spec)
        if is_managed(spec):
            job_id = self.bridge.jobs_launch(task, spec.cluster_name)["job_id"]
            return {"cluster": f"managed-job-{job_id}", "job_id": job_id, "managed": True}
        cluster = spec.cluster_name_for(0)
        try:
            answer, _placement = self._launch_fresh(spec, task, cluster, None)
        except BaseException as exc:
            _raise_infra(spec, cluster, exc)
        return {"cluster": cluster, "job_id": answer["job_id"], "managed": False, "hourly_price": answer.get("hourly_price")}

    def detached_status(self, ref: dict) -> JobStatus:
        if ref.get("managed"):
            status = self.bridge.jobs_status(ref["job_id"]).get("status")
        else:
            try:
                status = self.bridge.job_status(ref["cluster"], ref["job_id"])
            except InfrastructureError as exc:
                return JobStatus(JobState.FAILED, None, f"cluster {ref['cluster']} is gone or unreachable: {exc}")
        if status in _DONE_OK:
            return JobStatus(JobState.SUCCEEDED, 0, status)
        if status in ("CANCELLED", "CANCELLING"):
            return JobStatus(JobState.CANCELLED, None, status)
        if status in _DONE_BAD:
            return JobStatus(JobState.FAILED, FAILED_JOB_EXIT, f"job status {status}")
        if status is None:
            return JobStatus(JobState.FAILED, None, f"cluster {ref['cluster']} has no job {ref['job_id']}")
        return JobStatus(JobState.RUNNING, None, str(status))

    def detached_log(self, ref: dict, offset: int = 0) -> tuple[str, int]:
        """The job's log from ``offset`` (characters) on: what the trigger has not shown yet."""
        lines: list[str] = []
        try:
            if ref.get("managed"):
                self.bridge.jobs_logs(ref["job_id"], on_log=lines.append, follow=False)
            else:
                self.bridge.tail_logs(ref["cluster"], ref["job_id"], on_log=lines.append, follow=False)
        except InfrastructureError:
            return "", offset
        text = "".join(line + "\n" for line in lines)
        return text[offset:], max(offset, len(text))

    def detached_cancel(self, ref: dict) -> None:
        if ref.get("managed"):
            self.bridge.jobs_cancel(ref["job_id"])
        else:
            self.bridge.cancel(ref["cluster"], ref["job_id"])

    def detached_release(self, ref: dict, down: bool) -> None:
        """The node is over: its own cluster goes when ``down`` says so (a managed job's went with the job)."""
        if down and not ref.get("managed"):
            self._down(ref["cluster"])

    def _down(self, name: str) -> None:
        try:
            self.bridge.down(name)
        except Exception as exc:  # noqa: BLE001 - report, do not hide the original error
            log.error("could not tear down cluster %s: %s (run `sky down %s`)", name, exc, name)


def _raise_infra(spec: TaskSpec, cluster: str, exc: BaseException) -> NoReturn:
    """Every failure to get a node running reaches the engine as an InfrastructureError (not a user failure)."""
    if isinstance(exc, InfrastructureError):
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
