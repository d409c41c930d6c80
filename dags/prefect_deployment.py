"""A Prefect deployment on a `skyvm` work pool: the whole flow run on a node, its tasks on nodes of their own.

    ./dev run prefect -- python dags/prefect_deployment.py

What a user does, in one script so the demo cleans up after itself:

    prefect server start                                    # or Prefect Cloud
    prefect work-pool create demo-pool --type skyvm
    prefect worker start --pool demo-pool --type skyvm      # the only process that stays up
    python -c 'from prefect_deployment import deploy; deploy()'   # flow.from_source(...).deploy(...)

The flow run's node (1 CPU, 1 GiB, from the deployment's job variables) runs Prefect's
engine; its SkyVMTaskRunner starts each task on a node of its own (0.5 CPU, 0.5 GiB).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prefect import flow, task

from prefect_skyvm import SkyVMTaskRunner
from skyvm.limits import container_limits

HERE = Path(__file__).resolve().parent
POOL = "skyvm-demo-pool"


@task
def shard_total(shard: int) -> dict:
    return {"total": sum(range(shard * 100_000, (shard + 1) * 100_000)), "limits": container_limits()}


@flow(persist_result=True, task_runner=SkyVMTaskRunner({"defaults": {"cpus": 0.5, "memory": 0.5}}))
def nightly_totals(shards: int = 2) -> dict:
    parts = [shard_total.submit(i) for i in range(shards)]
    return {"flow": container_limits(), "tasks": [p.result() for p in parts]}


def deploy():
    """What a user runs once: the code stays in this folder (mounted at the same path on the local backend)."""
    return flow.from_source(str(HERE), entrypoint="prefect_deployment.py:nightly_totals").deploy(
        name="nightly", work_pool_name=POOL, job_variables={"cpus": 1, "memory": 1}, print_next_steps=False, ignore_warnings=True
    )


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prefect", *args], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=90)


def _until(check, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"{what} within {timeout:.0f}s")


def main() -> None:
    import socket
    import urllib.request

    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    state = Path(tempfile.mkdtemp(prefix="skyvm-prefect-demo-"))
    # ./dev demo starts one Prefect server for its Prefect parts and names it in PREFECT_API_URL;
    # run alone, this script starts its own.
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            api = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    env = {**os.environ, "PREFECT_HOME": str(state), "PREFECT_API_URL": api, "PREFECT_LOCAL_STORAGE_PATH": str(state / "results"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "0"}
    server = None
    if not os.environ.get("PREFECT_API_URL"):
        port = api.rsplit(":", 1)[1].split("/")[0]
        server = _start(["server", "start", "--host", "127.0.0.1", "--port", port], {k: v for k, v in env.items() if k != "PREFECT_API_URL"}, state / "server.log")
    worker = None
    try:
        _until(lambda: _healthy(urllib.request, api), "the Prefect server to answer")
        subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", POOL, "--type", "skyvm", "--overwrite"], env=env, check=True, capture_output=True)
        worker = _start(["worker", "start", "--pool", POOL, "--type", "skyvm"], env, state / "worker.log")
        with temporary_settings(updates={PREFECT_API_URL: api, PREFECT_LOCAL_STORAGE_PATH: str(state / "results")}):
            deployment_id = deploy()
            print(f"deployed nightly_totals/nightly to work pool {POOL!r} (type skyvm); the worker runs it")
            flow_run = run_deployment(deployment_id, parameters={"shards": 2}, timeout=600)
            print(f"flow run {flow_run.name}: {flow_run.state.type.value}")
            if not flow_run.state.is_completed():
                print((state / "worker.log").read_text()[-3000:])
                raise SystemExit(1)
            seen = flow_run.state.result()
            rows = [("flow", seen["flow"])] + [(f"task {i}", t["limits"]) for i, t in enumerate(seen["tasks"])]
            for name, limits in rows:
                print(f"  {name:<7} container={limits['cluster']:<44} cpus={limits['cpus']:g} memory={limits['memory_gib']:g} GiB")
            print(f"  result: {[t['total'] for t in seen['tasks']]}")
            from skyvm.backends.local import list_managed

            # The engine reports Completed from the node; the worker then releases the node: let it finish.
            _until(lambda: not [r for r in list_managed() if r["run_id"].endswith(str(flow_run.id))], "the flow run's containers to go")
    finally:
        if worker is not None:
            _stop(worker)
        if server is not None:
            _stop(server)


def _healthy(request, api: str) -> bool:
    try:
        with request.urlopen(api + "/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


if __name__ == "__main__":
    main()
