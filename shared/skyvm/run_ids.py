"""Run ids: the one scheme that names every run skyvm starts.

A run id is ``<kind>-<key>``. The kind says who started the run; the key is the orchestrator's own
id of it (a Prefect flow run's id; an Airflow DAG, DAG run and task instance), so the run is found
again from the orchestrator's side (its clusters carry the run id as their ``run-id`` label), or a
fresh random one where the orchestrator has none. Cluster and pool names are made from it
(``skyvm.plan``), cut to fit: keep keys short where you can.

Holds the kinds and ``run_id``. May import: the standard library only.
"""

from __future__ import annotations

import uuid

#: ``skyvm.Run`` made in code, outside any orchestrator
RUN = "run"
#: SkyVMTaskRunner: the task nodes of one Prefect flow run (key: the flow run's id)
PREFECT_TASKS = "prefect"
#: SkyVMWorker: a Prefect flow run's own node (key: the flow run's id)
PREFECT_FLOW = "prefect-flow"
#: SkyVMOperator: one Airflow task instance (key: DAG id, DAG run id, node name)
AIRFLOW_TASK = "af"
#: SkyVMExecutor: every task instance one scheduler process runs (key: random)
AIRFLOW_EXECUTOR = "af-executor"

# 12 hex digits: unique enough among one install's runs, short enough for a cluster name.
_RANDOM_DIGITS = 12


def run_id(kind: str, *key: object) -> str:
    """``kind-key1-key2...``; with no key, ``kind-<12 random hex digits>``."""
    parts = [str(k) for k in key] or [uuid.uuid4().hex[:_RANDOM_DIGITS]]
    return "-".join([kind, *parts])
