"""``pool: {workers: N}`` on the local backend: the signature's N clusters start ahead, so the
first node already runs warm, and the workers take one node each at a time."""

from __future__ import annotations

import time

import pytest

from skyvm import Run
from skyvm.backends.local import list_managed
from skyvm.limits import container_limits

pytestmark = pytest.mark.usefixtures("docker_engine")


def limits():
    return container_limits()


def nap(seconds):
    time.sleep(seconds)
    return seconds


def test_a_pool_of_two_starts_two_clusters_ahead_and_the_first_node_runs_warm():
    config = {"defaults": {"cpus": 1, "memory": 0.5}, "nodes": {"pooled": {"pool": {"workers": 2}}}}
    with Run(config) as run:
        first = run.submit(limits, node="pooled")
        seen = first.result(300)
        clusters = {r["name"] for r in list_managed() if r["run_id"] == run.run_id}
        assert len(clusters) == 2 and seen["cluster"] in clusters  # both workers up, the node on one of them
        assert first.ref.fresh is False  # no cold start: its cluster was up before the node was given to it
        assert "2 warm cluster(s) started ahead" in first.logs()
        assert (seen["cpus"], seen["memory_gib"]) == (1.0, 0.5)  # the signature's limits, as without a pool
        # Three more at once: the two workers take one each and the third waits for a free one,
        # never a third cluster (one node per worker at a time, as on a SkyPilot pool).
        more = [run.submit(nap, 1, node="pooled") for _ in range(3)]
        assert [h.result(300) for h in more] == [1, 1, 1]
        assert all(h.ref.fresh is False for h in more) and {h.cluster for h in more} <= clusters
        assert {r["name"] for r in list_managed() if r["run_id"] == run.run_id} == clusters
    assert [r for r in list_managed() if r["run_id"] == run.run_id] == []  # down: true, the pool went with the run
