"""Real sky.Task / sky.Resources built from every settings field, round-tripped through SkyPilot's own parser."""

from __future__ import annotations

import pytest

sky = pytest.importorskip("sky")

from skyvm.plan import plan_node  # noqa: E402
from skyvm.settings import NodeSettings, RegistrySettings  # noqa: E402
from skyvm.skypilot.task_config import task_config  # noqa: E402


def spec_for(settings: NodeSettings, image="registry.example.com/skyvm-node:abc"):
    return plan_node(
        settings, node="train", run_id="manual__2026-01-01T00:00:00+00:00", attempt_id="train-1",
        payload_url="s3://bucket/payloads/x", result_url="s3://bucket/results/train-1", image=image,
        secrets={"API_TOKEN": "tok-secret"},
    )


def roundtrip(cfg):
    task = sky.Task.from_yaml_config(dict(cfg))
    again = sky.Task.from_yaml_config(task.to_yaml_config())
    (res,) = list(again.resources)
    return again, res


def test_every_field_reaches_real_skypilot_objects():
    s = NodeSettings(
        backend="skypilot", infra="aws/us-east-1/us-east-1a", instance_type="p3.2xlarge", cpus="8+", memory="32+",
        accelerators={"V100": 1}, accelerator_args={"runtime_version": "tpu-vm-base"}, use_spot=True,
        job_recovery={"strategy": "FAILOVER", "max_restarts_on_errors": 2}, disk_size=256, disk_tier="high",
        ports=[8080, "9000-9010"], labels={"team": "ml"}, envs={"MODE": "fast"}, docker_run_args=["--shm-size=16g"],
        registry=RegistrySettings(server="registry.example.com", username="bot", password_env="REG_PW"),
    )
    cfg = task_config(spec_for(s), registry_password="pw-1")
    task, res = roundtrip(cfg)
    assert str(res.cloud) == "AWS" and res.region == "us-east-1" and res.zone == "us-east-1a"
    assert res.instance_type == "p3.2xlarge" and res.cpus == "8+" and res.memory == "32+"
    assert res.accelerators == {"V100": 1} and res.use_spot
    assert res.job_recovery["strategy"] == "FAILOVER" and res.job_recovery["max_restarts_on_errors"] == 2
    assert res.disk_size == 256 and str(res.disk_tier.value) == "high"
    assert res.ports == ["8080", "9000-9010"]
    assert res.labels["team"] == "ml" and res.labels["skyvm-node"] == "train"
    assert res.extract_docker_image() == "registry.example.com/skyvm-node:abc"  # image_id: docker:<image>
    # docker_run_args become SkyPilot's docker run options; accelerators add --gpus (the user's --shm-size stays)
    assert res.cluster_config_overrides == {"docker": {"run_options": ["--shm-size=16g", "--gpus", "all"]}}
    # envs and secrets apart; registry credentials as SkyPilot's docker secrets
    assert task.envs["MODE"] == "fast" and "API_TOKEN" not in task.envs
    secret = {k: getattr(v, "get_secret_value", lambda v=v: v)() for k, v in task.secrets.items()}
    assert "tok-secret" not in repr(task.secrets)  # SkyPilot masks them too
    assert secret["API_TOKEN"] == "tok-secret"
    assert secret["SKYPILOT_DOCKER_PASSWORD"] == "pw-1" and secret["SKYPILOT_DOCKER_SERVER"] == "registry.example.com"
    assert "tok-secret" not in task.run and "pw-1" not in (task.setup or "")
    assert task.run.startswith("python3 -m skyvm.node run")


@pytest.mark.parametrize(
    "fields,check",
    [
        ({"cloud": "gcp", "region": "us-central1"}, lambda r: (str(r.cloud), r.region) == ("GCP", "us-central1")),
        ({"infra": "k8s/my-context"}, lambda r: str(r.cloud) == "Kubernetes"),
        ({"cloud": "lambda", "accelerators": "H100:8"}, lambda r: str(r.cloud) == "Lambda" and r.accelerators == {"H100": 8}),
        ({"cloud": "azure", "disk_tier": "best"}, lambda r: str(r.cloud) == "Azure"),
        ({"accelerators": "T4"}, lambda r: r.accelerators == {"T4": 1}),
        ({"use_spot": True, "job_recovery": "EAGER_NEXT_REGION"}, lambda r: r.use_spot and r.job_recovery["strategy"] == "EAGER_NEXT_REGION"),
    ],
)
def test_cloud_forms(fields, check):
    _, res = roundtrip(task_config(spec_for(NodeSettings(backend="skypilot", **fields))))
    assert check(res)


def test_a_vm_image_keeps_the_vm_and_runs_the_container_itself():
    s = NodeSettings(backend="skypilot", cloud="aws", region="us-east-1", image_id="ami-0123456789abcdef0", envs={"MODE": "x"})
    task, res = roundtrip(task_config(spec_for(s)))
    assert res.image_id == {"us-east-1": "ami-0123456789abcdef0"}
    assert "docker run" in task.run and "-e MODE" in task.run and "-e API_TOKEN" in task.run
    assert "tok-secret" not in task.run


def test_candidates_and_the_newer_settings_reach_real_skypilot_objects():
    s = NodeSettings(
        backend="skypilot", cpus="4+", max_hourly_cost=40, network_tier="best", num_nodes=2, workdir=".",
        any_of=[{"infra": "gcp", "accelerators": "A100", "use_spot": True}, {"infra": "aws", "accelerators": "H100:8"}],
        file_mounts={"/data": "s3://bucket/data"}, autostop={"idle_minutes": 7, "down": True, "wait_for": "jobs"},
        skypilot={"resources": {"local_disk": "ssd"}, "task": {"event_callback": "echo done"}},
    )
    task, _ = roundtrip_all(task_config(spec_for(s)))
    assert isinstance(task.resources, set) and len(task.resources) == 2  # any_of: SkyPilot chooses among them
    by_cloud = {str(r.cloud): r for r in task.resources}
    gcp, aws = by_cloud["GCP"], by_cloud["AWS"]
    assert gcp.use_spot and gcp.accelerators == {"A100": 1} and not aws.use_spot and aws.accelerators == {"H100": 8}
    for res in (gcp, aws):  # what every candidate shares stays with each
        assert res.cpus == "4+" and res.network_tier.value == "best" and res.max_hourly_cost == 40
        assert (res.autostop_config.idle_minutes, res.autostop_config.down, res.autostop_config.wait_for.value) == (7, True, "jobs")
        assert res.labels["skyvm-node"] == "train" and res.extract_docker_image() == "registry.example.com/skyvm-node:abc"
        assert res.local_disk.startswith("ssd")  # the pass-through
    assert task.num_nodes == 2 and task.workdir == "." and task.file_mounts == {"/data": "s3://bucket/data"}
    assert task.event_callback == "echo done"


@pytest.mark.parametrize(
    "fields,expected",
    [
        ({"ordered": [{"infra": "lambda", "accelerators": "H100:8"}, {"infra": "gcp", "accelerators": "A100", "use_spot": True}]}, [("Lambda", False), ("GCP", True)]),
        ({"cloud": "aws", "cpus": "4+", "spot_fallback": True}, [("AWS", True), ("AWS", False)]),
    ],
)
def test_ordered_and_spot_fallback_keep_their_order(fields, expected):
    task, _ = roundtrip_all(task_config(spec_for(NodeSettings(backend="skypilot", **fields))))
    assert isinstance(task.resources, list)  # ordered: SkyPilot tries them in this order
    assert [(str(r.cloud), bool(r.use_spot)) for r in task.resources] == expected


def test_a_callable_on_every_rank_says_so_to_the_node_runtime():
    cfg = task_config(spec_for(NodeSettings(backend="skypilot", num_nodes=3, all_ranks=True)))
    assert cfg["num_nodes"] == 3 and cfg["envs"]["SKYVM_ALL_RANKS"] == "1"
    assert "SKYVM_ALL_RANKS" not in task_config(spec_for(NodeSettings(backend="skypilot", num_nodes=3)))["envs"]


@pytest.mark.parametrize(
    "section,fields,fragment",
    [
        ("resources", {"local_disk": 5}, "skypilot.resources"),
        ("resources", {"lokal_disk": "ssd"}, "did you mean 'local_disk'"),
        ("task", {"event_callbak": "x"}, "did you mean 'event_callback'"),
        ("launch", {"fastt": True}, "did you mean 'fast'"),
    ],
)
def test_the_pass_through_is_checked_against_skypilots_own_schema(section, fields, fragment):
    from skyvm.errors import SettingsError
    from skyvm.settings import SkyVMConfig

    with pytest.raises(SettingsError, match=fragment) as err:
        SkyVMConfig({"nodes": {"n": {"backend": "skypilot", "skypilot": {section: fields}}}}, source="s.yaml")
    assert f"nodes.n.skypilot.{section}" in str(err.value)


def roundtrip_all(cfg):
    task = sky.Task.from_yaml_config(dict(cfg))
    return sky.Task.from_yaml_config(task.to_yaml_config()), task
