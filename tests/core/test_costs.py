"""A run's summary (skyvm.costs): every node, where it ran, its limits, how long, its price and cost,
and the total, as rows, as JSON and as a table; what ``Run.close`` logs. Real containers on the local
backend; a node's rows are checked against what the node saw from inside its container."""

from __future__ import annotations

import json
import logging

import pytest

from skyvm import Run
from skyvm.context import Context
from skyvm.limits import container_limits

pytestmark = pytest.mark.usefixtures("docker_engine")

CONFIG = {
    "defaults": {"cpus": 0.5, "memory": 0.5},
    "nodes": {"big": {"cpus": 1, "memory": 0.75}, "pooled": {"pool": {"workers": 1}}},
}


def limits():
    return container_limits()


def table_lines(text: str) -> dict[str, str]:
    """The table's lines by their first cell (the node, ``NODE`` for the header, ``total``)."""
    return {line.split()[0]: line for line in text.splitlines() if line.strip()}


def test_every_node_pool_nodes_too_has_its_container_limits_duration_and_cost_and_close_logs_the_table(caplog):
    caplog.set_level(logging.INFO, logger="skyvm")
    with Run(CONFIG) as run:
        handles = {n: run.submit(limits, node=n) for n in ("small", "big", "pooled")}
        seen = {n: h.result(300) for n, h in handles.items()}
        summary = run.summary()
        rows = {r["node"]: r for r in run.cost_summary()}
    assert set(rows) == {"small", "big", "pooled"} and summary.nodes == 3 and summary.unpriced == []
    for node, row in rows.items():
        inside = seen[node]
        # The container it names is the one the node ran in, with the limits the row lists.
        assert row["cluster"] == inside["cluster"] and row["backend"] == "local"
        assert row["placement"] == f"local ({inside['cluster']})"
        assert (float(row["limits"]["cpus"]), float(row["limits"]["memory"])) == (inside["cpus"], inside["memory_gib"])
        assert row["duration_s"] > 0 and row["started_at"] == pytest.approx(handles[node].started_at, abs=0.1)
        # A local container costs nothing by the hour: a price of 0, not an unknown one.
        assert (row["hourly_price"], row["cost"]) == (0.0, 0.0)
    assert (seen["big"]["cpus"], seen["big"]["memory_gib"]) == (1.0, 0.75) and (seen["small"]["cpus"], seen["small"]["memory_gib"]) == (0.5, 0.5)
    # JSON as an engine stores it (an XCom, an artifact): the same rows and total come back.
    stored = json.loads(json.dumps(summary.to_json()))
    assert stored == {"rows": summary.rows, "total_cost": 0.0, "nodes": 3, "unpriced": []}

    lines = table_lines(summary.table(width=None))
    assert lines["NODE"].split() == ["NODE", "PLACEMENT", "LIMITS", "DURATION", "PRICE", "COST"]
    assert "cpus=1 memory=0.75GiB" in lines["big"] and f"local ({seen['big']['cluster']})" in lines["big"]
    assert f"{rows['big']['duration_s']:.1f}s" in lines["big"] and "$0.0000/h" in lines["big"]
    assert lines["total"].split() == ["total", "3", "node(s)", "$0.000000"]
    # Run.close logged the same table, under the run's id.
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"skyvm summary of run {run.run_id}:")]
    assert len(logged) == 1
    assert table_lines(logged[0])["big"] == lines["big"].rstrip() and "total" in table_lines(logged[0])


def test_a_long_lived_run_lists_its_last_rows_and_totals_every_node():
    with Run(CONFIG, ctx=Context(cost_rows=2)) as run:
        for i in range(3):
            run.submit(limits, node=f"n{i}").result(300)
        summary = run.summary()
    assert [r["node"] for r in summary.rows] == ["n1", "n2"] and summary.nodes == 3
    assert table_lines(summary.table(width=None))["total"].split()[:7] == ["total", "3", "node(s),", "the", "last", "2", "listed"]



def pid():
    import os

    return os.getpid()


def test_a_node_run_as_a_host_process_has_no_limits_and_its_placement_names_its_process():
    # Where no Docker engine is reachable, the local backend runs nodes as plain host processes.
    from skyvm.backends.processes import ProcessBackend
    from skyvm.backends.registry import use_backend

    use_backend(ProcessBackend(), "local")
    try:
        with Run(CONFIG) as run:
            ran_as = run.submit(pid, node="big").result(300)
            (row,) = run.cost_summary()
    finally:
        use_backend(None, "local")
    assert (row["backend"], row["cluster"], row["placement"]) == ("local-process", f"process-{ran_as}", f"local process (process-{ran_as})")
    # Its settings ask for 1 CPU, but a host process is held to none: the row does not claim one.
    assert (row["limits"], row["hourly_price"], row["cost"]) == ({}, 0.0, 0.0)
    assert "  none  " in run.summary().table(width=None).splitlines()[1]
