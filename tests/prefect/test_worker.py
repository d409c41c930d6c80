"""SkyVMWorker, @skyvm and nesting against a real `prefect server start`, a real worker process and real containers.

One server (SQLite, loopback) and one `prefect worker start --type skyvm` process serve the
whole module; each test deploys flows from a source directory and watches what a user sees:
states, logs and results in the API, limits from inside the container, what is left running.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from engine_checks import Watch, leaked, marker
from netutil import popen_logged, start_owned

from skyvm.backends.local import list_managed

POOL = "skyvm-test-pool"
# The worker's API key: a marker that must reach the node only as a secret (the local server ignores keys).
API_KEY = marker("PREFECT_API_KEY")
DEADLINE_S = 240

FLOWS = '''
import os
import time

from prefect import flow, get_run_logger, task
from prefect_skyvm import SkyVMTaskRunner
from skyvm.limits import container_limits


@flow(persist_result=True)
def probe(x: int) -> dict:
    get_run_logger().info("hello from the node, x=%s", x)
    return {"double": 2 * x, **container_limits()}


@flow(persist_result=True)
def tick() -> str:
    return container_limits()["cluster"]


@flow
def sleeper() -> None:
    get_run_logger().info("sleeping on the node, API key given: %s", bool(os.environ.get("PREFECT_API_KEY")))
    time.sleep(600)


@flow
def hog() -> int:
    get_run_logger().info("allocating past the node's memory")
    blocks = [bytearray(64 * 2**20) for _ in range(32)]  # 2 GiB, touched: the node has 0.25
    return len(blocks)


@task
def where(i: int) -> dict:
    return {"i": i, **container_limits()}


@task
def stuck() -> None:
    print("task node started", flush=True)
    time.sleep(600)


@flow(task_runner=SkyVMTaskRunner({"defaults": {"cpus": 0.5, "memory": 0.5}}))
def stuck_orchestrator() -> None:
    stuck.submit().result()


@flow(persist_result=True, task_runner=SkyVMTaskRunner({"defaults": {"cpus": 0.5, "memory": 0.5}}))
def orchestrator(n: int) -> dict:
    tasks = [where.submit(i) for i in range(n)]
    return {"flow": container_limits()["cluster"], "tasks": [t.result() for t in tasks]}
'''


def _wait(predicate, what: str, timeout: float = DEADLINE_S, every: float = 0.5):
    """Poll until predicate() is truthy; its value, or a failure naming what was awaited and the skyvm containers there are."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; skyvm containers: {list_managed()}")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory, docker_engine):
    """`prefect server start` on loopback with its own SQLite database; the API URL for this module."""
    home = tmp_path_factory.mktemp("prefect-server")
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        # Scheduled runs appear within seconds of a deployment's creation.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    }
    env.pop("PREFECT_API_URL", None)
    # A port this server holds itself: another test run's Prefect server never answers for it.
    proc, port = start_owned(
        lambda port: popen_logged([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], home / "server.log", env=env),
        lambda port: f"http://127.0.0.1:{port}/api/health", home / "server.log", what="Prefect server", timeout=120,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def api(prefect_server, tmp_path_factory):
    """This process's Prefect settings point at the module's server; results in a directory the worker shares."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    storage = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings(updates={PREFECT_API_URL: prefect_server, PREFECT_LOCAL_STORAGE_PATH: str(storage)}):
        yield {"url": prefect_server, "storage": str(storage)}


@pytest.fixture(scope="module")
def worker(api, tmp_path_factory):
    """`prefect work-pool create --type skyvm` and one `prefect worker start --type skyvm` process."""
    home = tmp_path_factory.mktemp("prefect-worker")
    env = {
        **os.environ,
        "PREFECT_API_URL": api["url"],
        "PREFECT_HOME": str(home),
        "PREFECT_API_KEY": API_KEY,
        "PREFECT_LOCAL_STORAGE_PATH": api["storage"],
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "0",
    }
    created = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", POOL, "--type", "skyvm"], env=env, capture_output=True, text=True)
    assert created.returncode == 0, created.stdout + created.stderr
    log_path = home / "worker.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "skyvm", "--name", "skyvm-test-worker"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait(lambda: asyncio.run(_worker_online()) or proc.poll() is not None, "the worker to report to the API", timeout=120)
        assert proc.poll() is None, log_path.read_text()
        yield log_path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


async def _worker_online() -> bool:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return bool(await client.read_workers_for_work_pool(POOL))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The flows' source directory (deployed with flow.from_source, mounted on the local backend)."""
    path = tmp_path_factory.mktemp("flow-source")
    (path / "flows.py").write_text(FLOWS)
    return path


def deploy(source: Path, entrypoint: str, **kwargs) -> uuid.UUID:
    from prefect import flow

    name = f"{entrypoint.split(':')[1]}-{uuid.uuid4().hex[:6]}"
    return flow.from_source(str(source), entrypoint=f"flows.py:{entrypoint.split(':')[1]}").deploy(
        name=name, work_pool_name=POOL, print_next_steps=False, ignore_warnings=True, **kwargs
    )


def run(deployment_id, parameters=None):
    from prefect.deployments import run_deployment

    return run_deployment(deployment_id, parameters=parameters or {}, timeout=0)


def read(coro_fn, *args):
    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            return await coro_fn(client, *args)

    return asyncio.run(go())


async def _flow_run(client, flow_run_id):
    return await client.read_flow_run(flow_run_id)


def wait_final(flow_run_id, timeout: float = DEADLINE_S):
    return _wait(lambda: (fr := read(_flow_run, flow_run_id)).state.is_final() and fr, f"flow run {flow_run_id} to end", timeout)


def node_containers(flow_run_id) -> list[dict]:
    return [r for r in list_managed() if r["run_id"] == f"prefect-flow-{flow_run_id}"]


# -- deployments ---------------------------------------------------------------------------------


def test_deployment_runs_on_a_node_with_its_job_variables(worker, source):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    flow_run = run(deploy(source, "flows.py:probe", job_variables={"cpus": 1.5, "memory": 0.75}), {"x": 21})
    done = wait_final(flow_run.id)
    assert done.state.is_completed(), (done.state, worker.read_text()[-3000:])
    seen = done.state.result()
    assert seen["double"] == 42
    assert (seen["cpus"], seen["memory_gib"]) == (1.5, 0.75)  # cpu.max / memory.max inside the container
    assert seen["cluster"].startswith("skyvm-prefect-flow-")

    async def logs(client):
        return await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))

    messages = _wait(lambda: [m for m in (log.message for log in read(logs)) if "hello from the node, x=21" in m], "the node's log in the API", timeout=30)
    assert messages
    # The engine reports Completed from the node; the worker then releases the node's cluster (down: true).
    _wait(lambda: node_containers(flow_run.id) == [], "the node's container to go", timeout=60)


def test_interval_schedule_runs_on_fresh_nodes(worker, source):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    deployment_id = deploy(source, "flows.py:tick", interval=timedelta(seconds=5), job_variables={"cpus": 0.5})

    async def completed(client):
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))),
        )

    try:
        runs = _wait(lambda: (lambda r: r if len(r) >= 2 else None)(read(completed)), "two scheduled runs to complete")
    finally:
        read(lambda client: client.delete_deployment(deployment_id))
    assert all(r.auto_scheduled for r in runs)
    clusters = [r.state.result() for r in runs]
    assert all(c and c.startswith("skyvm-prefect-flow-") for c in clusters)
    assert len(set(clusters)) == len(clusters)  # each run on a node of its own
    _wait(lambda: not [c for r in runs for c in node_containers(r.id)], "the runs' containers to go", timeout=60)


def test_cancelling_a_running_flow_run_stops_its_node(worker, source):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.states import Cancelling

    flow_run = run(deploy(source, "flows.py:sleeper"))

    async def logs(client):
        return await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))

    _wait(lambda: any("sleeping on the node, API key given: True" in log.message for log in read(logs)), "the flow to run on its node")
    assert [c for c in node_containers(flow_run.id) if c["state"] == "running"]
    # The API key reached the node (the engine there talks to the API) as a secret: not in ps, docker
    # inspect, the exec's record or the run's logs.
    seen = Watch._look()
    assert not leaked({"api_key": API_KEY}, machine=seen, logs="\n".join(log.message for log in read(logs)), worker=worker.read_text())
    read(lambda client: client.set_flow_run_state(flow_run.id, Cancelling(message="cancelled by the test")))
    done = wait_final(flow_run.id, timeout=120)
    assert done.state.is_cancelled(), done.state
    _wait(lambda: node_containers(flow_run.id) == [], "the node's container to go", timeout=60)


def test_a_node_that_cannot_start_leaves_the_run_crashed(worker, source):
    flow_run = run(deploy(source, "flows.py:probe", job_variables={"cpus": 64}), {"x": 1})
    done = wait_final(flow_run.id)
    assert done.state.is_crashed(), done.state
    assert "64" in done.state.message and "CPU" in done.state.message.upper(), done.state.message
    assert node_containers(flow_run.id) == []


def test_a_node_that_dies_leaves_the_run_crashed_with_the_reason(worker, source):
    flow_run = run(deploy(source, "flows.py:hog", job_variables={"memory": 0.25}))
    done = wait_final(flow_run.id)
    assert done.state.is_crashed(), done.state
    assert "skyvm node" in done.state.message and ("memory" in done.state.message.lower() or "137" in done.state.message), done.state.message
    _wait(lambda: node_containers(flow_run.id) == [], "the node's container to go", timeout=60)


def test_a_bad_job_variable_fails_the_run_naming_it(worker, source):
    flow_run = run(deploy(source, "flows.py:probe", job_variables={"disk_tier": "fastest"}), {"x": 1})
    done = wait_final(flow_run.id)
    assert done.state.is_failed(), done.state
    assert "job_variables.disk_tier" in done.state.message and "fastest" in done.state.message, done.state.message
    assert node_containers(flow_run.id) == []


def test_nested_flow_on_a_node_runs_its_tasks_on_nodes_of_their_own(worker, source):
    flow_run = run(deploy(source, "flows.py:orchestrator", job_variables={"cpus": 1, "memory": 1}), {"n": 2})
    done = wait_final(flow_run.id)
    assert done.state.is_completed(), (done.state, worker.read_text()[-3000:])
    seen = done.state.result()
    task_clusters = [t["cluster"] for t in seen["tasks"]]
    assert seen["flow"].startswith("skyvm-prefect-flow-")
    assert all(c and c.startswith("skyvm-prefect-") for c in task_clusters)
    assert len({seen["flow"], *task_clusters}) == 3  # the flow and each task in a container of its own
    assert [t["cpus"] for t in seen["tasks"]] == [0.5, 0.5]
    ids = (f"prefect-flow-{flow_run.id}", f"prefect-{flow_run.id}")
    _wait(lambda: not [r for r in list_managed() if r["run_id"] in ids], "the flow's and its tasks' containers to go", timeout=60)


# -- @skyvm -----------------------------------------------------------------------------------------


def test_skyvm_decorator_runs_the_flow_on_a_node_and_returns_its_result(api, worker):
    from prefect import flow

    from prefect_skyvm import skyvm
    from skyvm.limits import container_limits

    @skyvm(work_pool=POOL, cpus=0.5, memory=0.5)
    @flow
    def where(x: int) -> dict:
        return {"double": 2 * x, **container_limits()}

    seen = where(5)
    assert seen["double"] == 10
    assert (seen["cpus"], seen["memory_gib"]) == (0.5, 0.5)
    assert seen["cluster"].startswith("skyvm-prefect-flow-")
    assert not [r for r in list_managed() if r["name"] == seen["cluster"]]  # the call returns after the node is released

    future = where.submit(7)  # a PrefectFlowRunFuture of a flow run on a node of its own
    assert future.result()["double"] == 14
    assert read(_flow_run, future.flow_run_id).state.is_completed()
    assert future.result()["cluster"] not in (None, seen["cluster"])


def test_skyvm_decorator_rejects_bad_job_variables_before_anything_runs():
    from prefect import flow

    from prefect_skyvm import skyvm
    from skyvm.errors import SettingsError

    with pytest.raises(ValueError, match="unknown job variable.*'cpu'"):
        skyvm(work_pool=POOL, cpu=2)
    with pytest.raises(SettingsError, match="job_variables.memory"):
        skyvm(work_pool=POOL, memory="lots")

    @flow
    def plain():
        return 1

    assert skyvm(work_pool=POOL, cpus=1)(plain).job_variables == {"cpus": 1}


def test_cancelling_a_nested_flow_run_leaves_neither_its_node_nor_its_task_nodes(worker, source):
    from prefect.states import Cancelling

    flow_run = run(deploy(source, "flows.py:stuck_orchestrator"))
    ids = (f"prefect-flow-{flow_run.id}", f"prefect-{flow_run.id}")
    _wait(lambda: [r for r in list_managed() if r["run_id"] == ids[1] and r["state"] == "running"], "the task's node to run")
    read(lambda client: client.set_flow_run_state(flow_run.id, Cancelling(message="cancelled by the test")))
    done = wait_final(flow_run.id, timeout=120)
    assert done.state.is_cancelled(), done.state
    _wait(lambda: not [r for r in list_managed() if r["run_id"] in ids], "the flow's and its task's containers to go", timeout=90)


# -- settings layers -------------------------------------------------------------------------------

LAYERS = {
    "defaults": {"memory": 0.5},
    "profiles": {"big": {"cpus": 1.25}},
    "nodes": {"probe": {"cpus": 0.75}},
}


def test_the_settings_file_layers_sit_under_the_job_variables(tmp_path):
    import yaml

    from prefect_skyvm.workers import SkyVMJobConfiguration

    path = tmp_path / "skyvm.yaml"
    path.write_text(yaml.safe_dump(LAYERS))

    def resolved(flow_name, **variables):
        s = SkyVMJobConfiguration(settings_file=str(path), **variables).base_settings(flow_name, "test")
        return s.cpus, s.memory

    assert resolved("probe") == ("0.75", "0.5")  # nodes[<flow name>] over the defaults
    assert resolved("tick", profile="big") == ("1.25", "0.5")  # a profile by job variable
    assert resolved("probe", profile="big") == ("0.75", "0.5")  # the flow's own entry over its profile
    assert resolved("probe", cpus=2, memory=1) == ("2", "1")  # job variables over the file


def test_a_deployment_reads_the_settings_file_on_the_worker(worker, source, tmp_path):
    import yaml

    path = tmp_path / "skyvm.yaml"
    path.write_text(yaml.safe_dump(LAYERS))
    flow_run = run(deploy(source, "flows.py:probe", job_variables={"settings_file": str(path), "memory": 0.25}), {"x": 1})
    done = wait_final(flow_run.id)
    assert done.state.is_completed(), (done.state, worker.read_text()[-3000:])
    seen = done.state.result()
    assert (seen["cpus"], seen["memory_gib"]) == (0.75, 0.25)  # cpus from nodes.probe, memory from the deployment


def test_kill_infrastructure_from_another_process_stops_the_node(api, worker, source):
    """Prefect calls kill_infrastructure with the flow run's infrastructure_pid, possibly from a worker
    process other than the one following the node: the node stops, its own worker releases it."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from prefect_skyvm.workers import SkyVMJobConfiguration, SkyVMWorker

    flow_run = run(deploy(source, "flows.py:sleeper"))

    async def logs(client):
        return await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))

    _wait(lambda: any("sleeping on the node" in log.message for log in read(logs)), "the flow to run on its node")
    pid = read(_flow_run, flow_run.id).infrastructure_pid
    assert pid and f"prefect-flow-{flow_run.id}" in pid  # the node's reference, as the API keeps it

    async def kill():
        async with SkyVMWorker(work_pool_name=POOL) as other:
            await other.kill_infrastructure(pid, SkyVMJobConfiguration(), grace_seconds=30)

    asyncio.run(kill())
    done = wait_final(flow_run.id, timeout=120)
    assert done.state.is_crashed() and "outside this worker" in done.state.message, done.state
    _wait(lambda: node_containers(flow_run.id) == [], "the node's container to go", timeout=60)


KILL_FROM_ANOTHER_PROCESS = '''
import asyncio, sys
from prefect.exceptions import InfrastructureNotFound
from prefect_skyvm.workers import SkyVMJobConfiguration, SkyVMWorker

async def main():
    async with SkyVMWorker(work_pool_name=sys.argv[1]) as worker:
        try:
            await worker.kill_infrastructure(sys.argv[2], SkyVMJobConfiguration(), grace_seconds=1)
        except InfrastructureNotFound as exc:
            print("NOT FOUND:", exc)
        except Exception as exc:
            print("ERROR:", type(exc).__name__, exc)

asyncio.run(main())
'''


def test_kill_infrastructure_sends_a_local_process_node_to_the_local_backend_never_to_skypilot(api, worker, tmp_path):
    """A node the local backend ran as a plain process (a host without Docker) has "local-process" in its
    reference: killing it goes to the local backend with the node's own settings, never to SkyPilot
    (here SkyPilot is unreachable, so a wrong route is an error)."""
    import json

    from skyvm.backends.base import NodeRef

    ref = NodeRef(backend="local-process", cluster="process-4194000", attempt_id=f"probe-{uuid.uuid4().hex[:12]}", node="probe", run_id="prefect-flow-gone")
    script = tmp_path / "kill.py"
    script.write_text(KILL_FROM_ANOTHER_PROCESS)
    env = {**os.environ, "PREFECT_API_URL": api["url"], "SKYVM_SKYPILOT_PYTHON": str(tmp_path / "no-skypilot" / "python")}
    out = subprocess.run([sys.executable, str(script), POOL, json.dumps(ref.to_dict())], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "NOT FOUND: skyvm node 'probe' on process-4194000 no longer exists" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "skypilot" not in out.stdout.lower()
