"""``pool:`` on the SkyPilot backend: nodes of a signature run as managed jobs on a pool.

The pool's and jobs' tasks are real SkyPilot tasks (parsed by ``sky.Task``, the pool's checked by
SkyPilot's own ``validate_service_task``); the calls cross to SkyPilot's environment through
``SubprocessBridge`` and are answered by the recording stand-in of standin_vm.py (see its pools
section for why the stand-in sits at the jobs/pool calls), whose workers are real containers of
the node image pulled from the registry, running the node runtime against S3 (moto).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sky = pytest.importorskip("sky")

from skyvm import NodeCancelled, Run  # noqa: E402
from skyvm.backends.skypilot import SkyPilotBackend, skypilot_backend  # noqa: E402
from skyvm.plan import plan_node  # noqa: E402
from skyvm.settings import SkyVMConfig  # noqa: E402
from skyvm.skypilot.bridge import SubprocessBridge  # noqa: E402
from skyvm.skypilot.task_config import pool_job_config, pool_task_config  # noqa: E402

HERE = Path(__file__).resolve().parent


class Recorded:
    def __init__(self, state: Path):
        self.dir = state

    def calls(self, kind=None) -> list[dict]:
        path = self.dir / "calls.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return [r for r in rows if kind is None or r["call"] == kind]


@pytest.fixture
def pool_vm(docker_engine, tmp_path, monkeypatch, use_skypilot):
    state = tmp_path / "standin"
    monkeypatch.setenv("SKYVM_STANDIN_DIR", str(state))
    monkeypatch.setenv("SKYVM_TEST_SKYPILOT_PYTHON", sys.executable)  # the stand-in runs in this (SkyPilot's) environment
    backend = SkyPilotBackend(SubprocessBridge(str(HERE / "standin-python")))
    use_skypilot(backend)
    yield Recorded(state)
    backend.close()
    left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=dev.skyvm.standin={state}"], capture_output=True, text=True).stdout.split()
    if left:
        subprocess.run(["docker", "rm", "-f", *left], capture_output=True)
    assert not left, "a pool worker (stand-in VM) was left running"


def add(a, b):
    return a + b


def nap(seconds):
    time.sleep(seconds)
    return seconds


def _pooled(cloud_settings, **pool_node):
    return {**cloud_settings, "nodes": {"pooled": {"pool": {"workers": 2}, **pool_node}}}


def test_the_pool_task_and_a_pool_job_are_what_skypilot_accepts(registry):
    from sky.serve import serve_utils

    settings = SkyVMConfig({"defaults": {"backend": "skypilot", "cloud": "aws", "cpus": "2+", "use_spot": True, "registry": registry.model_dump(),
                                         "docker_run_args": ["--shm-size=1g"]}, "nodes": {"n": {"pool": {"workers": 3}}}}).resolve("n")
    spec = plan_node(settings, node="n", run_id="r1", attempt_id="a1", payload_url="s3://b/p", result_url="s3://b/r",
                     image=f"{registry.server}/skyvm-node:x", registry_auth=("skyvm", "pw"))
    pool_task = pool_task_config(spec, "skyvm-pool-r1-abc", 3)
    parsed = sky.Task.from_yaml_config(copy.deepcopy(pool_task))
    serve_utils.validate_service_task(parsed, pool=True)  # SkyPilot's own check of a pool's task
    assert parsed.service.pool and parsed.run is None and parsed.setup == spec.setup
    (res,) = parsed.resources
    assert res.use_spot and res.extract_docker_image() == spec.image and res.labels["skyvm-pool"] == "run"
    assert pool_task["config"]["docker"]["run_options"] == ["--shm-size=1g"]
    job = pool_job_config(spec, "skyvm-pool-r1-abc")
    parsed_job = sky.Task.from_yaml_config(copy.deepcopy(job))
    assert parsed_job.setup is None and parsed_job.run == spec.run
    assert job["resources"] == pool_task["resources"]  # a job on a pool asks for exactly the pool's resources


def test_nodes_become_jobs_on_one_pool_per_signature_and_run_and_the_pool_goes_with_the_run(pool_vm, cloud_settings):
    with Run(_pooled(cloud_settings)) as run:
        handles = [run.submit(add, i, 10, node="pooled") for i in range(3)]
        assert [h.result(300) for h in handles] == [10, 11, 12]
        (applied,) = pool_vm.calls("pool_apply")  # three nodes at once, one pool
        pool = applied["pool"]
        assert pool.startswith("skyvm-pool-") and applied["task"]["pool"] == {"workers": 2} and "run" not in applied["task"]
        jobs = pool_vm.calls("jobs_launch")
        assert len(jobs) == 3 and {j["pool"] for j in jobs} == {pool}
        assert all("setup" not in j["task"] and j["task"]["resources"] == applied["task"]["resources"] for j in jobs)
        starts = pool_vm.calls("pool_job_start")
        assert len(starts) == 3 and {s["worker"] for s in starts} <= {f"{pool}-1", f"{pool}-2"}
        assert not pool_vm.calls("launch") and not pool_vm.calls("exec")  # no VM of its own for any node
        assert all(h.ref.managed and h.cluster == pool for h in handles)
        assert f"runs as managed job {handles[0].ref.job_id} on pool {pool}" in handles[0].logs()
        assert not pool_vm.calls("pool_down")
    assert [c["pool"] for c in pool_vm.calls("pool_down")] == [pool]  # down: true, the run's pool went with it


def test_cancel_stops_the_pool_job_and_frees_its_worker(pool_vm, cloud_settings):
    settings = {**cloud_settings, "nodes": {"pooled": {"pool": {"workers": 1}}}}
    with Run(settings) as run:
        long = run.submit(nap, 120, node="pooled")
        deadline = time.time() + 240
        while not pool_vm.calls("pool_job_start") and time.time() < deadline:
            time.sleep(0.2)
        assert pool_vm.calls("pool_job_start"), "the job never started on the pool"
        assert long.cancel()
        with pytest.raises(NodeCancelled):
            long.result(120)  # the cancel goes through the SkyPilot API server's queue, slow on a loaded machine
        assert [c["job_id"] for c in pool_vm.calls("jobs_cancel")] == [long.ref.job_id]
        # The one worker is free again: the next node runs on it.
        assert run.submit(add, 1, 2, node="pooled").result(120) == 3
        assert len(pool_vm.calls("pool_apply")) == 1
    assert len(pool_vm.calls("pool_down")) == 1


def test_gc_tears_down_the_pool_of_a_run_that_died_and_spares_a_live_ones(pool_vm, cloud_settings, chosen_bridge, capsys):
    from skyvm import cli
    chosen_bridge(skypilot_backend().bridge)  # what `skyvm status/gc` ask
    settings = _pooled(cloud_settings, down=False)  # the pool would outlive its run
    run = Run(settings)
    try:
        assert run.submit(add, 2, 3, node="pooled").result(300) == 5
        (pool,) = [c["pool"] for c in pool_vm.calls("pool_apply")]
        assert cli.main(["gc", "--skypilot"]) == 0 and not pool_vm.calls("pool_down")  # its run lives: spared
        assert cli.main(["status", "--skypilot"]) == 0
        assert pool in capsys.readouterr().out
        # The run's process dies (the lock it held for the run's life goes with it): its pool is garbage now.
        run._lease.release()
        assert cli.main(["gc", "--skypilot"]) == 0
        assert f"tore down 1 per-run (their run is over) SkyPilot pool(s): {pool}" in capsys.readouterr().out
        assert [c["pool"] for c in pool_vm.calls("pool_down")] == [pool]
        assert not os.listdir(pool_vm.dir / "pools") or not (pool_vm.dir / "pools" / f"{pool}.json").exists()
    finally:
        run.close()
    assert len(pool_vm.calls("pool_down")) == 1  # down: false: the run's end took nothing down itself


def test_skyvm_plan_prices_a_pool_as_its_workers_times_the_price(catalog_dir):
    from skyvm.settings import NodeSettings
    from skyvm.skypilot.planning import format_table, plan

    rows = plan([("pooled", NodeSettings(backend="skypilot", cloud="aws", cpus="2+", pool={"workers": 3})),
                 ("single", NodeSettings(backend="skypilot", cloud="aws", cpus="2+"))], catalog_dir=catalog_dir)
    pooled, single = rows
    assert (pooled["instance_type"], pooled["hourly_price"]) == (single["instance_type"], single["hourly_price"]) == ("m7i.large", 0.1008)
    assert pooled["pool"] == {"name": None, "workers": 3, "hourly_price": 0.3024} and "pool" not in single
    table = format_table(rows)
    assert "0.3024 (3 x 0.1008, pool)" in table and "TOTAL (every node above running at once): $0.4032/hour" in table


def test_a_shared_pool_is_made_once_outlives_its_runs_and_only_gc_all_takes_it(pool_vm, cloud_settings, chosen_bridge, capsys):
    from skyvm import cli
    chosen_bridge(skypilot_backend().bridge)  # what `skyvm status/gc` ask
    settings = {**cloud_settings, "nodes": {"pooled": {"pool": "team-pool"}}}  # a name: the team's long-lived pool
    for n in (1, 2):  # two runs, one after the other
        with Run(settings) as run:
            assert run.submit(add, n, n, node="pooled").result(300) == 2 * n
    (applied,) = pool_vm.calls("pool_apply")  # made by the first run, found by the second
    assert applied["pool"] == "team-pool" and applied["task"]["pool"] == {"workers": 1}
    assert applied["task"]["resources"]["labels"]["skyvm-pool"] == "shared"
    assert not pool_vm.calls("pool_down")  # down: true takes a run's own pools, never a shared one
    assert cli.main(["gc", "--skypilot"]) == 0 and not pool_vm.calls("pool_down")
    assert cli.main(["gc", "--all-skypilot"]) == 0
    assert "tore down 1 SkyPilot pool(s): team-pool" in capsys.readouterr().out
    assert [c["pool"] for c in pool_vm.calls("pool_down")] == ["team-pool"]


def test_a_pool_node_let_go_is_found_again_and_its_release_takes_the_runs_pool_down(pool_vm, cloud_settings):
    from skyvm.api import NodeHandle
    from skyvm.node import make_call_payload

    run = Run(_pooled(cloud_settings))  # an Airflow task that defers: nobody closes this run
    settings = run.resolve("pooled")
    node = NodeHandle.attach(run.start_raw("pooled", settings, make_call_payload(add, (40, 2), node="pooled")).let_go())
    deadline = time.time() + 240
    while not (status := node.status()).state.finished and time.time() < deadline:
        time.sleep(0.5)
    assert node.outcome(status).value() == 42
    assert not pool_vm.calls("pool_down")
    node.release()  # the trigger's end: the run's own pool goes with its node (down: true)
    assert [c["pool"] for c in pool_vm.calls("pool_down")] == [node.cluster]
    run._lease.release()  # nobody closes this run: its lease goes as its process's would


def test_down_of_a_pool_that_is_not_there_is_not_an_error(api_server):
    """Through SkyPilot's real API server, which has no jobs controller: nothing to tear down."""
    bridge = SubprocessBridge(sys.executable, env=api_server.client_env)
    try:
        assert bridge.pool_down("skyvm-pool-never-made") is None
    finally:
        bridge.close()
