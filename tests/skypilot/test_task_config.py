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
