"""Settings: accepted forms, precedence, errors that name file, field and what is accepted."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from skyvm.errors import SettingsError
from skyvm.settings import NodeSettings, SkyVMConfig, as_config

EXAMPLE = textwrap.dedent(
    """
    defaults:
      cpus: 1
      memory: "2+"
      envs: {STAGE: dev, SHARED: from-defaults}
      idle_minutes_to_autostop: 10
    profiles:
      gpu:
        accelerators: {V100: 2}
        use_spot: true
        spot_recovery: FAILOVER
        envs: {SHARED: from-profile}
      big:
        cpus: "8+"
        memory: 32
    nodes:
      train:
        profile: gpu
        disk_size: 200
        envs: {NODE: train}
      etl:
        cpus: 2
    """
)


@pytest.fixture
def example_file(tmp_path):
    path = tmp_path / "skyvm.yaml"
    path.write_text(EXAMPLE)
    return path


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("cpus", 2, "2"),
        ("cpus", "2", "2"),
        ("cpus", "2+", "2+"),
        ("cpus", 0.5, "0.5"),
        ("memory", 16, "16"),
        ("memory", "16+", "16+"),
        ("accelerators", "V100", "V100"),
        ("accelerators", "V100:2", "V100:2"),
        ("accelerators", {"V100": 2}, {"V100": 2}),
        ("job_recovery", "FAILOVER", "FAILOVER"),
        ("job_recovery", {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": 3}, {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": 3}),
        ("image_id", "ami-123", "ami-123"),
        ("image_id", {"us-east-1": "ami-1", "us-west-2": "ami-2"}, {"us-east-1": "ami-1", "us-west-2": "ami-2"}),
        ("disk_tier", "best", "best"),
        ("infra", "aws/us-east-1", "aws/us-east-1"),
        ("infra", "k8s/my-context", "k8s/my-context"),
        ("ports", [8080, "9000-9010"], [8080, "9000-9010"]),
    ],
)
def test_accepted_forms(field, value, expected):
    assert getattr(NodeSettings(**{field: value}), field) == expected


def test_every_zenml_field_exists():
    zenml = [
        "instance_type", "cpus", "memory", "accelerators", "accelerator_args", "use_spot", "job_recovery", "region", "zone",
        "image_id", "disk_size", "disk_tier", "cluster_name", "retry_until_up", "idle_minutes_to_autostop", "down",
        "stream_logs", "docker_run_args",
    ]
    ours = ["cloud", "infra", "envs", "ports", "labels", "timeout", "backend"]
    assert set(zenml + ours) <= set(NodeSettings.model_fields)


def test_defaults_match_the_seed():
    s = NodeSettings()
    assert (s.backend, s.down, s.stream_logs, s.idle_minutes_to_autostop) == ("local", True, True, 30)


def test_spot_recovery_is_a_deprecated_alias():
    assert NodeSettings(use_spot=True, spot_recovery="failover").job_recovery == "failover"
    with pytest.raises(ValueError, match="deprecated alias"):
        NodeSettings(spot_recovery="FAILOVER", job_recovery="FAILOVER")


@pytest.mark.parametrize(
    "data,path,fragment",
    [
        ({"defaults": {"cpu": 2}}, "defaults.cpu", "did you mean 'cpus'"),
        ({"nodes": {"a": {"spot_recovry": "x"}}}, "nodes.a.spot_recovry", "unknown field"),
        ({"nodes": {"a": {"cpus": "lots"}}}, "nodes.a.cpus", "'2+'"),
        ({"nodes": {"a": {"cpus": -1}}}, "nodes.a.cpus", "positive"),
        ({"nodes": {"a": {"accelerators": "V100:0"}}}, "nodes.a.accelerators", "positive"),
        ({"nodes": {"a": {"accelerators": {"V100": 1, "T4": 1}}}}, "nodes.a.accelerators", "exactly one"),
        ({"nodes": {"a": {"disk_tier": "fast"}}}, "nodes.a.disk_tier", "got 'fast'; accepted: 'low', 'medium', 'high', 'ultra', 'best'"),
        ({"nodes": {"a": {"disk_tier": "hihg"}}}, "nodes.a.disk_tier", "got 'hihg' (did you mean 'high'?)"),
        ({"nodes": {"a": {"cloud": "oracle"}}}, "nodes.a.cloud", "'aws'"),
        ({"defaults": {"cloud": "digitalocean"}}, "defaults.cloud", "got 'digitalocean'; accepted: 'aws', 'gcp'"),
        ({"nodes": {"a": {"backend": "k8s"}}}, "nodes.a.backend", "got 'k8s'; accepted: 'local', 'skypilot'"),
        ({"nodes": {"a": {"job_recovery": "RETRY"}}}, "nodes.a.job_recovery", "FAILOVER, EAGER_NEXT_REGION, NONE"),
        ({"nodes": {"a": {"infra": "aws/us-east-1", "region": "us-west-2"}}}, "nodes.a.region", "conflicts with region/zone"),
        ({"nodes": {"a": {"infra": "oracle/x"}}}, "nodes.a.infra", "CLOUD[/REGION[/ZONE]]"),
        ({"nodes": {"a": {"infra": "awz/us-east-1"}}}, "nodes.a.infra", "got 'awz/us-east-1' (did you mean 'aws'?)"),
        ({"nodes": {"a": {"job_recovery": "FAILOVR"}}}, "nodes.a.job_recovery", "got 'FAILOVR' (did you mean 'FAILOVER'?)"),
        ({"nodes": {"a": {"cloud": "gcp", "infra": "aws"}}}, "nodes.a.cloud", "conflicts with infra"),
        # Defaults alone are a whole node: checked with no profiles or nodes, named at the defaults.
        ({"defaults": {"cloud": "lambda", "use_spot": True}}, "defaults.use_spot", "Lambda Cloud does not support use_spot"),
        ({"defaults": {"infra": "aws", "region": "us-east-1"}}, "defaults.region", "conflicts with region/zone"),
        # A profile merged over the defaults: the error names the layer holding the bad field.
        ({"defaults": {"cloud": "lambda"}, "profiles": {"gpu": {"use_spot": True}}}, "profiles.gpu.use_spot", "Lambda"),
        ({"defaults": {"region": "us-east-1"}, "profiles": {"k": {"infra": "aws"}}, "nodes": {"a": {"profile": "k"}}}, "defaults.region", "conflicts"),
        # Candidates, autostop and the pass-through, checked like the node's own fields.
        ({"nodes": {"a": {"backend": "skypilot", "any_of": [{"cpus": 2}, {"cpu": 4}]}}}, "nodes.a.any_of.1.cpu", "did you mean 'cpus'"),
        ({"nodes": {"a": {"backend": "skypilot", "ordered": [{"cloud": "lambda", "use_spot": True}]}}}, "nodes.a.ordered.0.use_spot", "Lambda Cloud does not support use_spot"),
        ({"nodes": {"a": {"any_of": [{"cpus": 2}], "ordered": [{"cpus": 4}]}}}, "nodes.a.ordered", "not both"),
        ({"nodes": {"a": {"any_of": []}}}, "nodes.a.any_of", "non-empty list"),
        ({"nodes": {"a": {"spot_fallback": True, "use_spot": True}}}, "nodes.a.spot_fallback", "drop use_spot"),
        ({"nodes": {"a": {"cloud": "lambda", "spot_fallback": True}}}, "nodes.a.spot_fallback", "Lambda Cloud does not support spot_fallback"),
        ({"nodes": {"a": {"max_hourly_cost": 0}}}, "nodes.a.max_hourly_cost", "greater than 0"),
        ({"nodes": {"a": {"backend": "skypilot", "pool": {"workers": 2}, "spot_fallback": True}}}, "nodes.a.spot_fallback", "all spot or all on demand"),
        ({"nodes": {"a": {"network_tier": "fast"}}}, "nodes.a.network_tier", "got 'fast'; accepted: 'standard', 'best'"),
        ({"nodes": {"a": {"num_nodes": 2}}}, "nodes.a.num_nodes", "needs backend: skypilot"),
        ({"nodes": {"a": {"autostop": {"idle_minute": 5}}}}, "nodes.a.autostop.idle_minute", "did you mean 'idle_minutes'"),
        ({"nodes": {"a": {"autostop": {"wait_for": "job"}}}}, "nodes.a.autostop.wait_for", "got 'job' (did you mean 'jobs'?)"),
        ({"nodes": {"a": {"skypilot": {"resource": {}}}}}, "nodes.a.skypilot.resource", "did you mean 'resources'"),
        ({"nodes": {"a": {"skypilot": {"resources": {"cpus": 4}}}}}, "nodes.a.skypilot.resources.cpus", "use cpus instead"),
        ({"nodes": {"a": {"cluster_name": "My_Cluster"}}}, "nodes.a.cluster_name", "lowercase"),
        ({"nodes": {"a": {"ports": ["http"]}}}, "nodes.a.ports", "port numbers"),
        ({"nodes": {"a": {"envs": {"1BAD": "x"}}}}, "nodes.a.envs", "not a valid environment variable name"),
        ({"nodes": {"a": {"profile": "gpu"}}}, "nodes.a.profile", "unknown profile 'gpu'"),
        ({"node": {}}, "node", "did you mean 'nodes'"),
        ({"nodes": {"a": {"payload_store": "ftp://bucket"}}}, "nodes.a.payload_store", "gs://BUCKET"),
        ({"nodes": {"a": {"registry": {"server": "r", "password_env": "X"}}}}, "nodes.a.registry", "needs a username"),
    ],
)
def test_bad_input_names_file_field_and_accepted(tmp_path, data, path, fragment):
    import yaml

    file = tmp_path / "bad.yaml"
    file.write_text(yaml.safe_dump(data))
    with pytest.raises(SettingsError) as err:
        SkyVMConfig.load(file)
    text = str(err.value)
    assert str(file) in text
    assert f"{path}:" in text
    assert fragment in text


@pytest.mark.parametrize("field,value", [("use_spot", True), ("job_recovery", "FAILOVER"), ("image_id", "x"), ("zone", "z"), ("disk_size", 100), ("disk_tier", "high"), ("idle_minutes_to_autostop", 5)])
def test_lambda_limits_are_enforced_at_validation(field, value):
    settings = {field: value}
    if field == "job_recovery":
        settings["use_spot"] = False  # the job_recovery itself must be named
    with pytest.raises(SettingsError, match=f"Lambda Cloud does not support .*{field}"):
        SkyVMConfig({"nodes": {"n": {"cloud": "lambda", **settings}}})
    if field != "zone":  # infra and zone conflict before Lambda is even considered
        with pytest.raises(SettingsError, match="Lambda Cloud does not support"):
            SkyVMConfig({"nodes": {"n": {"infra": "lambda", **settings}}})
    # The same settings on another cloud are fine, and Lambda alone is fine.
    SkyVMConfig({"nodes": {"n": {"cloud": "aws", **settings}, "m": {"cloud": "lambda", "accelerators": "A10"}}})


def test_precedence_lowest_first(example_file):
    config = SkyVMConfig.load(example_file)
    train = config.resolve("train")
    assert train.cpus == "1"  # defaults
    assert train.memory == "2+"  # defaults
    assert train.accelerators == {"V100": 2} and train.use_spot  # profile
    assert train.job_recovery == "FAILOVER"  # profile, via the deprecated alias
    assert train.disk_size == 200  # node entry
    assert train.envs == {"STAGE": "dev", "SHARED": "from-profile", "NODE": "train"}  # merged key by key
    # arguments in code beat the node entry; a per-call override beats code.
    s = config.resolve("train", code={"disk_size": 300, "cpus": 4}, override={"cpus": 6})
    assert (s.disk_size, s.cpus) == (300, "6")
    # a profile given in code replaces the node entry's profile
    s = config.resolve("train", code={"profile": "big"})
    assert (s.cpus, s.memory, s.accelerators) == ("8+", "32", None)
    assert s.disk_size == 200
    # an unnamed node gets defaults only; built-ins fill the rest
    other = config.resolve("anything")
    assert (other.cpus, other.idle_minutes_to_autostop, other.down) == ("1", 10, True)


def test_bad_code_arguments_are_errors_too(example_file):
    config = SkyVMConfig.load(example_file)
    with pytest.raises(SettingsError, match="arguments.cpuz: unknown field 'cpuz'"):
        config.resolve("etl", code={"cpuz": 2})
    with pytest.raises(SettingsError, match="unknown profile 'gpuu'.*did you mean 'gpu'"):
        config.resolve("etl", profile="gpuu")


def test_file_lookup_order(tmp_path, monkeypatch, example_file):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SKYVM_CONFIG", raising=False)
    assert SkyVMConfig.load().source == "skyvm.yaml"  # ./skyvm.yaml
    other = tmp_path / "other.yaml"
    other.write_text("defaults: {cpus: 3}\n")
    monkeypatch.setenv("SKYVM_CONFIG", str(other))
    assert SkyVMConfig.load().resolve("x").cpus == "3"
    assert SkyVMConfig.load(example_file).resolve("etl").cpus == "2"  # explicit beats env
    monkeypatch.setenv("SKYVM_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(SettingsError, match="missing.yaml: settings file not found"):
        SkyVMConfig.load()


def test_not_yaml_and_not_a_mapping(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("defaults: [unclosed\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        SkyVMConfig.load(f)
    f.write_text("- a\n- b\n")
    with pytest.raises(SettingsError, match="must hold a mapping"):
        SkyVMConfig.load(f)


def test_as_config_accepts_dicts_and_none(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SKYVM_CONFIG", raising=False)
    assert as_config(None).resolve("n") == NodeSettings()
    assert as_config({"defaults": {"cpus": 2}}).resolve("n").cpus == "2"


def test_secrets_never_printed():
    s = NodeSettings(secrets={"TOKEN": "hunter2"})
    assert "hunter2" not in repr(s)
    assert s.public_dump()["secrets"] == {"TOKEN": "***"}


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "skyvm", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_validate_and_settings(example_file, tmp_path):
    ok = _cli("validate", str(example_file))
    assert ok.returncode == 0, ok.stderr
    assert "OK (2 profiles, 2 nodes)" in ok.stdout
    shown = _cli("settings", str(example_file), "--node", "train", "--json")
    assert shown.returncode == 0, shown.stderr
    import json

    data = json.loads(shown.stdout)
    assert data["accelerators"] == {"V100": 2} and data["disk_size"] == 200 and data["cpus"] == "1"
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  train:\n    disk_tier: fastest\n")
    out = _cli("validate", str(bad))
    assert out.returncode == 2
    assert f"{bad}: nodes.train.disk_tier:" in out.stderr and "'best'" in out.stderr


def test_connectors_from_the_file_and_from_code():
    from skyvm.connectors import node_connectors
    from skyvm.connectors.aws import AwsConnector

    config = SkyVMConfig({"connectors": {"team": {"type": "aws", "method": "secret-key", "aws_access_key_id": "env:K", "aws_secret_access_key": "env:S"}},
                          "defaults": {"connector": "team"}})
    assert [c.method for c in node_connectors(config.resolve("n"))] == ["secret-key"]
    # Objects in code join the file's by name; the settings carry only references.
    ours = AwsConnector(name="ours", method="iam-role", role_arn="arn:aws:iam::1:role/r", aws_access_key_id="env:K", aws_secret_access_key="env:S")
    settings = config.resolve("n", code={"connector": ours})
    assert [c.name for c in node_connectors(settings)] == ["ours"] and "env:S" in str(settings.connector_defs)
    assert "connector_defs" not in settings.public_dump()
    with pytest.raises(SettingsError, match="a node uses at most one per cloud"):
        config.resolve("n", code={"connector": ["team", ours]})
    with pytest.raises(SettingsError, match="define connectors|top-level connectors"):
        config.resolve("n", code={"connector_defs": {}})


def test_skyvm_validate_rejects_a_defaults_only_file(tmp_path, capsys):
    from skyvm.cli import main

    file = tmp_path / "defaults-only.yaml"
    file.write_text("defaults:\n  backend: skypilot\n  cloud: lambda\n  use_spot: true\n")
    assert main(["validate", str(file)]) == 2
    err = capsys.readouterr().err
    assert f"{file}: defaults.use_spot: Lambda Cloud does not support use_spot" in err


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("any_of", [{"accelerators": "A100", "use_spot": True}, {"accelerators": "H100"}], [{"accelerators": "A100", "use_spot": True}, {"accelerators": "H100"}]),
        ("autostop", {"idle_minutes": 10, "down": True, "wait_for": "jobs"}, {"idle_minutes": 10, "down": True, "wait_for": "jobs"}),
        ("autostop", False, False),
        ("autostop", 15, 15),
        ("file_mounts", {"/data": "s3://bucket/data"}, {"/data": "s3://bucket/data"}),
        ("skypilot", {"launch": {"fast": True}}, {"launch": {"fast": True}}),
    ],
)
def test_new_skypilot_forms(field, value, expected):
    assert getattr(NodeSettings(backend="skypilot", **{field: value}), field) == expected


def test_every_problem_in_the_file_is_named_at_once_in_the_order_of_its_sections():
    data = {"nodes": {"a": {"profile": "gpuu", "cpuz": 1}}, "defaults": {"cpu": 1}, "extra": 1}
    with pytest.raises(SettingsError) as err:
        SkyVMConfig(data, source="skyvm.yaml")
    paths = [path for path, _ in err.value.problems]
    assert paths[:2] == ["extra", "defaults.cpu"] and set(paths[2:]) == {"nodes.a.profile", "nodes.a.cpuz"}
    assert "skyvm.yaml: nodes.a.profile: unknown profile 'gpuu'; profiles in this file: none defined" in str(err.value)
