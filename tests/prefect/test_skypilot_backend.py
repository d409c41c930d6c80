"""SkyVMTaskRunner with ``backend: skypilot`` from a Prefect environment without SkyPilot.

Every SkyPilot call crosses to SkyPilot's own environment through ``SubprocessBridge``, where the
recording stand-in VM of tests/skypilot/standin_vm.py answers it (the one seam where a cloud would
be provisioned): each task is parsed by SkyPilot, the node image is pulled from the registry with
the task's own registry secrets and the job runs in that container. The Prefect API, the registry
and the S3 server are real.
"""

from __future__ import annotations

import pytest
from prefect import flow, task

from prefect_skyvm import SkyVMTaskRunner


@task
def square(x):
    return x * x


@task(retries=2)
def fails():
    raise KeyError("missing on the VM")


def test_flow_tasks_run_on_skypilot_nodes_through_skypilots_own_environment(standin_vm, s3_server, registry, monkeypatch):
    monkeypatch.setenv("SKYVM_S3_ENDPOINT_URL", s3_server)
    settings = {"defaults": {"backend": "skypilot", "cloud": "aws", "cpus": "2+", "down": True, "max_clusters": 2,
                             "payload_store": "s3://skyvm-test/prefect-sky", "payload_store_endpoint": s3_server,
                             "registry": registry.model_dump()}}

    @flow(task_runner=SkyVMTaskRunner(settings))
    def on_vms():
        squares = [square.submit(n) for n in (2, 3, 4)]
        return [f.result() for f in squares]

    assert on_vms() == [4, 9, 16]
    made = standin_vm.calls()
    launches = [c["cluster"] for c in made if c["call"] == "launch"]
    execs = [c["cluster"] for c in made if c["call"] == "exec"]
    # Three nodes of one signature, at most two clusters: the third ran on a warm one, through its agent
    # over SSH (issue 20): no SkyPilot job, so no exec.
    assert 1 <= len(launches) <= 2 and execs == [] and [c["call"] for c in made].count("ssh_info") >= 1
    assert sum(1 for c in made if c["call"] == "docker_login" and c["ok"]) == len(launches)  # fresh credentials for every launch
    downs = [c["cluster"] for c in made if c["call"] == "down"]
    assert sorted(downs) == sorted(launches)  # down: true -> every cluster went when the flow ended
    assert len({c["pid"] for c in made}) == 1  # one SkyPilot-side process served the whole flow


def test_a_failing_task_fails_with_its_exception_after_its_retries(standin_vm, s3_server, registry, monkeypatch):
    monkeypatch.setenv("SKYVM_S3_ENDPOINT_URL", s3_server)
    settings = {"defaults": {"backend": "skypilot", "cloud": "aws", "down": True,
                             "payload_store": "s3://skyvm-test/prefect-sky", "payload_store_endpoint": s3_server,
                             "registry": registry.model_dump()}}

    @flow(task_runner=SkyVMTaskRunner(settings))
    def failing():
        return fails.submit().result()

    with pytest.raises(KeyError, match="missing on the VM"):
        failing()
    made = standin_vm.calls()
    launches = [c for c in made if c["call"] == "launch"]
    # The first try a launch's job; the retries on a warm cluster go to its agent (issue 20), not as SkyPilot jobs.
    assert 1 <= len(launches) <= 3 and not [c for c in made if c["call"] == "exec"]
    assert sum(1 for c in made if c["call"] == "job_status") >= len(launches)  # each launch's failure confirmed by its job's status


@task
def logs_on_the_vm(x):
    import os

    from prefect import get_run_logger

    get_run_logger().info("hello from the VM %s", x)
    return os.environ["PREFECT_API_URL"]


def test_an_engine_mode_task_on_a_vm_reaches_the_flows_loopback_api_through_the_ssh_forward(standin_vm, s3_server, registry, monkeypatch):
    import asyncio
    import urllib.parse

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("SKYVM_S3_ENDPOINT_URL", s3_server)
    settings = {"defaults": {"backend": "skypilot", "cloud": "aws", "down": True, "prefect_engine": True,
                             "payload_store": "s3://skyvm-test/prefect-sky-engine", "payload_store_endpoint": s3_server,
                             "registry": registry.model_dump()}}

    @flow(task_runner=SkyVMTaskRunner(settings))
    def on_a_vm():
        return logs_on_the_vm.submit(5)

    task_state = on_a_vm()
    node_url = urllib.parse.urlsplit(task_state.result())
    api = urllib.parse.urlsplit(PREFECT_API_URL.value())
    # The node's engine talked to the VM's end of a reverse forward, not to this machine's port.
    assert node_url.hostname == "127.0.0.1" and node_url.port != api.port and node_url.path == api.path

    async def logs():
        async with get_client() as client:
            for _ in range(100):
                found = await client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_state.state_details.task_run_id])))
                if any("hello from the VM 5" in log.message for log in found):
                    return [log.message for log in found]
                await asyncio.sleep(0.3)
            return [log.message for log in found]

    messages = asyncio.run(logs())
    assert "hello from the VM 5" in messages, messages  # sent by the engine on the VM, through the forward
    assert any("forwarded over SSH" in m for m in messages), messages  # the node's own log says how
    made = standin_vm.calls()
    launches = [c for c in made if c["call"] == "launch"]
    assert len(launches) == 1 and launches[0]["task"].get("run") is None and not [c for c in made if c["call"] == "exec"]
