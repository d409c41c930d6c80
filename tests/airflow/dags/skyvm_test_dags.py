"""DAGs the Airflow suite runs with dag.test(). Settings: dags/skyvm.yaml via $SKYVM_CONFIG."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from airflow.sdk import DAG, task

from airflow_skyvm.operators.skyvm import SkyVMOperator
from skyvm.limits import container_limits

START = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
COUNTER_DIR = "/tmp/skyvm-airflow-test-counter"


def double(x):
    return 2 * int(x)


def limits():
    return container_limits()


def slow_double(x, seconds, marker):
    import time

    print(marker, flush=True)
    time.sleep(seconds)
    return 2 * int(x)


def count_and_fail(marker_dir):
    marker = Path(marker_dir) / "attempts"
    with open(marker, "a") as fh:
        fh.write(os.environ["SKYVM_ATTEMPT_ID"] + "\n")
    n = len(marker.read_text().split())
    raise ValueError(f"remote failure number {n}")


with DAG("skyvm_xcom", schedule=None, start_date=START, render_template_as_native_obj=True, params={"base": 21}) as xcom_dag:
    first = SkyVMOperator(task_id="first", python_callable=double, op_args=["{{ params.base }}"])
    second = SkyVMOperator(task_id="second", python_callable=double, op_args=["{{ ti.xcom_pull(task_ids='first') }}"])
    shout = SkyVMOperator(task_id="shout", bash_command="echo working; echo 'run {{ dag.dag_id }} got {{ ti.xcom_pull(task_ids=\"second\") }}'")
    first >> second >> shout

with DAG("skyvm_limits", schedule=None, start_date=START) as limits_dag:
    SkyVMOperator(task_id="from_yaml", python_callable=limits)
    SkyVMOperator(task_id="profiled", python_callable=limits, profile="bigger")
    SkyVMOperator(task_id="inline", python_callable=limits, sky_settings={"cpus": 1.25, "memory": 0.5})

with DAG("skyvm_fails", schedule=None, start_date=START) as fails_dag:
    SkyVMOperator(
        task_id="flaky",
        python_callable=count_and_fail,
        op_args=["/counter"],
        sky_settings={"docker_run_args": ["--volume", f"{COUNTER_DIR}:/counter"]},
        retries=1,
        retry_delay=datetime.timedelta(seconds=0),
    )

with DAG("skyvm_deferred", schedule=None, start_date=START) as deferred_dag:
    SkyVMOperator(task_id="deferred", bash_command="echo deferred start; sleep 2; echo 99", deferrable=True, poll_interval=0.5)
    SkyVMOperator(task_id="deferred_py", python_callable=double, op_args=[5], deferrable=True, poll_interval=0.5)

# Deferred tasks that tests/airflow/test_trigger.py runs through a triggerer's stops, kills and faults.
with DAG("skyvm_deferred_restart", schedule=None, start_date=START) as deferred_restart_dag:
    SkyVMOperator(task_id="waits", python_callable=slow_double, op_args=[21, 10, "restart-marker"], deferrable=True, poll_interval=0.5)

with DAG("skyvm_deferred_marked_failed", schedule=None, start_date=START) as deferred_marked_failed_dag:
    SkyVMOperator(task_id="sleeper", bash_command="echo started; sleep 300", deferrable=True, poll_interval=0.5)

with DAG("skyvm_deferred_log_once", schedule=None, start_date=START) as deferred_log_once_dag:
    SkyVMOperator(task_id="chatty", bash_command="echo skyvm-log-once-marker; sleep 2; echo 5", deferrable=True, poll_interval=0.5)

with DAG("skyvm_deferred_unreachable", schedule=None, start_date=START) as deferred_unreachable_dag:
    SkyVMOperator(task_id="unreachable", python_callable=slow_double, op_args=[4, 10, "unreachable-marker"], deferrable=True, poll_interval=0.5)

with DAG("skyvm_deferred_gone", schedule=None, start_date=START) as deferred_gone_dag:
    SkyVMOperator(task_id="vanishes", bash_command="echo here; sleep 300", deferrable=True, poll_interval=0.5)

with DAG("skyvm_killed", schedule=None, start_date=START) as killed_dag:
    SkyVMOperator(task_id="sleeper", bash_command="echo started; sleep 300", execution_timeout=datetime.timedelta(seconds=4))

with DAG("skyvm_decorated", schedule=None, start_date=START) as decorated_dag:

    @task.skyvm(cpus=1.25)
    def add(a, b):
        return {"sum": a + b, "cpus": container_limits()["cpus"]}

    @task.skyvm(profile="bigger")
    def report(result):
        return f"{result['sum']} on {container_limits()['cpus']:g} CPUs"

    report(add(2, 3))


def interrupted():
    raise KeyboardInterrupt("interrupted on the node")


def exits(code):
    import sys

    sys.exit(code)


# A node's BaseException fails its task alone (or skips it, per skip_on_exit_code): the run goes on.
with DAG("skyvm_base_exceptions", schedule=None, start_date=START) as base_exceptions_dag:

    @task.skyvm
    def keyboard_interrupt():
        interrupted()

    _raised = [
        keyboard_interrupt(),
        SkyVMOperator(task_id="system_exit", python_callable=exits, op_args=[3]),
        SkyVMOperator(task_id="system_exit_skipped", python_callable=exits, op_args=[3], skip_on_exit_code=3),
        SkyVMOperator(task_id="interrupted_deferred", python_callable=interrupted, deferrable=True, poll_interval=0.5),
    ]
    _raised >> SkyVMOperator(task_id="after", bash_command="echo the run went on", trigger_rule="all_done")


# skip_on_exit_code as the Docker provider's decorator tests (test_skip_docker_operator) have it:
# task_id: (skip_on_exit_code, the code the callable exits with, the task's state).
SKIP_CASES = {
    "unset_0": (None, 0, "success"),
    "unset_100": (None, 100, "failed"),
    "one_0": (100, 0, "success"),
    "one_100": (100, 100, "skipped"),
    "one_101": (100, 101, "failed"),
    "zero_0": (0, 0, "skipped"),
    "list_100": ([100], 100, "skipped"),
    "list_101": ([100, 102], 101, "failed"),
    "tuple_100": ((100,), 100, "skipped"),
}

with DAG("skyvm_skip_on_exit_code", schedule=None, start_date=START) as skip_dag:

    @task.skyvm
    def exits_with(code):
        raise SystemExit(code)

    for _task_id, (_skip, _code, _) in SKIP_CASES.items():
        exits_with.override(task_id=_task_id, skip_on_exit_code=_skip)(_code)
    SkyVMOperator(task_id="command_skipped", bash_command="echo skipping; exit 42", skip_on_exit_code=[42, 43])
    SkyVMOperator(task_id="command_failed", bash_command="exit 44", skip_on_exit_code=[42, 43])
    SkyVMOperator(task_id="deferred_skipped", python_callable=exits, op_args=[7], skip_on_exit_code=7, deferrable=True, poll_interval=0.5)
    SkyVMOperator(task_id="deferred_failed", bash_command="exit 8", skip_on_exit_code=7, deferrable=True, poll_interval=0.5)


def skypilot_settings() -> dict:
    """backend: skypilot with the test's own S3 server and registry (test_skypilot_backend.py sets them before parsing)."""
    return json.loads(os.environ.get("SKYVM_TEST_SKYPILOT_SETTINGS", '{"backend": "skypilot"}'))


with DAG("skyvm_on_skypilot", schedule=None, start_date=START, render_template_as_native_obj=True) as skypilot_dag:
    _vm = skypilot_settings()
    _first = SkyVMOperator(task_id="first", python_callable=double, op_args=[21], sky_settings=_vm)
    _second = SkyVMOperator(task_id="second", python_callable=double, op_args=["{{ ti.xcom_pull(task_ids='first') }}"], sky_settings=_vm)
    SkyVMOperator(task_id="broken", bash_command="echo about to fail; exit 3", sky_settings=_vm)
    # Deferrable: the worker slot is free while the VM works; the trigger polls SkyPilot's job status.
    SkyVMOperator(task_id="deferred", python_callable=double, op_args=[50], sky_settings=_vm, deferrable=True, poll_interval=0.5)
    _first >> _second


def clusters_of(summary):
    return [row["cluster"] for row in summary["rows"]]


# Each task's summary, at the end of its log and in its XCom "skyvm": the plain path, the deferrable
# one, a failed task's, and a task downstream reading one (as a DAG's other tasks do).
with DAG("skyvm_summary", schedule=None, start_date=START, render_template_as_native_obj=True) as summary_dag:
    _sync = SkyVMOperator(task_id="sync", python_callable=limits, sky_settings={"cpus": 1.25, "memory": 0.5})
    SkyVMOperator(task_id="deferred", python_callable=limits, deferrable=True, poll_interval=0.5)
    SkyVMOperator(task_id="fails", bash_command="echo failing; exit 3")
    _sync >> SkyVMOperator(task_id="reads", python_callable=clusters_of, op_args=["{{ ti.xcom_pull(task_ids='sync', key='skyvm') }}"])
