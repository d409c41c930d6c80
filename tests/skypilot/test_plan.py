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
    assert set(rows) == {"profile:heavy", "profile:on-s3", "profile:warm-pool", "profile:gpu-spot", "profile:gpu-capped", "count_words", "crunch"}
    assert (rows["profile:gpu-spot"]["instance_type"], rows["profile:gpu-spot"]["use_spot"]) == ("a2-highgpu-1g", True)
    assert (rows["crunch"]["cloud"], rows["crunch"]["instance_type"], rows["crunch"]["hourly_price"]) == ("aws", "c7i.large", 0.0892)
    table = _cli(str(ROOT / "dags" / "skyvm.yaml"), "--catalog-dir", catalog_dir)
    # The capped profile: the A100 spot candidate wins; the H100 loses on the cap.
    capped = rows["profile:gpu-capped"]
    assert (capped["instance_type"], capped["use_spot"], capped["max_hourly_cost"]) == ("a2-highgpu-1g", True, 3)
    assert [c["result"] for c in capped["candidates"]] == ["won", "lost"] and "over max_hourly_cost $3/hour" in capped["candidates"][1]["why"]
    assert "TOTAL (every node above running at once): $3.5098/hour" in table.stdout
    assert "profile:gpu-capped: candidate 1 [cpus=1+, memory=0.5+, accelerators=H100:1] lost" in table.stdout


def test_skyvm_plan_on_the_example_dag_file(catalog_dir):
    entries = entries_of_dag_file(str(ROOT / "dags" / "airflow_dag.py"))
    assert sorted(name for name, _ in entries) == ["count_words", "crunch", "report"]
    settings = dict(entries)
    assert settings["crunch"].cpus == "2+"  # nodes.crunch -> profile heavy, from the skyvm.yaml beside the DAG
    assert settings["report"].cpus == "0.5"  # sky_settings in the operator call
    out = _cli(str(ROOT / "dags" / "airflow_dag.py"), "--catalog-dir", catalog_dir, "--json")
    assert out.returncode == 1 and "1 node(s) cannot be placed or are over their max_hourly_cost: report" in out.stderr  # a CI gate fails
    out = _cli(str(ROOT / "dags" / "airflow_dag.py"), "--catalog-dir", catalog_dir, "--json", "--allow-unplaceable")
    assert out.returncode == 0, out.stderr
    rows = {r["node"]: r for r in json.loads(out.stdout)}
    assert rows["count_words"]["instance_type"] == "c7i.large"
    assert "error" in rows["report"]  # no instance has exactly 0.5 CPU: SkyPilot says so


def test_bad_catalog_dir_is_a_clear_error(tmp_path):
    out = _cli(str(ROOT / "dags" / "skyvm.yaml"), "--catalog-dir", str(tmp_path))
    assert out.returncode == 1 and "expected SkyPilot v8 catalogs" in out.stderr


def test_entries_cover_profiles_and_nodes():
    config = SkyVMConfig.load(ROOT / "dags" / "skyvm.yaml")
    assert [n for n, _ in entries_of_config(config)] == ["profile:heavy", "profile:on-s3", "profile:warm-pool", "profile:gpu-spot", "profile:gpu-capped", "count_words", "crunch"]


@pytest.fixture(scope="module")
def choices(catalog_dir):
    requests = {
        "any-of": NodeSettings(backend="skypilot", any_of=[{"infra": "aws", "accelerators": "A100:1"}, {"infra": "gcp", "accelerators": "A100:1", "use_spot": True}, {"infra": "lambda", "accelerators": "H100:8"}]),
        "ordered": NodeSettings(backend="skypilot", ordered=[{"infra": "lambda", "accelerators": "H100:8"}, {"infra": "gcp", "accelerators": "A100:1", "use_spot": True}]),
        "spot-fallback": NodeSettings(backend="skypilot", cloud="aws", cpus="4+", memory="16+", spot_fallback=True),
        "capped": NodeSettings(backend="skypilot", cloud="aws", cpus="4+", memory="16+", max_hourly_cost=0.1),
        "capped-pinned": NodeSettings(backend="skypilot", cloud="aws", instance_type="m7i.xlarge", max_hourly_cost=0.1),
        "within-cap": NodeSettings(backend="skypilot", cloud="aws", cpus="4+", memory="16+", max_hourly_cost=0.5),
        "capped-candidates": NodeSettings(backend="skypilot", any_of=[{"infra": "lambda", "accelerators": "H100:8"}, {"infra": "gcp", "accelerators": "A100:1"}], max_hourly_cost=1),
    }
    return {r["node"]: r for r in plan(list(requests.items()), catalog_dir=catalog_dir)}


def place_of(row):
    return (row["cloud"], row["instance_type"], row["use_spot"], row["hourly_price"])


def test_any_of_takes_the_cheapest_feasible_candidate_and_says_why_the_others_lost(choices):
    row = choices["any-of"]
    assert place_of(row) == ("gcp", "a2-highgpu-1g", True, 1.4873)
    aws, gcp, lam = row["candidates"]
    assert gcp["result"] == "won" and place_of(gcp) == place_of(row)
    assert aws["result"] == "lost" and aws["why"].startswith("not placeable") and "A100:8" in aws["why"]  # AWS sells A100s by eight
    assert lam["result"] == "lost" and lam["why"] == "$31.9200/hour, more than candidate 1's $1.4873/hour"


def test_ordered_takes_the_first_feasible_candidate(choices):
    row = choices["ordered"]
    assert place_of(row) == ("lambda", "gpu_8x_h100_sxm5", False, 31.92)
    assert [c["result"] for c in row["candidates"]] == ["won", "lost"]
    assert row["candidates"][1]["why"] == "comes after candidate 0, which is placeable"


def test_spot_fallback_is_spot_first_then_on_demand(choices):
    row = choices["spot-fallback"]
    assert place_of(row) == ("aws", "m7i.xlarge", True, 0.0816)
    spot, on_demand = row["candidates"]
    assert spot["result"] == "won" and on_demand["result"] == "lost" and place_of(on_demand) == ("aws", "m7i.xlarge", False, 0.2016)


@pytest.mark.parametrize(
    "node,message",
    [
        ("capped", "max_hourly_cost $0.1/hour: the cheapest feasible placement, m7i.xlarge on aws/us-east-1, costs $0.2016/hour"),
        # A pinned instance_type escapes SkyPilot's own cap filter: skyvm refuses it all the same.
        ("capped-pinned", "max_hourly_cost $0.1/hour: the cheapest feasible placement, m7i.xlarge on aws/us-east-1, costs $0.2016/hour"),
        ("capped-candidates", "max_hourly_cost $1/hour: the cheapest feasible placement, a2-highgpu-1g on gcp/europe-west4/europe-west4-a, costs $2.4277/hour"),
    ],
)
def test_the_cost_cap_refuses_naming_the_cheapest_placement_and_its_price(choices, node, message):
    assert choices[node]["error"] == message


def test_a_node_within_its_cap_is_placed(choices):
    assert place_of(choices["within-cap"]) == ("aws", "m7i.xlarge", False, 0.2016)
    assert all(c["result"] == "lost" and "over max_hourly_cost $1/hour" in c["why"] for c in choices["capped-candidates"]["candidates"])


def test_what_planning_relies_on_in_skypilot():
    """Planning swaps two functions of ``sky.check`` (bridge._clouds_assumed_enabled), which SkyPilot's
    optimizer reaches through the module. If an upgrade renames them, changes how they are called or
    imports them by name, plans would suddenly need cloud credentials: this test says why, first."""
    import inspect

    import sky.check
    import sky.optimizer
    import sky.resources

    from skyvm.skypilot.bridge import _clouds_assumed_enabled

    assert list(inspect.signature(sky.check.get_cached_enabled_clouds_or_refresh).parameters)[0] == "capability"
    assert "capability" in inspect.signature(sky.check.check_capability).parameters
    for module in (sky.optimizer, sky.resources):
        source = inspect.getsource(module)
        assert "sky_check.get_cached_enabled_clouds_or_refresh(" in source, f"{module.__name__} no longer calls sky.check through the module"
        assert not hasattr(module, "get_cached_enabled_clouds_or_refresh"), f"{module.__name__} imports the check by name: the swap would not reach it"
    assert {"dag", "quiet"} <= set(inspect.signature(sky.optimizer.Optimizer.optimize).parameters)
    assert hasattr(sky.Task(run="true"), "best_resources") and callable(sky.Resources.get_cost)
    before = sky.check.get_cached_enabled_clouds_or_refresh, sky.check.check_capability
    with _clouds_assumed_enabled(sky, ["aws", "gcp"]):
        assert [str(c) for c in sky.check.get_cached_enabled_clouds_or_refresh(None)] == ["AWS", "GCP"]
    assert (sky.check.get_cached_enabled_clouds_or_refresh, sky.check.check_capability) == before  # SkyPilot as it was
