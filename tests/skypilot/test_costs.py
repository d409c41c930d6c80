"""A run's summary (skyvm.costs) covers nodes on a SkyPilot pool: each is a job on one of the pool's
workers, named by its pool. Its price is unknown while the backend reports none for a pool's workers,
and unknown it stays (named beside the total), never a cost of 0. The pool is the recording stand-in's
of test_pools.py: real SkyPilot tasks, workers that are real containers of the node image."""

from __future__ import annotations

import pytest

pytest.importorskip("sky")

from skyvm import Run  # noqa: E402
from test_pools import _pooled, add, pool_vm  # noqa: E402,F401 - pool_vm: the stand-in's fixture


def test_a_pool_node_has_its_row_naming_its_pool_and_an_unknown_price(pool_vm, cloud_settings):  # noqa: F811
    with Run(_pooled(cloud_settings)) as run:
        assert run.submit(add, 1, 2, node="pooled").result(300) == 3
        summary = run.summary()
    (applied,) = pool_vm.calls("pool_apply")
    (row,) = summary.rows
    assert (row["node"], row["backend"], row["cluster"], row["pool"]) == ("pooled", "skypilot", applied["pool"], applied["pool"])
    assert row["placement"] == f"pool {applied['pool']}: aws (as asked; not reported)" and row["limits"] == {"cpus": "2+"}
    assert row["duration_s"] > 0 and (row["hourly_price"], row["cost"]) == (None, None)
    assert (summary.nodes, summary.unpriced, summary.total_cost) == (1, ["pooled"], 0.0)
    lines = summary.table(width=None).splitlines()
    assert lines[1].split()[:3] == ["pooled", "pool", f"{applied['pool']}:"] and lines[1].split()[-2:] == ["unknown", "unknown"]
    assert lines[-1].split() == ["total", "1", "node(s)", "$0.000000", "+", "unknown", "(pooled)"]
