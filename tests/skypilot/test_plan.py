"""SkyPilot's optimizer, offline, on catalog files kept in the repo; and `skyvm plan` on the examples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from skyvm.settings import NodeSettings, SkyVMConfig
from skyvm.skypilot.planning import entries_of_config, entries_of_dag_file, plan

pytest.importorskip("sky")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def picks(catalog_dir):
    requests = {
        "cpu-aws": NodeSettings(backend="skypilot", cpus="4+", memory="16+", cloud="aws"),
        "a100-spot-gcp": NodeSettings(backend="skypilot", accelerators="A100:1", use_spot=True, cloud="gcp"),
        "h100x8-lambda": NodeSettings(backend="skypilot", accelerators="H100:8", cloud="lambda"),
        "a100-aws": NodeSettings(backend="skypilot", accelerators="A100:1", cloud="aws"),
        "cpu-spot-any": NodeSettings(backend="skypilot", cpus="4+", memory="16+", use_spot=True),
        "region-pinned": NodeSettings(backend="skypilot", cpus="4+", memory="16+", infra="aws/us-west-2"),
    }
    rows = plan(list(requests.items()), catalog_dir=catalog_dir)
    return {r["node"]: r for r in rows}


@pytest.mark.parametrize(
    "node,cloud,region,zone,instance,spot,price",
    [
        ("cpu-aws", "aws", "us-east-1", None, "m7i.xlarge", False, 0.2016),
        ("a100-spot-gcp", "gcp", "europe-west4", "europe-west4-a", "a2-highgpu-1g", True, 1.4873),
        ("h100x8-lambda", "lambda", "us-east-1", None, "gpu_8x_h100_sxm5", False, 31.92),
        ("cpu-spot-any", "azure", "eastus", None, "Standard_D4s_v5", True, 0.0211),
    ],
)
def test_optimizer_picks_from_the_catalogs(picks, node, cloud, region, zone, instance, spot, price):
    row = picks[node]
    assert (row["cloud"], row["region"], row["zone"], row["instance_type"], row["use_spot"], row["hourly_price"]) == (cloud, region, zone, instance, spot, price)


def test_region_pin_is_respected(picks):
    row = picks["region-pinned"]
    assert row["cloud"] == "aws" and row["region"] == "us-west-2"


def test_impossible_request_gets_skypilots_reason(picks):
    row = picks["a100-aws"]
    assert "error" in row and "A100:8" in row["error"]  # AWS offers A100 only eight at a time


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "skyvm", "plan", *args], capture_output=True, text=True, timeout=300)


def test_skyvm_plan_on_the_example_yaml(catalog_dir):
    out = _cli(str(ROOT / "dags" / "skyvm.yaml"), "--catalog-dir", catalog_dir, "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["node"]: r for r in json.loads(out.stdout)}
    assert set(rows) == {"profile:heavy", "profile:on-s3", "profile:gpu-spot", "count_words", "crunch"}
    assert (rows["profile:gpu-spot"]["instance_type"], rows["profile:gpu-spot"]["use_spot"]) == ("a2-highgpu-1g", True)
    assert (rows["crunch"]["cloud"], rows["crunch"]["instance_type"], rows["crunch"]["hourly_price"]) == ("aws", "c7i.large", 0.0892)
    table = _cli(str(ROOT / "dags" / "skyvm.yaml"), "--catalog-dir", catalog_dir)
    assert "TOTAL (every node above running at once): $1.8441/hour" in table.stdout


def test_skyvm_plan_on_the_example_dag_file(catalog_dir):
    entries = entries_of_dag_file(str(ROOT / "dags" / "airflow_dag.py"))
    assert sorted(name for name, _ in entries) == ["count_words", "crunch", "report"]
    settings = dict(entries)
    assert settings["crunch"].cpus == "2+"  # nodes.crunch -> profile heavy, from the skyvm.yaml beside the DAG
    assert settings["report"].cpus == "0.5"  # sky_settings in the operator call
    out = _cli(str(ROOT / "dags" / "airflow_dag.py"), "--catalog-dir", catalog_dir, "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["node"]: r for r in json.loads(out.stdout)}
    assert rows["count_words"]["instance_type"] == "c7i.large"
    assert "error" in rows["report"]  # no instance has exactly 0.5 CPU: SkyPilot says so


def test_bad_catalog_dir_is_a_clear_error(tmp_path):
    out = _cli(str(ROOT / "dags" / "skyvm.yaml"), "--catalog-dir", str(tmp_path))
    assert out.returncode == 1 and "expected SkyPilot v8 catalogs" in out.stderr


def test_entries_cover_profiles_and_nodes():
    config = SkyVMConfig.load(ROOT / "dags" / "skyvm.yaml")
    assert [n for n, _ in entries_of_config(config)] == ["profile:heavy", "profile:on-s3", "profile:gpu-spot", "count_words", "crunch"]
