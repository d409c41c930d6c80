"""SkyVMOperator with ``backend: skypilot`` from an Airflow environment that cannot hold SkyPilot.

Airflow >= 3.1.3 and SkyPilot cannot share an environment, so skyvm reaches SkyPilot through
``SubprocessBridge`` and SkyPilot's own environment (``skyvm skypilot install``). Here that
environment's place is taken by the recording stand-in of tests/skypilot/standin_vm.py (the one
seam where a cloud would be provisioned), run by SkyPilot's real environment: every task is
parsed by SkyPilot, the node image is pulled from the registry with the task's own registry
secrets and each job runs in that container. The metadata DB, dag.test(), XCom, the registry and
the S3 server are real.
"""

from __future__ import annotations

import os
import importlib.util
import json
from pathlib import Path


def test_operator_runs_nodes_on_skypilot_through_skypilots_own_environment(standin_vm, s3_server, registry, monkeypatch):
    from test_operator import run_dag, xcom

    monkeypatch.setenv("SKYVM_S3_ENDPOINT_URL", s3_server)
    vm = {
        "backend": "skypilot", "cloud": "aws", "cpus": "2+", "down": True,
        "payload_store": "s3://skyvm-test/airflow-sky", "payload_store_endpoint": s3_server,
        "registry": registry.model_dump(),
    }
    # The DAG lives in the DAGs folder (dag.test() serializes that folder); its settings come from here.
    monkeypatch.setenv("SKYVM_TEST_SKYPILOT_SETTINGS", json.dumps(vm))
    spec = importlib.util.spec_from_file_location("skyvm_test_dags_sky", Path(__file__).resolve().parent / "dags" / "skyvm_test_dags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = module.skypilot_dag

    dr, states = run_dag(dag)

    assert states == {"first": "success", "second": "success", "broken": "failed", "deferred": "success"}
    assert xcom(dr, "second") == 84  # XCom crossed two SkyPilot nodes
    assert xcom(dr, "deferred") == 100  # through the trigger, which polled SkyPilot's job status
    made = standin_vm.calls()
    launches = [c for c in made if c["call"] == "launch"]
    assert len(launches) == 4  # one node, one cluster: each Airflow task is its own run
    for launch in launches:
        task = launch["task"]
        assert task["resources"]["image_id"].startswith(f"docker:{registry.server}/skyvm-node:")
        assert task["resources"]["labels"]["skyvm-node"] in ("first", "second", "broken", "deferred")
        assert "SKYPILOT_DOCKER_PASSWORD" in task["secrets"] and launch["down"] is True
        # down: true -> each task's cluster is gone when its run ends, failed or not
        assert {"call": "down", "cluster": launch["cluster"]} in [{k: c[k] for k in ("call", "cluster")} for c in made if c["call"] == "down"]
    assert [c["ok"] for c in made if c["call"] == "docker_login"] == [True] * 4  # fresh credentials per launch
    # The failed job was confirmed failed by its job status, not taken from the log alone.
    broken = next(c["cluster"] for c in launches if c["task"]["resources"]["labels"]["skyvm-node"] == "broken")
    assert any(c["call"] == "job_status" and c["cluster"] == broken for c in made)
    deferred = next(c["cluster"] for c in launches if c["task"]["resources"]["labels"]["skyvm-node"] == "deferred")
    # The trigger polled without following (no process waits on the VM), then the cluster went.
    assert any(c["call"] == "job_status" and c["cluster"] == deferred for c in made)
    assert any(c["call"] == "tail_logs" and c["cluster"] == deferred and c["follow"] is False for c in made)


def test_trigger_on_kill_cancels_an_unfinished_skypilot_node_and_downs_its_cluster(standin_vm, s3_server, registry, monkeypatch):
    import asyncio

    from airflow_skyvm.triggers.skyvm import SkyVMTrigger
    from skyvm.api import NodeHandle, Run
    from skyvm.node import make_command_payload

    monkeypatch.setenv("SKYVM_S3_ENDPOINT_URL", s3_server)
    settings = {"defaults": {"backend": "skypilot", "cloud": "aws", "down": True, "payload_store": "s3://skyvm-test/airflow-sky",
                             "payload_store_endpoint": s3_server, "registry": registry.model_dump()}}
    run = Run(settings, run_id="af-sky-trigger-cleanup")
    reference = run.start_raw("sky-cleanup", run.resolve("sky-cleanup"), make_command_payload("echo up; sleep 300")).let_go()
    node = NodeHandle.attach(reference)
    secret = os.environ["SKYVM_TEST_REGISTRY_PASSWORD"]
    assert reference["job_id"] and secret not in str(reference)  # what Airflow stores for the trigger: no credentials
    revived = SkyVMTrigger(**SkyVMTrigger(node=reference, poll_interval=0.5).serialize()[1])

    async def poll_then_stop():
        gen = revived.run()
        task = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(8)
        assert not task.done()  # still running on the VM: no event yet
        task.cancel()
        await revived.cleanup()  # every stop (a triggerer restart too) calls it: it stops nothing
        assert not [c for c in standin_vm.calls() if c["call"] == "cancel"]
        await revived.on_kill()  # a user marked the task failed (Airflow 3.3 calls it; before 3.3 safe_to_cancel leads here)

    asyncio.run(poll_then_stop())
    made = standin_vm.calls()
    assert [c["cluster"] for c in made if c["call"] == "cancel"] == [node.cluster]  # the SkyPilot job was cancelled
    assert any(c["call"] == "down" and c["cluster"] == node.cluster for c in made)  # and its VM went (down: true)
    assert node.status().state.value == "gone"  # nothing left to poll
    run.close()
