"""What a skyvm task's node ran as, where an Airflow user looks: at the end of the task's log, the
summary table (node, placement, limits, duration, price, cost; skyvm.costs), and the same rows as
JSON in the task's XCom ``skyvm`` for the DAG's other tasks:

    {"rows": [{"node": ..., "placement": ..., "cloud": ..., "limits": {...}, "duration_s": ...,
               "hourly_price": ..., "cost": ..., ...}], "total_cost": ..., "nodes": 1, "unpriced": []}

Both of SkyVMOperator's paths end with ``report``, as both end with the shared teardown: the plain one
once its run is closed, the deferrable one once ``execute_complete`` has released the node. A failed
or skipped task reports too (its node ran, and cost). Nothing is reported for a node that never
launched.

Holds ``report``, ``XCOM_KEY``. May import: skyvm.costs.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from skyvm.costs import Summary

XCOM_KEY = "skyvm"


def report(task: Any, context: Mapping[str, Any], rows: Iterable[Optional[Mapping[str, Any]]]) -> None:
    """The rows' summary at the end of the task's log and in its XCom ``skyvm``. Never raises: the
    task's own result (or error) matters more than its summary."""
    try:
        summary = Summary.of(rows)
        if not summary.rows:
            return
        task.log.info("skyvm: summary of task %s:\n%s", task.task_id, summary.table(width=None))
        context["ti"].xcom_push(key=XCOM_KEY, value=summary.to_json())
    except Exception:  # noqa: BLE001 - see above
        task.log.exception("skyvm: the summary of task %s could not be written", task.task_id)
