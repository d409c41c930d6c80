"""A node through the real SkyPilot API server, started by the test in SkyPilot's own environment.

The calls go through ``SubprocessBridge`` (the path an Airflow environment
takes, where ``sky`` cannot be installed) to ``sky.server.server`` on loopback:
the request queue, its worker processes, the optimizer on the repo's catalogs
and the launch path up to provisioning (``dryrun``) are SkyPilot's own. Only
cloud access is assumed (the clouds are enabled as in SkyPilot's tests); no
VM is made.
"""

from __future__ import annotations

import sys

import pytest

sky = pytest.importorskip("sky")

from skyvm import InfrastructureError, Run  # noqa: E402
from skyvm.backends.skypilot import SkyPilotBackend  # noqa: E402
from skyvm.plan import plan_node  # noqa: E402
from skyvm.settings import NodeSettings, RegistrySettings  # noqa: E402
from skyvm.skypilot.bridge import SubprocessBridge  # noqa: E402
from skyvm.skypilot.planning import plan  # noqa: E402
from skyvm.skypilot.task_config import task_config  # noqa: E402

REGISTRY_PASSWORD = "pw-dry-7f3a"
NODE_SECRET = "tok-dry-91c2"


@pytest.fixture(scope="module")
def bridge(api_server):
    return SubprocessBridge(sys.executable, env=api_server.client_env)


def chosen_row(lines: list[str]) -> str:
    rows = [line for line in lines if "\u2714" in line]  # SkyPilot marks its pick with a check mark
    assert len(rows) == 1, "\n".join(lines)
    return rows[0]


def test_a_node_dry_run_launches_through_the_real_server_where_skyvm_plan_said(bridge, api_server, catalog_dir):
    settings = NodeSettings(
        backend="skypilot", cloud="gcp", cpus="4+", memory="16+", envs={"MODE": "dry"},
        registry=RegistrySettings(server="registry.example.com", username="bot", password_env="UNUSED"),
    )
    spec = plan_node(
        settings, node="train", run_id="manual__dry", attempt_id="train-1",
        payload_url="s3://bucket/payloads/x", result_url="s3://bucket/results/train-1",
        image="registry.example.com/skyvm-node:abc", secrets={"API_TOKEN": NODE_SECRET},
    )
    task = task_config(spec, registry_password=REGISTRY_PASSWORD)
    (planned,) = plan([("train", settings)], catalog_dir=catalog_dir)

    lines: list[str] = []
    answer = bridge.launch(task, spec.cluster_name, idle_minutes_to_autostop=30, down=True, retry_until_up=False, dryrun=True, on_log=lines.append)

    assert answer == {"job_id": None, "cluster": spec.cluster_name, "dryrun": True}
    assert any("Dryrun finished" in line for line in lines), "\n".join(lines)
    row = chosen_row(lines)
    # The server's launch picks what `skyvm plan` printed for the same node.
    assert planned["cloud"] == "gcp" and planned["instance_type"] in row and "GCP" in row and planned["region"] in row
    # Credentials never reach a log: not the node's stream, not the server's.
    for text in ("\n".join(lines), api_server.log):
        assert REGISTRY_PASSWORD not in text and NODE_SECRET not in text
    # A dry run provisions nothing.
    assert spec.cluster_name not in [c["name"] for c in bridge.status()]


def test_a_spot_gpu_node_dry_run_is_priced_as_the_plan_says(bridge, catalog_dir):
    settings = NodeSettings(backend="skypilot", cloud="gcp", accelerators={"A100": 1}, use_spot=True)
    (planned,) = plan([("gpu", settings)], catalog_dir=catalog_dir)
    task = {"name": "gpu", "run": "nvidia-smi", "resources": {"infra": "gcp", "accelerators": {"A100": 1}, "use_spot": True}}
    lines: list[str] = []
    bridge.launch(task, "skyvm-dry-gpu", dryrun=True, on_log=lines.append)
    row = chosen_row(lines)
    assert planned["instance_type"] == "a2-highgpu-1g" and planned["use_spot"]
    assert "a2-highgpu-1g" in row and planned["zone"] in row  # the same spot zone


def test_an_impossible_node_fails_with_skypilots_reason_and_leaves_no_cluster(api_server, bridge, cloud_settings, monkeypatch, use_skypilot):
    # The whole run path (image pushed, payload in S3) with the real server answering the launch.
    use_skypilot(SkyPilotBackend(bridge))
    settings = {**cloud_settings, "defaults": {**cloud_settings["defaults"], "cloud": "gcp"}, "nodes": {"huge": {"accelerators": {"H200": 16}}}}
    with Run(settings) as run:
        handle = run.submit(sum, [1, 2], node="huge")
        with pytest.raises(InfrastructureError, match=r"Catalog does not contain any instances satisfying the request: 1x GCP\(cpus=2\+, \{'H200': 16\}") as excinfo:
            handle.result(300)
        assert "\x1b[" not in str(excinfo.value)  # SkyPilot's colour codes are stripped for the engine's log
    assert not [c for c in bridge.status() if c["name"].startswith("skyvm-")]


def test_down_of_a_cluster_that_is_not_there_is_not_an_error(bridge):
    bridge.down("skyvm-never-launched")  # a failed launch's cleanup must not raise over the real error


def test_skyvm_status_asks_the_real_server(api_server):
    import json
    import subprocess

    out = subprocess.run([sys.executable, "-m", "skyvm", "status", "--skypilot", "--json"], env=api_server.client_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r for r in json.loads(out.stdout) if r["backend"] == "skypilot"] == []  # dry runs and failed launches left nothing


def test_a_node_with_candidates_dry_run_lands_where_skyvm_plan_said(bridge, catalog_dir):
    # The server's clouds are gcp and lambda: both candidates are placeable, the A100 spot is cheaper.
    settings = NodeSettings(
        backend="skypilot", any_of=[{"infra": "lambda", "accelerators": "H100:8"}, {"infra": "gcp", "accelerators": "A100:1", "use_spot": True}],
        max_hourly_cost=40, skypilot={"launch": {"no_setup": True}},
    )
    (planned,) = plan([("pick", settings)], catalog_dir=catalog_dir)
    assert [c["result"] for c in planned["candidates"]] == ["lost", "won"]
    spec = plan_node(
        settings, node="pick", run_id="manual__dry", attempt_id="pick-1", payload_url="s3://bucket/payloads/x",
        result_url="s3://bucket/results/pick-1", image="registry.example.com/skyvm-node:abc",
    )
    lines: list[str] = []
    bridge.launch(task_config(spec), spec.cluster_name, dryrun=True, on_log=lines.append, options=settings.skypilot["launch"])
    row = chosen_row(lines)
    assert "GCP" in row and planned["instance_type"] in row and planned["zone"] in row, "\n".join(lines)
    assert spec.cluster_name not in [c["name"] for c in bridge.status()]
