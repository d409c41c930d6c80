"""Planning: signatures, cluster names, docker run args, envs vs secrets. Pure functions."""

from __future__ import annotations

import re

import pytest

from skyvm.plan import plan_node, signature
from skyvm.settings import NodeSettings

NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def spec(settings=None, run_id="run-1", node="n", image="img:1", **kw):
    return plan_node(
        settings or NodeSettings(),
        node=node,
        run_id=run_id,
        attempt_id=f"{node}-a1",
        payload_url="s3://b/payloads/abc",
        result_url="s3://b/results/n-a1",
        image=image,
        **kw,
    )


def test_equal_resources_share_a_signature_and_per_node_fields_do_not_split_it():
    a = NodeSettings(cpus=2, memory=4, envs={"A": "1"}, stream_logs=True, timeout=10)
    b = NodeSettings(cpus="2", memory="4", envs={"B": "2"}, stream_logs=False, secrets={"S": "x"})
    assert signature(a, "img") == signature(b, "img")
    assert spec(a, node="x").cluster_name == spec(b, node="y").cluster_name


@pytest.mark.parametrize(
    "change",
    [{"cpus": 4}, {"memory": 8}, {"accelerators": "T4"}, {"use_spot": True}, {"region": "us-east-1"}, {"disk_size": 100}, {"docker_run_args": ["--shm-size=1g"]}, {"down": False}],
)
def test_resource_fields_split_the_signature(change):
    base = NodeSettings(cpus=2, memory=4)
    assert signature(base, "img") != signature(base.model_copy(update=change), "img")


def test_image_splits_the_signature():
    assert signature(NodeSettings(), "a:1") != signature(NodeSettings(), "a:2")


@pytest.mark.parametrize(
    "run_id",
    ["run-1", "manual__2024-01-01T00:00:00+00:00", "8f14e45f-ceea-467f-a8c1-8f4b2a7d9a0b", "X" * 300, "___", "Scheduled/Run With Spaces"],
)
def test_cluster_names_are_valid_everywhere_and_deterministic(run_id):
    s = NodeSettings(cpus=2)
    names = {spec(s, run_id=run_id).cluster_name for _ in range(3)}
    assert len(names) == 1
    name = names.pop()
    assert NAME_RE.match(name) and len(name) <= 63
    for slot in (1, 12, 999):
        other = spec(s, run_id=run_id).cluster_name_for(slot)
        assert NAME_RE.match(other) and len(other) <= 63 and other != name


def test_run_ids_that_slug_alike_stay_apart():
    s = NodeSettings()
    assert spec(s, run_id="a_b").cluster_name != spec(s, run_id="a-b").cluster_name


def test_explicit_cluster_name_is_kept():
    assert spec(NodeSettings(cluster_name="my-cluster")).cluster_name == "my-cluster"


def test_accelerators_add_gpus_and_shm_unless_given():
    assert spec(NodeSettings()).docker_run_args == ()
    gpu = spec(NodeSettings(accelerators="T4:1")).docker_run_args
    assert gpu == ("--gpus", "all", "--shm-size=8g")
    own = spec(NodeSettings(accelerators="T4", docker_run_args=["--gpus=device=0", "--shm-size", "1g"])).docker_run_args
    assert own == ("--gpus=device=0", "--shm-size", "1g")


def test_secrets_stay_off_command_lines_and_apart_from_envs():
    s = NodeSettings(envs={"MODE": "fast"}, secrets={"API_TOKEN": "tok-123"})
    t = spec(s)
    assert t.secrets == {"API_TOKEN": "tok-123"}
    assert "API_TOKEN" not in t.envs and t.envs["MODE"] == "fast"
    for text in (t.run, t.setup, " ".join(t.docker_run_args), repr(t), str(t.public_dict())):
        assert "tok-123" not in text
    assert t.public_dict()["secrets"] == ["API_TOKEN"]


def test_run_command_starts_the_node_runtime():
    t = spec()
    assert t.run.startswith("python3 -m skyvm.node run --payload s3://b/payloads/abc --result s3://b/results/n-a1")
    assert t.setup == "python3 -m skyvm.node check"
    assert t.envs["SKYVM_NODE"] == "n" and t.envs["SKYVM_RUN_ID"] == "run-1"


def test_resources_hold_only_vm_fields_that_are_set():
    t = spec(NodeSettings(cpus="4+", accelerators={"A100": 1}, use_spot=True, labels={"team": "ml"}, envs={"X": "1"}))
    assert t.resources == {"cpus": "4+", "accelerators": {"A100": 1}, "use_spot": True, "labels": {"team": "ml"}}


def test_a_plan_asks_the_optimizer_once_per_distinct_request():
    """1,000 nodes of 5 signatures: 5 optimizer runs, not 1,000 (issue 10), and every node still gets its row."""
    from skyvm.plan import resources
    from skyvm.skypilot.placing import place
    from skyvm.skypilot.task_config import resources_config

    shapes = [NodeSettings(backend="skypilot", cpus=f"{n}+") for n in range(1, 6)]
    asked: list[dict] = []

    class CountingOptimizer:
        def optimize(self, tasks, clouds=None):
            asked.extend(tasks)
            return [{"cloud": "aws", "region": "r", "zone": None, "instance_type": t["resources"]["cpus"], "use_spot": False, "hourly_price": 1.0} for t in tasks]

    rows = place(CountingOptimizer(), [resources_config(resources(shapes[i % 5])) for i in range(1000)])
    assert len(asked) == 5 and len(rows) == 1000
    assert [r["instance_type"] for r in rows[:6]] == ["1+", "2+", "3+", "4+", "5+", "1+"]
