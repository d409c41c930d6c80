"""The ``skyvm`` command as a user (or a CI gate) runs it: exit codes, ``--output json`` with the
table's fields, help with examples, shell completion. Real parts: SkyPilot's optimizer in SkyPilot's
own environment on the repo's catalog subset, a real registry, a real Docker container."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from skyvm import Run
from skyvm.backends.local import gc

ROOT = Path(__file__).resolve().parents[2]
CATALOG = str(ROOT / "tests" / "skypilot" / "catalog")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skyvm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "skyvm", *args], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def table_rows(text: str) -> tuple[list[str], list[list[str]]]:
    """A table's header cells and its rows' cells (cells are split on runs of two or more spaces)."""
    import re

    lines = [line for line in text.splitlines() if line.strip()]
    split = lambda line: re.split(r"\s{2,}", line.strip())  # noqa: E731
    return split(lines[0]), [split(line) for line in lines[1:]]


@pytest.fixture(scope="module")
def sky_env():
    """SkyPilot's own environment (the optimizer runs there; this one has no SkyPilot)."""
    python = os.environ.get("SKYVM_TEST_SKYPILOT_PYTHON", "")
    if not Path(python).is_file():
        if IN_CI or os.environ.get("SKYVM_REQUIRE_DOCKER"):
            pytest.fail("SKYVM_TEST_SKYPILOT_PYTHON must name SkyPilot's environment's python (./dev test sets it)")
        pytest.skip("no SkyPilot environment (set SKYVM_TEST_SKYPILOT_PYTHON)")
    return {"SKYVM_SKYPILOT_PYTHON": python}


def test_plan_exits_0_when_every_node_is_placed_and_json_carries_the_tables_fields(sky_env):
    table = skyvm("plan", str(ROOT / "dags" / "skyvm.yaml"), "--catalog-dir", CATALOG, env=sky_env)
    assert table.returncode == 0, table.stderr
    as_json = skyvm("plan", str(ROOT / "dags" / "skyvm.yaml"), "--catalog-dir", CATALOG, "--output", "json", env=sky_env)
    assert as_json.returncode == 0, as_json.stderr
    rows = {r["node"]: r for r in json.loads(as_json.stdout)}
    header, cells = table_rows(table.stdout.split("\nTOTAL")[0])
    assert header == ["NODE", "REQUESTED", "CLOUD", "REGION", "ZONE", "INSTANCE", "SPOT", "$/HOUR"]
    for line in cells:
        row = rows[line[0]]
        assert (line[2], line[5], line[6]) == (row["cloud"], row["instance_type"], "yes" if row["use_spot"] else "no")
        assert line[7].startswith(f"{row['pool']['hourly_price'] if row.get('pool') else row['hourly_price']:.4f}")
    assert set(rows) == {line[0] for line in cells}


def test_plan_exits_1_naming_every_unplaceable_or_overpriced_node_unless_told_to_report_only(sky_env, tmp_path):
    config = tmp_path / "skyvm.yaml"
    config.write_text(yaml.safe_dump({"defaults": {"backend": "skypilot", "cloud": "aws"}, "nodes": {
        "fits": {"cpus": "2+"},
        "half_a_cpu": {"cpus": "0.5"},  # no instance has exactly half a CPU
        "too_dear": {"cpus": "4+", "memory": "16+", "max_hourly_cost": 0.01},
    }}))
    refused = skyvm("plan", str(config), "--catalog-dir", CATALOG, env=sky_env)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "2 node(s) cannot be placed or are over their max_hourly_cost: half_a_cpu, too_dear" in refused.stderr
    assert "too_dear: not placeable: max_hourly_cost $0.01/hour" in refused.stdout  # the table still shows why
    reported = skyvm("plan", str(config), "--catalog-dir", CATALOG, "--allow-unplaceable", "-o", "json", env=sky_env)
    assert reported.returncode == 0, reported.stderr
    rows = {r["node"]: r for r in json.loads(reported.stdout)}
    assert "error" not in rows["fits"] and "error" in rows["half_a_cpu"] and rows["too_dear"]["error"].startswith("max_hourly_cost $0.01/hour")


def test_settings_json_and_table_carry_the_same_fields():
    args = ["settings", str(ROOT / "dags" / "skyvm.yaml"), "--node", "crunch"]
    as_json, as_table, as_yaml = skyvm(*args, "-o", "json"), skyvm(*args, "--output", "table"), skyvm(*args)
    assert as_json.returncode == as_table.returncode == as_yaml.returncode == 0, as_json.stderr + as_table.stderr
    data = json.loads(as_json.stdout)
    header, cells = table_rows(as_table.stdout)
    assert header == ["FIELD", "VALUE"]
    assert {line[0] for line in cells} == set(data)
    shown = {line[0]: line[1] if len(line) > 1 else "" for line in cells}
    assert shown["cpus"] == data["cpus"] == "2+" and json.loads(shown["envs"]) == data["envs"] == {"CRUNCH_MODE": "fast"}
    assert yaml.safe_load(as_yaml.stdout) == data  # the default, as before: YAML


def test_check_json_carries_the_tables_fields_and_the_same_exit_code(tmp_path, registry):
    config = tmp_path / "skyvm.yaml"
    config.write_text(yaml.safe_dump({"defaults": {"registry": {"server": registry.server, "username": registry.username, "password": "env:CLI_REGISTRY_PASSWORD"}}}))
    for password, code, result in ((os.environ["SKYVM_TEST_REGISTRY_PASSWORD"], 0, "OK"), ("wrong-" + os.urandom(4).hex(), 1, "FAIL")):
        env = {"CLI_REGISTRY_PASSWORD": password}
        table = skyvm("check", "--config", str(config), "--no-skypilot", env=env)
        as_json = skyvm("check", "--config", str(config), "--no-skypilot", "--output", "json", env=env)
        assert (table.returncode, as_json.returncode) == (code, code), table.stdout + table.stderr
        rows = json.loads(as_json.stdout)
        header, cells = table_rows(table.stdout.split(":\n", 1)[1])
        assert [list(r) for r in rows] == [[h.lower() for h in header]] * len(rows)
        assert [line[:3] for line in cells] == [[r["check"], r["target"], r["result"]] for r in rows]
        assert rows[0]["check"] == "registry" and rows[0]["result"] == result
        assert password not in table.stdout + as_json.stdout


@pytest.mark.usefixtures("docker_engine")
def test_status_json_carries_the_tables_fields():
    with Run({"defaults": {"down": False, "labels": {"purpose": "cli-status-test"}}}) as run:
        handle = run.submit(sum, [1, 2], node="summed")
        assert handle.result(120) == 3
    try:
        table, as_json = skyvm("status"), skyvm("status", "-o", "json")
        assert table.returncode == as_json.returncode == 0, table.stderr + as_json.stderr
        rows = {r["name"]: r for r in json.loads(as_json.stdout)}
        header, cells = table_rows(table.stdout.split("\n(")[0])
        assert header == ["NAME", "STATE", "RUN_ID", "NODE", "SIGNATURE", "DOWN", "STATUS"]
        line = next(line for line in cells if line[0] == handle.cluster)
        row = rows[handle.cluster]
        # Every column but STATUS ("Up 2 seconds": it moves on between the two calls).
        assert line[:-1] == [str(row[h.lower()]) for h in header[:-1]] and line[-1].startswith("Up ") and row["status"].startswith("Up ")
        assert row["run_id"] == run.run_id and row["node"] == "summed" and row["backend"] == "local"
        # --run: a run's clusters by its run id, or by the key inside it (what an orchestrator calls the run).
        key = run.run_id.split("-", 1)[1]
        for wanted in (run.run_id, key):
            only = json.loads(skyvm("status", "--run", wanted, "-o", "json").stdout)
            assert [r["name"] for r in only] == [handle.cluster]
        assert json.loads(skyvm("status", "--run", "no-such-run", "-o", "json").stdout) == []
    finally:
        assert handle.cluster in gc()


def test_help_has_every_command_and_examples_and_completion_works():
    top = skyvm("--help")
    assert top.returncode == 0, top.stderr
    for command in ("validate", "settings", "status", "gc", "plan", "check", "skypilot", "--install-completion"):
        assert command in top.stdout
    plan = skyvm("plan", "--help")
    assert plan.returncode == 0 and "Examples" in plan.stdout and "--allow-unplaceable" in plan.stdout and "--output" in plan.stdout
    assert skyvm("skypilot", "install", "--help").returncode == 0
    # What bash's completion asks: the commands that start with "pl", then plan's options.
    complete = skyvm(env={"_SKYVM_COMPLETE": "complete_bash", "COMP_WORDS": "skyvm pl", "COMP_CWORD": "1"})
    assert complete.stdout.split() == ["plan"], complete.stdout + complete.stderr
    options = skyvm(env={"_SKYVM_COMPLETE": "complete_bash", "COMP_WORDS": "skyvm plan --allow", "COMP_CWORD": "2"})
    assert "--allow-unplaceable" in options.stdout.split()


def test_bad_input_is_exit_2_naming_the_option_and_what_is_accepted():
    bad = skyvm("status", "--output", "xml")
    assert bad.returncode == 2 and "'xml' is not one of 'table', 'json'" in bad.stderr and "--output" in bad.stderr
    missing = skyvm("validate", "no-such-file.yaml")
    assert missing.returncode == 2 and "no-such-file.yaml: settings file not found" in missing.stderr


def test_plan_says_how_each_nodes_warm_runs_reach_their_cluster(sky_env, tmp_path):
    config = tmp_path / "skyvm.yaml"
    config.write_text(yaml.safe_dump({"defaults": {"backend": "skypilot", "cloud": "aws", "cpus": "2+"}, "nodes": {
        "plain": {},
        "recovered": {"use_spot": True, "job_recovery": "FAILOVER"},
        "pooled": {"pool": {"workers": 2}},
    }}))
    table = skyvm("plan", str(config), "--catalog-dir", CATALOG, env=sky_env)
    assert table.returncode == 0, table.stdout + table.stderr
    line = next(l for l in table.stdout.splitlines() if l.startswith("warm nodes"))
    assert "agent over SSH: plain" in line and "managed job (spot recovery): recovered" in line and "managed job on a pool worker: pooled" in line
    rows = {r["node"]: r for r in json.loads(skyvm("plan", str(config), "--catalog-dir", CATALOG, "-o", "json", env={**sky_env, "SKYVM_AGENT": "0"}).stdout)}
    assert rows["plain"]["warm_path"] == "sky exec (SKYVM_AGENT=0)" and rows["recovered"]["warm_path"] == "managed job (spot recovery)"
