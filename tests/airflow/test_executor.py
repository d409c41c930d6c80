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

from netutil import free_port



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
    port = free_port()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__EXECUTOR": "airflow_skyvm.executors.skyvm_executor.SkyVMExecutor",
        "AIRFLOW__CORE__DAGS_FOLDER": str(HERE / "executor_dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__API_AUTH__JWT_SECRET": "skyvm-test-secret-" + os.urandom(8).hex(),
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "SKYVM_CONFIG": str(HERE / "dags" / "skyvm.yaml"),
    }
    out = airflow(env, "db", "migrate")
    assert out.returncode == 0, out.stderr[-3000:]
    procs = []
    logs = {}
    for name, args in (("api-server", ["api-server", "--port", str(port)]), ("dag-processor", ["dag-processor"]), ("scheduler", ["scheduler"])):
        logs[name] = tmp_path / f"{name}.log"
        procs.append(subprocess.Popen([sys.executable, "-m", "airflow", *args], env=env, stdout=open(logs[name], "w"), stderr=subprocess.STDOUT, start_new_session=True))
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
