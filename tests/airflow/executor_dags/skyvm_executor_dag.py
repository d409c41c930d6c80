"""A DAG the executor test runs with a real scheduler: every task on its own node.

Only the Task SDK is used (no provider packages), as only it is in the node image.
"""

from __future__ import annotations

import datetime
import os

from airflow.sdk import DAG, BaseOperator

from skyvm.limits import container_limits


class WhereAmI(BaseOperator):
    def execute(self, context):
        upstream = context["ti"].xcom_pull(task_ids="first") if self.task_id == "second" else None
        return {"limits": container_limits(), "attempt": os.environ.get("SKYVM_ATTEMPT_ID"), "upstream_cpus": upstream and upstream["limits"]["cpus"]}


with DAG("skyvm_executor_dag", schedule=None, start_date=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc), catchup=False) as dag:
    first = WhereAmI(task_id="first", executor_config={"skyvm": {"cpus": 1.25}})
    second = WhereAmI(task_id="second")
    first >> second
