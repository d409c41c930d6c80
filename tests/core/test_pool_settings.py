"""``pool:`` in the settings: its forms, and what SkyPilot would refuse for a pool, refused at validation."""

from __future__ import annotations

import pytest

from skyvm.errors import SettingsError
from skyvm.settings import SkyVMConfig


@pytest.mark.parametrize(
    "value,expected",
    [({"workers": 3}, (None, 3)), ("team-gpu", ("team-gpu", 1)), ({"name": "team-gpu", "workers": 2}, ("team-gpu", 2))],
)
def test_pool_forms(value, expected):
    pool = SkyVMConfig({"nodes": {"n": {"pool": value}}}).resolve("n").pool
    assert (pool.name, pool.workers) == expected and pool.shared == (expected[0] is not None)


@pytest.mark.parametrize(
    "layer,path,fragment",
    [
        ({"pool": {"workers": 0}}, "nodes.n.pool.workers", "from 1 to 1000 (warm workers kept for the nodes); got 0"),
        ({"pool": "Team_GPU"}, "nodes.n.pool.name", "got 'Team_GPU'"),
        ({"pool": {"worker": 2}}, "nodes.n.pool.worker", "did you mean 'workers'?"),
        ({"pool": 3}, "nodes.n.pool", "pool accepts {workers: N}, a pool name, or {name: NAME, workers: N}; got 3"),
        ({"pool": {"workers": 2}, "use_spot": True, "job_recovery": "FAILOVER"}, "nodes.n.job_recovery", "cannot be set with pool"),
        ({"pool": {"workers": 2}, "ordered": [{"cpus": 2}, {"cpus": 4}]}, "nodes.n.ordered", "SkyPilot's pools take no ordered candidates"),
        ({"pool": {"workers": 2}, "single_vm": True}, "nodes.n.single_vm", "conflicts with single_vm"),
    ],
)
def test_bad_pools_are_refused_naming_the_field_and_the_value(layer, path, fragment):
    with pytest.raises(SettingsError) as err:
        SkyVMConfig({"nodes": {"n": layer}})
    assert path in str(err.value) and fragment in str(err.value)


def test_a_pool_splits_the_signature_and_names_a_pool_per_run():
    from skyvm.plan import plan_node, pool_name

    config = SkyVMConfig({"defaults": {"cpus": 1}, "nodes": {"pooled": {"pool": {"workers": 2}}, "shared": {"pool": "team-cpu"}}})

    def spec(node, run_id):
        return plan_node(config.resolve(node), node=node, run_id=run_id, attempt_id="a", payload_url="p", result_url="r", image="img")

    plain = plan_node(config.resolve("plain"), node="plain", run_id="r1", attempt_id="a", payload_url="p", result_url="r", image="img")
    assert spec("pooled", "r1").signature != plain.signature  # pool nodes never share a plain node's cluster
    names = {pool_name(s.settings, s.signature, s.run_id) for s in (spec("pooled", "r1"), spec("pooled", "r2"))}
    assert len(names) == 2 and all(n.startswith("skyvm-pool-") and len(n) <= 63 for n in names)  # one per run
    assert pool_name(spec("shared", "r1").settings, "sig", "r1") == pool_name(spec("shared", "r2").settings, "sig", "r2") == "team-cpu"
