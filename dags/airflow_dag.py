"""An Airflow DAG on skyvm: each task runs in its own container, settings from dags/skyvm.yaml.

    ./dev run airflow -- python dags/airflow_dag.py     (runs it once with dag.test())

- `count_words`: SkyVMOperator with a Python callable (settings: the file's defaults)
- `crunch`: @task.skyvm; nodes.crunch in skyvm.yaml gives it the `heavy` profile
- `report`: a shell command, templated with both results, deferrable (no worker slot held)
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from airflow.sdk import DAG, task

from airflow_skyvm.operators.skyvm import SkyVMOperator
from skyvm.limits import container_limits

SETTINGS = str(Path(__file__).with_name("skyvm.yaml"))


def count_words(text: str) -> dict:
    return {"words": len(text.split()), "limits": container_limits()}


with DAG(
    "skyvm_word_pipeline",
    schedule=None,
    start_date=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
    render_template_as_native_obj=True,
    tags=["skyvm", "example"],
) as dag:
    words = SkyVMOperator(
        task_id="count_words",
        python_callable=count_words,
        op_args=["the quick brown fox jumps over the lazy dog"],
        settings_file=SETTINGS,
    )

    @task.skyvm(settings_file=SETTINGS)
    def crunch(n: int) -> dict:
        return {"sum_of_squares": sum(i * i for i in range(n)), "limits": container_limits()}

    report = SkyVMOperator(
        task_id="report",
        bash_command=(
            "echo words={{ ti.xcom_pull(task_ids='count_words')['words'] }} "
            "sum={{ ti.xcom_pull(task_ids='crunch')['sum_of_squares'] }} "
            "cpu_quota_us=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cut -d' ' -f1 /sys/fs/cgroup/cpu.max)"
        ),
        sky_settings={"cpus": 0.5, "memory": 0.25},
        settings_file=SETTINGS,
        deferrable=True,
        poll_interval=0.5,
    )
    [words, crunch(1_000_000)] >> report


if __name__ == "__main__":
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    dr = dag.test()
    print(f"\nDAG run {dr.run_id}: {dr.state}")
    with create_session() as session:
        for ti in sorted(dr.get_task_instances(), key=lambda t: t.task_id):
            query = dict(run_id=dr.run_id, dag_ids=dr.dag_id, task_ids=ti.task_id, key="return_value")
            try:
                rows = session.scalars(XComModel.get_many(**query)).all()
            except TypeError:
                rows = XComModel.get_many(**query, session=session).all()
            value = XComModel.deserialize_value(rows[0]) if rows else None
            if isinstance(value, dict) and "limits" in value:
                lim = value.pop("limits")
                print(f"{ti.task_id:<12} {ti.state:<8} container={lim['cluster']:<40} cpus={lim['cpus']:g} memory={lim['memory_gib']:g} GiB  result={value}")
            else:
                print(f"{ti.task_id:<12} {ti.state:<8} result={value}")
    raise SystemExit(0 if dr.state == "success" else 1)
