"""Airflow's own ExecuteTask workloads, as the scheduler queues them, for driving an executor directly
(tests/airflow/test_executor.py, and bench/executor_soak.py's soak)."""

from __future__ import annotations

import secrets
import uuid


def execute_task(dag_id: str, task_id: str, run_id: str, *, try_number: int = 1, executor_config: dict | None = None):
    """An ``ExecuteTask`` workload for one task instance, with a token of a real one's size."""
    from airflow.executors import workloads

    ti_model = workloads.ExecuteTask.model_fields["ti"].annotation  # TaskInstanceDTO (3.2+) / TaskInstance (3.1)
    ti = ti_model(
        id=uuid.uuid4(),
        task_id=task_id,
        dag_id=dag_id,
        run_id=run_id,
        try_number=try_number,
        dag_version_id=uuid.uuid4(),
        pool_slots=1,
        priority_weight=1,
        queue="default",
        executor_config=executor_config,
    )
    return workloads.ExecuteTask(
        ti=ti,
        token=secrets.token_urlsafe(300),  # a JWT is a few hundred characters: the node's secret, per task
        dag_rel_path="skyvm_executor_dag.py",
        bundle_info=workloads.BundleInfo(name="dags-folder", version=None),
        log_path=None,
    )
