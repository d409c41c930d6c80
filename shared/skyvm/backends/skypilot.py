"""The SkyPilot backend: each node's TaskSpec goes to a VM that SkyPilot picks and provisions.

Which cluster a node gets is the core pool's (``skyvm.pool``); this backend starts
clusters (``launch`` with autostop/down/retry_until_up, the node's attempt in the same
call), execs attempts on warm ones, and tears them down. Spot nodes with ``job_recovery``
run as managed jobs (no cluster of ours: NONE), so SkyPilot recovers preemptions and they
never reach the engine's retries. Nodes with ``pool:`` run as managed jobs on a SkyPilot
pool of their signature (a SHARED cluster: made once per run, or the team's named one):
its warm workers start a node in seconds where a new VM takes minutes. A node is done only
when its job is: the exit code of ``tail_logs`` is checked, never ignored. Every call to
SkyPilot goes through the bridge (``skyvm.skypilot.bridge``).

A cluster of skyvm's image runs an agent (started by the launch's setup): warm nodes go to it over
the cluster's one SSH connection, not as SkyPilot jobs (``skyvm.skypilot.agents``); a cluster
without SSH access, a key or an answering agent gets ``sky exec``.

Holds: ``SkyPilotBackend``, ``missing_for_vms``; ``skypilot_backend`` and
``all_backends`` (the registry's, re-exported).
May import: skyvm.backends.base, skyvm.skypilot.*, skyvm.plan, skyvm.settings, skyvm.clouds,
skyvm.errors (never the pool or the API).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, NoReturn, Optional

from skyvm.backends.agent_channel import INLINE_PAYLOAD_MAX, agent_dir
from skyvm.backends.base import NONE, OWN, SHARED, Backend, JobState, JobStatus, LogSink, NodeRef, store_pending_payload
from skyvm.clouds import BUCKET_PREFIXES
from skyvm.errors import InfrastructureError, NodeCancelled
from skyvm.plan import TaskSpec, pool_name
from skyvm.settings import NodeSettings
from skyvm.skypilot.bridge import FAILED_JOB_EXIT, SkyBridge, get_bridge
from skyvm.skypilot.agent_setup import agent_applies, managed, with_agent
from skyvm.skypilot.agents import VIA_AGENT, ClusterAgents, needs_forward
from skyvm.skypilot.credentials import CredentialSet
from skyvm.skypilot.placing import cap_refusal, place
from skyvm.skypilot.task_config import pool_job_config, pool_task_config, task_config

log = logging.getLogger("skyvm.skypilot")

# How often a node waiting for its cluster to provision looks at its cancel flag.
CANCEL_POLL_S = 0.25
_DONE_OK = {"SUCCEEDED"}
_DONE_BAD = {"FAILED", "FAILED_SETUP", "FAILED_DRIVER", "FAILED_PRECHECKS", "FAILED_NO_RESOURCE", "FAILED_CONTROLLER", "CANCELLED", "CANCELLING"}


class SkyPilotBackend(Backend):
    name = "skypilot"
    needs_image = True
    # A SkyPilot job is polled (status and log) by the process's watcher: no thread per node.
    poll_s = 2.0
    # A warm node's payload goes inline to its cluster's agent: stored only for a launch, an exec or a managed job.
    inline_payload_max = INLINE_PAYLOAD_MAX

    def __init__(self, bridge: Optional[SkyBridge] = None, credentials: Optional[CredentialSet] = None):
        self._bridge = bridge
        # The connectors this backend's SkyPilot process launches with (None: SkyPilot's own).
        self.credentials = credentials
        self._lock = threading.Lock()
        self._over: set[tuple] = set()  # jobs a status call found over (cluster, job id, managed)
        # Where each cluster this process launched landed (its price goes with every attempt on it).
        self._placements: dict[str, dict] = {}
        # max_hourly_cost verdicts by signature (None: within the cap): asked once, not at every exec.
        self._cap_verdicts: dict[str, Optional[str]] = {}
        # The clusters' agents over SSH: warm nodes with no SkyPilot job.
        self._agents = ClusterAgents(lambda: self.bridge)

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
        self._agents.close()
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

    def check(self, spec: TaskSpec) -> None:
        self._check_cost_cap(spec, self._task(spec))

    def cluster_kind(self, spec: TaskSpec) -> str:
        if spec.settings.pool is not None:
            return SHARED
        return NONE if managed(spec.settings) else OWN

    def shared_name(self, spec: TaskSpec) -> str:
        return pool_name(spec.settings, spec.signature, spec.run_id)

    def start_cluster(self, spec: TaskSpec, name: str, *, on_log: Optional[LogSink] = None) -> None:
        """A node's SkyPilot pool (made when SkyPilot has none of that name), or a cluster with no attempt."""
        try:
            if spec.settings.pool is None:
                self._launch_fresh(spec, {**self._task(spec), "run": None}, name, on_log)
            elif not self.bridge.pool_status([name]):
                pool = spec.settings.pool
                line = f"skyvm: making pool {name} ({pool.workers} worker(s)) for node {spec.node}"
                log.info(line)
                if on_log:
                    on_log(line)
                self.bridge.pool_apply(pool_task_config(spec, name, pool.workers), name, on_log=on_log)
        except BaseException as exc:
            _raise_infra(spec, f"pool {name}" if spec.settings.pool is not None else name, exc)

    def run_attempt(self, spec: TaskSpec, cluster: Optional[str], *, fresh: bool = False, on_log: Optional[LogSink] = None, cancelled=None) -> NodeRef:
        base = dict(backend=self.name, attempt_id=spec.attempt_id, node=spec.node, run_id=spec.run_id)
        if spec.settings.pool is not None or cluster is None:
            store_pending_payload(spec)  # a managed job's node reads it from the store
        if spec.settings.pool is not None:
            return self._run_on_pool(spec, cluster, base, on_log)
        task = self._task(spec)
        if cluster is None:
            job_id = self.bridge.jobs_launch(task, spec.cluster_name, on_log=on_log)["job_id"]
            log.info("node %s: managed job %s", spec.node, job_id)
            return NodeRef(cluster=f"managed-job-{job_id}", job_id=job_id, managed=True, **base)
        try:
            # A node that reaches the launcher's loopback (a local Prefect API) does so only through the cluster's
            # SSH connection: on a fresh cluster too, it goes to the agent once the launch (setup only) is done.
            through_agent = not fresh or (needs_forward(spec) and agent_applies(task))
            if fresh:
                if not through_agent:
                    store_pending_payload(spec)  # the launch's own job reads it from the store
                launched = {**task, "run": None} if through_agent else task
                answer, placement = self._provision(spec, cluster, cancelled, lambda: self._launch_fresh(spec, launched, cluster, on_log))
                with self._lock:
                    self._placements[cluster] = placement
            if through_agent:
                ref = self._agents.dispatch(spec, cluster, on_log)
                if ref is None:
                    store_pending_payload(spec)  # sky exec's job reads it from the store
                answer = None if ref is not None else self.bridge.exec(task, cluster, on_log=on_log)
        except BaseException as exc:
            _raise_infra(spec, cluster, exc)
        with self._lock:
            price = self._placements.get(cluster, {}).get("hourly_price")
        if answer is None:
            return dataclasses.replace(ref, hourly_price=price, fresh=fresh)
        return NodeRef(cluster=cluster, job_id=answer["job_id"], fresh=fresh, hourly_price=price, **base)

    def _run_on_pool(self, spec: TaskSpec, name: str, base: dict, on_log: Optional[LogSink]) -> NodeRef:
        """The node as a managed job on its signature's pool: warm workers that already pulled the
        image start it in seconds, where a fresh VM takes minutes."""
        try:
            job_id = self.bridge.jobs_launch(pool_job_config(spec, name), spec.cluster_name, on_log=on_log, pool=name)["job_id"]
        except BaseException as exc:
            _raise_infra(spec, f"pool {name}", exc)
        log.info("node %s: managed job %s on pool %s", spec.node, job_id, name)
        if on_log:
            on_log(f"skyvm: {spec.node} runs as managed job {job_id} on pool {name}")
        return NodeRef(cluster=name, job_id=job_id, managed=True, extra={"pool": name}, **base)

    def clusters(self, signature: Optional[str] = None, running: bool = False) -> list[dict]:
        """skyvm's SkyPilot clusters (their labels say whose), as ``skyvm status --skypilot`` lists them."""
        from skyvm.skypilot.clusters import skyvm_clusters

        rows = skyvm_clusters(self.bridge)
        if running:
            rows = [r for r in rows if str(r.get("state", "")).upper() == "UP"]
        return rows

    def remove_cluster(self, name: str, *, shared: bool = False) -> None:
        with self._lock:
            self._placements.pop(name, None)
        if shared:
            self._pool_down(name)
        else:
            self._down(name)

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
            answer = self.bridge.launch(with_agent(task, cluster_name, s.payload_store), cluster_name, idle_minutes_to_autostop=idle, down=down, retry_until_up=s.retry_until_up, on_log=on_log, **options)
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
        status = self.bridge.jobs_status(ref.job_id).get("status") if ref.managed else self.bridge.job_status(ref.cluster, ref.job_id)
        if status in _DONE_OK or status in _DONE_BAD:
            self._over.add((ref.cluster, ref.job_id, ref.managed))  # its next read_log waits for the log's end
        return status

    def _exit_code(self, ref: NodeRef) -> int:
        if ref.managed:
            return self.bridge.jobs_logs(ref.job_id, on_log=lambda _line: None, follow=False)
        return self.bridge.tail_logs(ref.cluster, ref.job_id, on_log=lambda _line: None, follow=False)

    def watch(self, ref: NodeRef, on_log: LogSink, on_exit) -> bool:
        return _via_agent(ref) and self._agents.watch(ref, on_log, on_exit)

    def result_bytes(self, ref: NodeRef) -> Optional[bytes]:
        """A node its cluster's agent ran left its result on the cluster: read over the SSH connection."""
        return self._agents.result(ref) if _via_agent(ref) else None

    def let_go(self, ref: NodeRef) -> None:
        if _via_agent(ref):
            self._agents.let_go(ref)

    def status(self, ref: NodeRef) -> JobStatus:
        if _via_agent(ref):
            return self._agents.status(ref)
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
        """The job's log from ``offset`` (characters) on: what has not been shown yet, streamed once by
        the bridge (skyvm.skypilot.logs), never fetched whole per poll."""
        if _via_agent(ref):
            return self._agents.read_log(ref, offset)
        final = (ref.cluster, ref.job_id, ref.managed) in self._over
        text, end = self.bridge.read_log(ref.cluster, ref.job_id, offset, managed=ref.managed, final=final)
        return text, end

    def cancel(self, ref: NodeRef) -> None:
        if _via_agent(ref):
            self._agents.cancel(ref)
        elif ref.managed:
            self.bridge.jobs_cancel(ref.job_id)
        else:
            self.bridge.cancel(ref.cluster, ref.job_id)

    def _pool_down(self, name: str) -> None:
        try:
            self.bridge.pool_down(name)
        except Exception as exc:  # noqa: BLE001 - report, do not hide the original error
            log.error("could not tear down pool %s: %s (run `sky jobs pool down %s`)", name, exc, name)

    def _down(self, name: str) -> None:
        self._agents.forget(name)
        shutil.rmtree(agent_dir(name), ignore_errors=True)  # its agent's key goes with it
        try:
            self.bridge.down(name)
        except Exception as exc:  # noqa: BLE001 - report, do not hide the original error
            log.error("could not tear down cluster %s: %s (run `sky down %s`)", name, exc, name)


def missing_for_vms(settings: NodeSettings) -> list[tuple[str, str]]:
    """What a VM needs that a laptop does not, as (field, problem): a bucket store and a pullable image.

    Read from the settings alone, so the run refuses before it builds an image or uploads a payload.
    """
    problems = []
    store = settings.payload_store or "a local directory (the default)"
    if not store.startswith(BUCKET_PREFIXES):
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


def _via_agent(ref: NodeRef) -> bool:
    return ref.extra.get("via") == VIA_AGENT


def _raise_infra(spec: TaskSpec, cluster: str, exc: BaseException) -> NoReturn:
    """Every failure to get a node running reaches the engine as an InfrastructureError (not a user failure)."""
    if isinstance(exc, (InfrastructureError, NodeCancelled)):
        raise exc
    raise InfrastructureError(f"node {spec.node!r}: SkyPilot could not run it on {cluster}: {exc}") from exc


def skypilot_backend(settings: Optional[NodeSettings] = None) -> SkyPilotBackend:
    """The process's SkyPilot backend for the settings' connectors (the registry's: skyvm.backends.registry)."""
    from skyvm.backends.registry import backends

    return backends().skypilot(settings)


def all_backends() -> list[SkyPilotBackend]:
    from skyvm.backends.registry import backends

    return backends().all_skypilot()
