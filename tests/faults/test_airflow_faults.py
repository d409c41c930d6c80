"""Fault trials of the Airflow adapter (airflow and airflow31 environments), against the suite's real
metadata DB. The deferred ones are the trigger suite's own tests (tests/airflow/test_trigger.py),
run here as trials with what they leave counted, not copied."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("airflow_skyvm.operators.skyvm")

import test_trigger  # noqa: E402 - tests/airflow, put on the path by this folder's conftest
import trials  # noqa: E402
from test_trigger import inline_trigger  # noqa: E402,F401 - the fixture the trigger tests run with


# The deferred trials are tests/airflow/test_trigger.py's own, which ./dev test runs once already:
# here they run only as repeated trials (python -m bench faults, which sets SKYVM_FAULT_TRIALS).
repeated_only = pytest.mark.skipif(not os.environ.get("SKYVM_FAULT_TRIALS"), reason="run once by tests/airflow/test_trigger.py; repeated by python -m bench faults")


def left_by(dag_id: str) -> dict:
    return {"containers of the DAG": len(test_trigger.containers_of(dag_id)), "running skyvm containers": len(test_trigger.running_containers())}


def test_task_marked_failed_while_running(judge):
    judge(trials.airflow_marked_failed_while_running())


@repeated_only
def test_deferred_task_marked_failed_while_running(judge, dags, inline_trigger):  # noqa: F811
    test_trigger.test_a_deferred_task_marked_failed_or_timed_out_stops_the_node(dags, inline_trigger, "marked failed")
    judge(trials.Outcome(left=trials.settle(lambda: left_by(dags.deferred_marked_failed_dag.dag_id))))


@repeated_only
def test_triggerer_restarted_mid_wait_keeps_the_node(judge, dags, inline_trigger):  # noqa: F811
    test_trigger.test_triggerer_restart_keeps_the_node_and_a_fresh_trigger_completes_the_task(dags, inline_trigger)
    judge(trials.Outcome(left=trials.settle(lambda: left_by(dags.deferred_restart_dag.dag_id))))
