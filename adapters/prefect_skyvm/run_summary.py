"""What happened, where a Prefect user looks: a flow run's skyvm nodes as a table artifact of the flow run.

One row per node (skyvm.costs: its placement, limits, duration, $/h and cost) and the run's total in
the artifact's description, published when SkyVMTaskRunner's run ends. Never fails the flow: a summary
that cannot be published is a warning.

Holds ``publish``. May import: prefect, prefect_skyvm.relay, skyvm.costs.
"""

from __future__ import annotations

import logging

from skyvm.costs import Summary

ARTIFACT_KEY = "skyvm-nodes"

log = logging.getLogger("prefect_skyvm")


def artifact_rows(summary: Summary) -> list[dict]:
    """The rows as a table artifact shows them: flat cells (the limits as text)."""
    from skyvm.costs import limits_text

    keep = ("node", "placement", "backend", "cluster", "duration_s", "hourly_price", "cost")
    return [{**{k: row.get(k) for k in keep}, "limits": limits_text(row.get("limits") or {})} for row in summary.rows]


def description(summary: Summary) -> str:
    total = f"total ${summary.total_cost:.6f}" + (f" + unknown ({', '.join(summary.unpriced)})" if summary.unpriced else "")
    shown = "" if summary.nodes == len(summary.rows) else f", the last {len(summary.rows)} listed"
    return f"skyvm: {summary.nodes} node(s){shown}, {total}"


def publish(summary: Summary, flow_run_id) -> None:
    """The summary as flow run ``flow_run_id``'s table artifact ``skyvm-nodes`` (nothing when no node ran).
    The flow run is named, not taken from the context: the task runner ends after its flow run's context."""
    if not summary.rows or flow_run_id is None:
        return
    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactCreate

        from prefect_skyvm.relay import outside_runs

        artifact = ArtifactCreate(key=ARTIFACT_KEY, type="table", data=artifact_rows(summary), description=description(summary), flow_run_id=flow_run_id)
        with get_client(sync_client=True) as client:
            # Its "created" event must not name the flow run this process's events worker started in.
            outside_runs(client.create_artifact, artifact)
    except Exception as exc:  # noqa: BLE001 - the flow's outcome is not the summary's
        log.warning("skyvm: could not publish the run's node summary as an artifact: %s", exc)
