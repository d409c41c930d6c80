"""``skyvm check`` as a user runs it: a good configuration passes, a broken one fails on the right
rows with exit code 1, and no secret is ever printed. AWS (moto with IAM auth) and the registry are real."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import boto3
import pytest
import yaml


@pytest.fixture
def team_bucket(aws_iam_server):
    s3 = boto3.client("s3", endpoint_url=aws_iam_server.endpoint, region_name="us-east-1",
                      aws_access_key_id=aws_iam_server.access_key, aws_secret_access_key=aws_iam_server.secret_key)
    name = "team-" + uuid.uuid4().hex[:8]
    s3.create_bucket(Bucket=name)
    return name


def write_config(tmp_path, aws, bucket, registry, password_var="CHECK_REGISTRY_PASSWORD"):
    data = {
        "connectors": {"team": {"type": "aws", "method": "secret-key", "aws_access_key_id": "env:CHECK_KEY",
                                "aws_secret_access_key": "env:CHECK_SECRET", "endpoint_url": aws.endpoint}},
        "defaults": {"connector": "team", "payload_store": f"s3://{bucket}/skyvm", "payload_store_endpoint": aws.endpoint,
                     "registry": {"server": registry.server, "username": registry.username, "password": f"env:{password_var}"}},
    }
    path = tmp_path / "skyvm.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_check(path, env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return subprocess.run([sys.executable, "-m", "skyvm", "check", "--config", str(path)], env={**clean, **env}, capture_output=True, text=True, timeout=300)


def test_a_good_configuration_passes_every_row(tmp_path, aws_iam_server, team_bucket, registry):
    path = write_config(tmp_path, aws_iam_server, team_bucket, registry)
    env = {"CHECK_KEY": aws_iam_server.access_key, "CHECK_SECRET": aws_iam_server.secret_key,
           "CHECK_REGISTRY_PASSWORD": os.environ["SKYVM_TEST_REGISTRY_PASSWORD"]}
    out = run_check(path, env)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[2:]}
    assert "OK" in rows["connector"] and "user/skyvm-ci" in rows["connector"]
    assert "OK" in rows["store"] and "wrote, read and deleted" in rows["store"] and f"s3://{team_bucket}/skyvm/*" in rows["store"]
    assert "OK" in rows["registry"] and "logged in as skyvm" in rows["registry"]
    for secret in env.values():
        assert secret not in out.stdout + out.stderr


def test_a_broken_configuration_fails_on_the_right_rows_with_the_fix(tmp_path, aws_iam_server, registry):
    wrong_secret = "wrong-secret-" + uuid.uuid4().hex
    wrong_password = "wrong-password-" + uuid.uuid4().hex
    path = write_config(tmp_path, aws_iam_server, "no-such-bucket-" + uuid.uuid4().hex[:6], registry)
    env = {"CHECK_KEY": aws_iam_server.access_key, "CHECK_SECRET": wrong_secret, "CHECK_REGISTRY_PASSWORD": wrong_password}
    out = run_check(path, env)
    assert out.returncode == 1, out.stdout + out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[2:]}
    assert "FAIL" in rows["connector"] and "check the keys" in rows["connector"]
    assert "FAIL" in rows["store"]
    assert "FAIL" in rows["registry"] and registry.server in rows["registry"] and "fix the registry password" in rows["registry"]
    assert "3 check(s) failed" in out.stderr
    assert wrong_secret not in out.stdout + out.stderr and wrong_password not in out.stdout + out.stderr


def test_a_missing_reference_is_a_failed_row_naming_the_field(tmp_path, aws_iam_server, team_bucket, registry):
    path = write_config(tmp_path, aws_iam_server, team_bucket, registry)
    out = run_check(path, {"CHECK_KEY": aws_iam_server.access_key, "CHECK_REGISTRY_PASSWORD": "x" * 12})
    assert out.returncode == 1
    assert "connectors.team.aws_secret_access_key" in out.stdout and "CHECK_SECRET is not set" in out.stdout


def test_skypilots_own_check_runs_with_the_nodes_connector(standin_vm, tmp_path, aws_iam_server, team_bucket, registry, monkeypatch):
    """The skypilot row: SkyPilot's process (the stand-in at the cloud seam) asks STS with the
    connector's private profile, so a right key enables AWS and a wrong one does not."""
    from skyvm.check import FAIL, OK, run_checks
    from skyvm.settings import SkyVMConfig

    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_iam_server.endpoint)
    monkeypatch.setenv("CHECK_KEY", aws_iam_server.access_key)
    monkeypatch.setenv("CHECK_SECRET", aws_iam_server.secret_key)
    monkeypatch.setenv("CHECK_REGISTRY_PASSWORD", os.environ["SKYVM_TEST_REGISTRY_PASSWORD"])
    data = yaml.safe_load(write_config(tmp_path, aws_iam_server, team_bucket, registry).read_text())
    data["defaults"].update(backend="skypilot", cloud="aws")
    rows = {r.check: r for r in run_checks(SkyVMConfig(data))}
    assert rows["skypilot"].result == OK, rows["skypilot"]
    assert "aws (compute/storage)" in rows["skypilot"].detail
    assert "with team" in rows["skypilot"].target
    seen = next(c for c in standin_vm.calls() if c["call"] == "check")["credentials"]
    assert seen["AWS_PROFILE"] == "skyvm" and seen["AWS_SHARED_CREDENTIALS_FILE"]["mode"] == "0o600"

    from skyvm.backends.registry import reset_backends

    reset_backends()  # the credentialed backend (its SkyPilot process, its files) goes: the next check makes a new one
    monkeypatch.setenv("CHECK_SECRET", "wrong-" + uuid.uuid4().hex)
    rows = {r.check: r for r in run_checks(SkyVMConfig(data))}
    assert rows["skypilot"].result == FAIL and "SkyPilot cannot use aws" in rows["skypilot"].detail
