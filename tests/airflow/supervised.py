"""Runs one DAG as a worker would: every task under Airflow's supervisor, which writes the task log file.

``dag.test()`` runs tasks in its own process and logs to the console; a worker (LocalExecutor, Celery,
SkyVMExecutor's nodes) runs ``supervise_task``: the task process sends its structlog lines, stdlib
records and prints, unmasked, to the supervisor, which masks them with what it was told and writes
``<base_log_folder>/dag_id=.../attempt=N.log``. This executor does that for ``dag.test(use_executor=True)``,
with the in-process Execution API instead of an api-server.

    python supervised.py DAG_FILE DAG_ID   (AIRFLOW__CORE__EXECUTOR=supervised.SupervisingExecutor, this folder on PYTHONPATH)
"""

from __future__ import annotations

import json
import os
import sys

from airflow.executors.base_executor import BaseExecutor


class SupervisingExecutor(BaseExecutor):
    def _process_workloads(self, workloads) -> None:
        from airflow.configuration import conf
        from airflow.sdk.execution_time import supervisor

        supervise_task = getattr(supervisor, "supervise_task", None) or supervisor.supervise  # Airflow 3.1: supervise

        for workload in workloads:
            key = workload.ti.key
            self.queued_tasks.pop(key, None)
            self.running.add(key)
            code = supervise_task(
                ti=workload.ti,
                bundle_info=workload.bundle_info,
                dag_rel_path=workload.dag_rel_path,
                token=workload.token,
                client=supervisor.InProcessTestSupervisor._api_client(),
                log_path=os.path.join(conf.get("logging", "base_log_folder"), workload.log_path),
            )
            (self.success if code == 0 else self.fail)(key)

    def sync(self) -> None:
        pass  # each workload ran to its end in _process_workloads

    def end(self) -> None:
        pass


if __name__ == "__main__":
    import importlib.util

    spec = importlib.util.spec_from_file_location("dags_under_test", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = next(d for d in vars(module).values() if getattr(d, "dag_id", None) == sys.argv[2])
    dr = dag.test(use_executor=True)
    print("STATES " + json.dumps({ti.task_id: ti.state for ti in dr.get_task_instances()}))
