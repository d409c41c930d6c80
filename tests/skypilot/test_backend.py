"""The SkyPilot backend's control flow against a recording stand-in for the bridge (the one seam
where a cloud would be provisioned). The stand-in checks every task it is given with SkyPilot's
own parser, records every call, and "runs" a job by executing its run command here, so the node
runtime really fetches its payload from S3 (moto) and writes its result back."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import time

import pytest

sky = pytest.importorskip("sky")

from skyvm import InfrastructureError, NodeCancelled, NodeFailed, Run, SettingsError  # noqa: E402
from skyvm.backends.skypilot import SkyPilotBackend  # noqa: E402
from skyvm.context import Context  # noqa: E402
from skyvm.skypilot.logs import LogFollowers  # noqa: E402


class StandInBridge:
    """Records calls; provisions nothing; runs each job's `run` as a local process."""

    def __init__(self, fail_launch_for=None, preempt_managed_once=False, jobs_end=None):
        self.jobs_end = jobs_end  # what job_status says of a finished job, whatever tail_logs said: a fake that disagrees
        self.calls: list[tuple] = []
        self.lock = threading.Lock()
        self.clusters: dict[str, str] = {}  # name -> UP
        self.labels: dict[str, dict] = {}  # name -> the labels SkyPilot puts on the VM
        self.jobs: dict[tuple, dict] = {}
        self.next_id = 1
        self.fail_launch_for = fail_launch_for
        self.preempt_managed_once = preempt_managed_once
        self.launch_times: list[tuple[float, float]] = []
        self.logs = LogFollowers(self)  # read_log as the SDK adapter answers it: over tail_logs and jobs_logs

    def read_log(self, cluster_name, job_id, offset=0, managed=False, final=False):
        return self.logs.read(cluster_name, job_id, offset, managed, final)

    def _record(self, *call):
        with self.lock:
            self.calls.append(call)

    def names(self, kind):
        return [c for c in self.calls if c[0] == kind]

    def _check(self, task):
        sky.Task.from_yaml_config(dict(task))  # what SkyPilot would accept, or it raises here

    def _start(self, task, key):
        env = {**os.environ, **task["envs"], **task["secrets"], "SKYVM_NODE_STATE": "/tmp/skyvm-standin-state"}
        cmd = shlex.split(task["run"])
        cmd[0] = sys.executable  # the node runtime, as it would start inside the container
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        job = {"proc": proc, "status": "RUNNING", "out": []}
        # The job's log as SkyPilot keeps it on the VM: readable while it runs (tail_logs follow=False).
        reader = threading.Thread(target=lambda: job["out"].extend(proc.stdout), daemon=True)
        reader.start()
        job["reader"] = reader
        with self.lock:
            self.jobs[key] = job
        return proc

    def launch(self, task, cluster_name, *, idle_minutes_to_autostop=None, down=False, retry_until_up=False, dryrun=False, on_log=None):
        t0 = time.time()
        self._record("launch", cluster_name, task, {"idle_minutes_to_autostop": idle_minutes_to_autostop, "down": down, "retry_until_up": retry_until_up})
        self._check(task)
        with self.lock:
            self.labels[cluster_name] = dict(task["resources"].get("labels", {}))
        time.sleep(0.5)  # provisioning takes a while: parallel launches overlap
        if self.fail_launch_for and self.fail_launch_for in cluster_name:
            with self.lock:
                self.clusters[cluster_name] = "INIT"  # half-made
            raise RuntimeError("ResourcesUnavailableError: no capacity in us-east-1")
        with self.lock:
            self.clusters[cluster_name] = "UP"
            job_id = self.next_id
            self.next_id += 1
        self._start(task, (cluster_name, job_id))
        self.launch_times.append((t0, time.time()))
        # What SkyPilot's launched resources report (the bridge reads them off the handle).
        return {"job_id": job_id, "cluster": cluster_name, "cloud": "aws", "region": "us-east-1", "zone": None, "instance_type": "m7i.large", "use_spot": False, "hourly_price": 0.1008}

    def exec(self, task, cluster_name, on_log=None):
        self._record("exec", cluster_name, task)
        self._check(task)
        assert self.clusters.get(cluster_name) == "UP", f"exec on a cluster that is not up: {cluster_name}"
        with self.lock:
            job_id = self.next_id
            self.next_id += 1
        self._start(task, (cluster_name, job_id))
        return {"job_id": job_id, "cluster": cluster_name}

    def tail_logs(self, cluster_name, job_id, on_log=None, follow=True):
        self._record("tail_logs", cluster_name, job_id)
        job = self.jobs[(cluster_name, job_id)]
        if job["proc"].poll() is not None:
            job["reader"].join()  # the whole log of a finished job
        sent = 0
        while True:  # follow: each line as the job writes it, until its log ends
            ended = not job["reader"].is_alive()
            lines = list(job["out"])
            for line in lines[sent:]:
                if on_log:
                    on_log(line.rstrip("\n"))
            sent = len(lines)
            if ended or not follow:
                break
            job["reader"].join(0.05)
        if job["proc"].poll() is None:
            return None  # SkyPilot: no exit code for a job still running
        return 0 if self._finish(job) == "SUCCEEDED" or self.jobs_end else 100  # SkyPilot's codes: 100 = failed job

    def _finish(self, job):
        rc = job["proc"].wait()
        job["status"] = self.jobs_end or ("SUCCEEDED" if rc == 0 else ("CANCELLED" if job.get("cancelled") else "FAILED"))
        return job["status"]

    def job_status(self, cluster_name, job_id):
        self._record("job_status", cluster_name, job_id)
        job = self.jobs[(cluster_name, job_id)]
        return job["status"] if job["proc"].poll() is None else self._finish(job)

    def cancel(self, cluster_name, job_id):
        self._record("cancel", cluster_name, job_id)
        job = self.jobs[(cluster_name, job_id)]
        job["cancelled"] = True
        if job["proc"].poll() is None:
            os.killpg(job["proc"].pid, 15)

    def down(self, cluster_name):
        self._record("down", cluster_name)
        with self.lock:
            self.clusters.pop(cluster_name, None)

    def autostop(self, cluster_name, idle_minutes, down):
        self._record("autostop", cluster_name, idle_minutes, down)

    def status(self, cluster_names=None):
        self._record("status")
        return [{"name": n, "status": s, "labels": self.labels.get(n, {}), "to_down": False, "autostop": 15, "resources": "1x AWS(m7i.large)"} for n, s in self.clusters.items()]

    def jobs_launch(self, task, name, on_log=None):
        self._record("jobs_launch", name, task)
        self._check(task)
        with self.lock:
            job_id = self.next_id
            self.next_id += 1
        self._start(task, ("managed", job_id))
        self.jobs[("managed", job_id)]["recovery_count"] = 0
        return {"job_id": job_id}

    def jobs_logs(self, job_id, on_log=None, follow=True):
        self._record("jobs_logs", job_id)
        job = self.jobs[("managed", job_id)]
        if self.preempt_managed_once:
            # The spot VM is preempted mid-run: SkyPilot's controller recovers it on another VM.
            job["recovery_count"] += 1
            if on_log:
                on_log("(skypilot) spot preemption detected; recovering on a new instance")
        for line in job["proc"].stdout:
            if on_log:
                on_log(line.rstrip("\n"))
        rc = job["proc"].wait()
        job["status"] = "SUCCEEDED" if rc == 0 else "FAILED"
        return 0 if rc == 0 else 100

    def jobs_status(self, job_id):
        self._record("jobs_status", job_id)
        job = self.jobs[("managed", job_id)]
        return {"status": job["status"], "recovery_count": job["recovery_count"]}

    def jobs_cancel(self, job_id):
        self._record("jobs_cancel", job_id)
        os.killpg(self.jobs[("managed", job_id)]["proc"].pid, 15)

    def optimize(self, tasks, clouds=None):
        raise AssertionError("not used by the backend")

    def pool_status(self, pool_names=None):
        self._record("pool_status")
        return []  # this stand-in makes no pools (test_pools.py runs them on standin_vm.py's)


@pytest.fixture
def bridge(monkeypatch, use_skypilot):
    stand_in = StandInBridge()
    use_skypilot(SkyPilotBackend(stand_in))
    return stand_in


def add(a, b):
    print(f"adding {a} and {b} on the node", flush=True)
    return a + b


def nap(seconds):
    print("napping", flush=True)
    time.sleep(seconds)
    return seconds


def broken():
    raise ValueError("the node's code failed")


def test_parallel_nodes_launch_in_parallel_then_a_warm_cluster_is_reused_with_fresh_credentials(bridge, cloud_settings, registry, monkeypatch):
    with Run(cloud_settings) as run:
        a, b = run.submit(nap, 1, node="a"), run.submit(nap, 1, node="b")
        assert (a.result(120), b.result(120)) == (1, 1)
        launches = bridge.names("launch")
        assert len(launches) == 2 and launches[0][1] != launches[1][1]  # separate clusters for nodes running at once
        (s0, e0), (s1, e1) = bridge.launch_times
        assert s1 < e0 and s0 < e1  # the two launches overlapped: never one after another
        for _, _, task, opts in launches:
            assert task["resources"]["image_id"].startswith(f"docker:{registry.server}/skyvm-node:")
            assert opts == {"idle_minutes_to_autostop": 15, "down": True, "retry_until_up": False}
        # The registry token changes; the next node reuses a warm cluster and logs in with the new one.
        monkeypatch.setenv(registry.password_env, os.environ[registry.password_env] + "-rotated")
        c = run.submit(add, 2, 3, node="c")
        assert c.result(120) == 5
        (_, cluster, task) = bridge.names("exec")[0]
        assert cluster in {launches[0][1], launches[1][1]}
        assert task["secrets"]["SKYPILOT_DOCKER_PASSWORD"].endswith("-rotated")
        assert "adding 2 and 3 on the node" in c.logs()
        assert not bridge.names("down")  # nothing torn down while the run lives
        # The chosen instance and price are said at launch; the run adds up duration x price per node.
        assert "on aws us-east-1 m7i.large at $0.1008/h" in a.logs()
        summary = {r["node"]: r for r in run.cost_summary()}
        assert set(summary) == {"a", "b", "c"}
        for r in summary.values():
            assert r["hourly_price"] == 0.1008 and r["cost"] == pytest.approx(r["duration_s"] * 0.1008 / 3600, rel=0.05)
    # The run is over: every down:true cluster goes.
    assert sorted(c[1] for c in bridge.names("down")) == sorted({launches[0][1], launches[1][1]})
    assert bridge.clusters == {}


def test_a_failed_job_is_never_success(bridge, cloud_settings):
    with Run(cloud_settings) as run:
        handle = run.submit(broken, node="broken")
        with pytest.raises(NodeFailed, match="ValueError: the node's code failed"):
            handle.result(120)
    assert bridge.names("job_status")  # the exit code was confirmed against the job's status


@pytest.mark.parametrize("status", ["FAILED", "FAILED_SETUP", "FAILED_DRIVER"])
def test_an_exit_code_of_0_with_a_failed_job_status_is_never_success(cloud_settings, monkeypatch, status, use_skypilot):
    # tail_logs says 0, the job's status says it failed (e.g. the VM's agent lost the job after the
    # node wrote its result): the status wins, and the user hears which node and why.
    stand_in = StandInBridge(jobs_end=status)
    use_skypilot(SkyPilotBackend(stand_in))
    with Run(cloud_settings) as run:
        handle = run.submit(add, 2, 3, node="disputed")
        with pytest.raises(InfrastructureError, match=f"node 'disputed' .*{status}"):
            handle.result(120)
    assert stand_in.names("tail_logs") and stand_in.names("job_status")


def test_cancel_cancels_the_job_and_releases_the_cluster(bridge, cloud_settings):
    with Run(cloud_settings) as run:
        handle = run.submit(nap, 60, node="long")
        deadline = time.time() + 60
        while "napping" not in handle.logs() and time.time() < deadline:
            time.sleep(0.1)  # polling with a deadline: the node's own line says its body runs
        assert "napping" in handle.logs()
        assert handle.cancel()
        with pytest.raises(NodeCancelled):
            handle.result(10)
        (_, cluster, _job) = bridge.names("cancel")[0]
        assert ("down", cluster) in bridge.calls  # down: true -> the cancelled node's VM goes


def test_a_half_made_cluster_is_torn_down(cloud_settings, monkeypatch, use_skypilot):
    stand_in = StandInBridge(fail_launch_for="skyvm")
    use_skypilot(SkyPilotBackend(stand_in))
    with Run(cloud_settings) as run:
        handle = run.submit(add, 1, 1, node="unlucky")
        with pytest.raises(InfrastructureError, match="no capacity"):
            handle.result(120)
    (_, name, *_rest) = stand_in.names("launch")[0]
    assert ("down", name) in stand_in.calls and stand_in.clusters == {}


def test_a_cluster_whose_launch_failed_is_never_taken_for_a_warm_one(cloud_settings, monkeypatch, use_skypilot):
    stand_in = StandInBridge(fail_launch_for="skyvm")
    use_skypilot(SkyPilotBackend(stand_in))
    warm = {**cloud_settings, "defaults": {**cloud_settings["defaults"], "down": False}}  # clusters outlive their run
    with Run(warm) as run:
        with pytest.raises(InfrastructureError, match="no capacity"):
            run.submit(add, 1, 1, node="unlucky").result(120)
    stand_in.fail_launch_for = None  # capacity is back
    with Run(warm) as run:
        assert run.submit(add, 2, 2, node="lucky").result(120) == 4
    assert len(stand_in.names("launch")) == 2 and not stand_in.names("exec")  # a fresh launch, no exec on the downed one
    for name in list(stand_in.clusters):
        stand_in.down(name)  # down: false kept the good one warm; this test's "VM" goes now


def test_spot_with_recovery_is_a_managed_job_and_preemption_spends_no_retry(cloud_settings, monkeypatch, use_skypilot):
    stand_in = StandInBridge(preempt_managed_once=True)
    use_skypilot(SkyPilotBackend(stand_in))
    settings = {**cloud_settings, "nodes": {"spot": {"use_spot": True, "job_recovery": "FAILOVER"}}}
    with Run(settings) as run:
        handle = run.submit(add, 20, 22, node="spot")
        assert handle.result(120) == 42  # preempted once, recovered by SkyPilot, one engine attempt
    assert len(stand_in.names("jobs_launch")) == 1 and not stand_in.names("launch")
    (_, _name, task) = stand_in.names("jobs_launch")[0]
    assert task["resources"]["use_spot"] and task["resources"]["job_recovery"] == "FAILOVER"
    assert "spot preemption detected" in handle.logs()


def test_a_local_directory_store_is_refused_before_anything_is_built_or_uploaded(bridge, registry, tmp_path, monkeypatch):
    ctx = Context()
    monkeypatch.setattr(ctx, "node_image", lambda s: pytest.fail("an image was built for a node that cannot run"))
    with Run({"defaults": {"backend": "skypilot", "registry": registry.model_dump(), "payload_store": str(tmp_path)}}, ctx=ctx) as run:
        with pytest.raises(SettingsError) as info:
            run.submit(add, 1, 2, node="nowhere")
    assert "nodes.nowhere.payload_store" in str(info.value) and f"got {tmp_path}" in str(info.value) and "s3://" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no payload uploaded
    assert not bridge.names("launch")


def test_a_locally_built_image_without_a_registry_is_refused_before_the_build(bridge, s3_server, monkeypatch):
    ctx = Context()
    monkeypatch.setattr(ctx, "node_image", lambda s: pytest.fail("an image was built for a node that cannot run"))
    with Run({"defaults": {"backend": "skypilot", "payload_store": "s3://skyvm-test/x", "payload_store_endpoint": s3_server}}, ctx=ctx) as run:
        with pytest.raises(SettingsError, match=r"nodes\.unpushed\.registry: a VM cannot pull skyvm's locally built node image"):
            run.submit(add, 1, 2, node="unpushed")
    assert not bridge.names("launch")


def test_status_and_gc_see_skyvms_clusters_only_and_spare_busy_ones(bridge, cloud_settings, chosen_bridge, capsys):
    from skyvm import cli
    from skyvm.skypilot.clusters import gc_clusters, skyvm_clusters

    settings = {**cloud_settings, "defaults": {**cloud_settings["defaults"], "down": False}}
    with Run(settings, run_id="kept-warm") as run:
        assert run.submit(add, 2, 3, node="warm").result(120) == 5
    (warm,) = [c[1] for c in bridge.names("launch")]
    bridge.clusters["my-own-dev-box"] = "STOPPED"  # the user's cluster, no skyvm labels: never listed, never touched
    chosen_bridge(bridge)  # what `skyvm status/gc` ask
    assert cli.main(["status", "--skypilot"]) == 0
    out = capsys.readouterr().out
    assert warm in out and "kept-warm" in out and "my-own-dev-box" not in out
    (row,) = skyvm_clusters(bridge)
    assert (row["name"], row["state"], row["run_id"], row["node"]) == (warm, "UP", "kept-warm", "warm")

    # An UP cluster may be running a node: plain gc leaves it, --all-skypilot takes it.
    assert gc_clusters(bridge) == [] and warm in bridge.clusters
    bridge.clusters[warm] = "STOPPED"  # autostop stopped it: idle, and its disk still costs
    assert cli.main(["gc", "--skypilot", "--dry-run"]) == 0 and warm in bridge.clusters
    assert cli.main(["gc", "--skypilot"]) == 0
    assert f"tore down 1 idle (INIT/STOPPED) SkyPilot cluster(s): {warm}" in capsys.readouterr().out
    assert warm not in bridge.clusters and "my-own-dev-box" in bridge.clusters
    assert ("down", "my-own-dev-box") not in bridge.calls
