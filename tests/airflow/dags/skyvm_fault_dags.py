"""DAGs of the Airflow fault trials (tests/faults): in the DAGs folder, so that dag.test() finds them
serialized with the rest of the folder's bundle."""

from __future__ import annotations

import datetime

from airflow.sdk import DAG

from airflow_skyvm.operators.skyvm import SkyVMOperator

START = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)

with DAG("skyvm_fault_marked_failed", schedule=None, start_date=START) as marked_failed_dag:
    SkyVMOperator(task_id="sleeper", bash_command="echo started; sleep 600", sky_settings={"cpus": 0.5})
