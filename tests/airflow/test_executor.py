"""SkyVMExecutor end to end: a real api-server, dag-processor and scheduler, every task in its own container."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netutil import start_owned

HERE = Path(__file__).resolve().parent


def airflow(env, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "airflow", *args], env=env, capture_output=True, text=True, timeout=timeout)


def query(db: Path, sql: str, *params):
    with sqlite3.connect(db, timeout=30) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture
def airflow_stack(tmp_path):
    home = tmp_path / "airflow-home"
    home.mkdir()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__EXECUTOR": "airflow_skyvm.executors.skyvm_executor.SkyVMExecutor",
        "AIRFLOW__CORE__DAGS_FOLDER": str(HERE / "executor_dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__API_AUTH__JWT_SECRET": "skyvm-test-secret-" + os.urandom(8).hex(),
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "SKYVM_CONFIG": str(HERE / "dags" / "skyvm.yaml"),
    }
    out = airflow(env, "db", "migrate")
    assert out.returncode == 0, out.stderr[-3000:]
    logs = {name: tmp_path / f"{name}.log" for name in ("api-server", "dag-processor", "scheduler")}

    def start(name: str, args: list, env: dict) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "airflow", *args], env=env, stdout=open(logs[name], "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def with_port(port: int) -> dict:
        return {
            **env,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        }

    # The api-server on a port it holds itself: never another test run's (the nodes and the scheduler talk to it).
    api, port = start_owned(lambda port: start("api-server", ["api-server", "--port", str(port)], with_port(port)), None, logs["api-server"], what="Airflow api-server", timeout=180)
    env = with_port(port)
    procs = [api, start("dag-processor", ["dag-processor"], env), start("scheduler", ["scheduler"], env)]
    try:
        yield env, home / "airflow.db", logs
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, 15)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)


def test_executor_runs_every_task_on_its_own_node(airflow_stack):
    env, db, logs = airflow_stack
    dag_id = "skyvm_executor_dag"
    deadline = time.time() + 180
    while time.time() < deadline and not query(db, "select dag_id from dag where dag_id = ?", dag_id):
        time.sleep(2)
    assert query(db, "select dag_id from dag where dag_id = ?", dag_id), logs["dag-processor"].read_text()[-3000:]
    assert airflow(env, "dags", "unpause", dag_id).returncode == 0
    out = airflow(env, "dags", "trigger", dag_id)
    assert out.returncode == 0, out.stderr[-2000:]
    deadline = time.time() + 600
    state = None
    while time.time() < deadline:
        rows = query(db, "select state from dag_run where dag_id = ?", dag_id)
        state = rows[0][0] if rows else None
        if state in ("success", "failed"):
            break
        time.sleep(3)
    tis = dict(query(db, "select task_id, state from task_instance where dag_id = ?", dag_id))
    assert state == "success", f"dag run {state}, tasks {tis}\n" + logs["scheduler"].read_text()[-6000:]
    values = {task_id: json.loads(value) for task_id, value in query(db, "select task_id, value from xcom where dag_id = ? and key = 'return_value'", dag_id)}
    first, second = values["first"], values["second"]
    # Each task ran in its own skyvm container, with its own limits (executor_config for the first).
    assert first["limits"]["cluster"] and second["limits"]["cluster"]
    assert first["attempt"] != second["attempt"]
    assert first["limits"]["cpus"] == 1.25 and second["limits"]["cpus"] == 0.5
    assert second["upstream_cpus"] == 1.25  # XCom crossed from one node to the next through the execution API


def run_containers(run_id: str) -> list[str]:
    from skyvm.backends.local import home_id, list_managed

    return [r["name"] for r in list_managed() if r["run_id"] == run_id and r["home"] == home_id()]


def test_end_is_bounded_cancels_the_nodes_still_running_and_fails_their_tasks(airflow_db, capfd):
    """The scheduler stopping: end() waits end_timeout, names what still runs, cancels it, leaves nothing.
    On the way: a finished task's workload (its token) is no secret the executor keeps any more."""
    import threading

    from workloads import execute_task

    from airflow_skyvm.executors.skyvm_executor import SkyVMExecutor
    from skyvm import redact

    class SleepyExecutor(SkyVMExecutor):
        # The task "quick" ends at once; any other sleeps until it is cancelled.
        command = 'case "$SKYVM_AIRFLOW_WORKLOAD" in *\\"quick\\"*) echo quick ;; *) echo skyvm-sleepy-started; sleep 600 ;; esac'

    executor = SleepyExecutor(parallelism=2, end_timeout=2)
    executor.start()
    sleeper, quick = execute_task("skyvm_end_bound", "sleeper", "manual-1"), execute_task("skyvm_end_bound", "quick", "manual-1")
    for workload in (sleeper, quick):
        executor.queue_workload(workload, session=None)
    executor.heartbeat()  # as the scheduler's loop: queued -> nodes
    handle = executor._handles[sleeper.ti.key]
    events = {}
    deadline = time.time() + 300
    while time.time() < deadline and not (quick.ti.key in events and "skyvm-sleepy-started" in handle.logs()):
        executor.heartbeat()
        events.update(executor.get_event_buffer())
        time.sleep(0.5)
    assert "skyvm-sleepy-started" in handle.logs(), handle.logs()
    assert events[quick.ti.key][0] == "success"
    known = redact.known()
    assert sleeper.model_dump_json() in known  # a running task's workload is masked...
    assert quick.model_dump_json() not in known  # ...a finished one's is let go
    ender = threading.Thread(target=executor.end, daemon=True)
    ender.start()
    ender.join(240)  # a liveness bound far above end_timeout + the cancel: only a hang fails it
    assert not ender.is_alive(), "end() did not return"
    state, info = executor.get_event_buffer()[sleeper.ti.key]
    assert state == "failed" and "still running 2s after the executor was told to end" in info
    out = capfd.readouterr()
    assert "1 task(s) still running 2s into end()" in out.out + out.err and "sleeper" in out.out + out.err
    assert run_containers(executor._run.run_id) == []  # the node was stopped, its cluster removed
    assert sleeper.model_dump_json() not in redact.known()


def test_a_bad_end_timeout_is_named(airflow_db, monkeypatch):
    from airflow_skyvm.executors.skyvm_executor import SkyVMExecutor
    from skyvm.errors import SkyVMError

    monkeypatch.setenv("AIRFLOW__SKYVM__EXECUTOR_END_TIMEOUT", "soon")
    with pytest.raises(SkyVMError, match=r"\[skyvm\] executor_end_timeout: expected seconds \(a number >= 0, e.g. 60\), got 'soon'"):
        SkyVMExecutor()
    monkeypatch.setenv("AIRFLOW__SKYVM__EXECUTOR_END_TIMEOUT", "5")
    assert SkyVMExecutor().end_timeout == 5.0
