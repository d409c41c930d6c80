"""A node's connector reaches SkyPilot's own process as private files and its own API server
state, and the node itself gets scoped temporary credentials. SkyPilot's environment is the
recording stand-in (tests/skypilot/standin_vm.py); S3/STS (moto) and the registry are real."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from skyvm.api import Run
from skyvm.backends.skypilot import skypilot_backend
from skyvm.payloads import DEFAULT_HOME
from skyvm.skypilot.credentials import credential_set


def aws_env_inside():
    return {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3")}


def team_settings(s3_server, registry, **defaults):
    return {
        "connectors": {
            "team": {"type": "aws", "method": "secret-key", "aws_access_key_id": "env:TEAM_KEY", "aws_secret_access_key": "env:TEAM_SECRET", "endpoint_url": s3_server}
        },
        "defaults": {
            "backend": "skypilot", "cloud": "aws", "connector": "team", "down": True,
            "payload_store": "s3://skyvm-test/creds", "payload_store_endpoint": s3_server, "registry": registry.model_dump(), **defaults,
        },
    }


def test_connector_credentials_go_to_skypilot_privately_and_the_node_gets_scoped_ones(standin_vm, s3_server, registry, monkeypatch):
    secret = "canary-team-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("TEAM_KEY", "AKIACANARY" + uuid.uuid4().hex[:8].upper())
    monkeypatch.setenv("TEAM_SECRET", secret)
    aws_dir = Path.home() / ".aws"
    before = sorted(aws_dir.rglob("*")) if aws_dir.exists() else None
    settings = team_settings(s3_server, registry)
    with Run(settings) as run:
        inside = run.submit(aws_env_inside, node="creds").result()
        backend = skypilot_backend(run.resolve("creds"))
    # The node: temporary credentials of its own, the store's endpoint, never the team's secret.
    assert inside["AWS_SESSION_TOKEN"] and inside["AWS_SECRET_ACCESS_KEY"] != secret
    assert inside["AWS_ACCESS_KEY_ID"] != os.environ["TEAM_KEY"]
    assert inside["AWS_ENDPOINT_URL_S3"] == s3_server
    # SkyPilot's process: a private profile (0600 files in a 0700 directory) and its own server state.
    launch = next(c for c in standin_vm.calls() if c["call"] == "launch")
    seen = launch["credentials"]
    assert seen["AWS_PROFILE"] == "skyvm"
    files = seen["AWS_SHARED_CREDENTIALS_FILE"]
    assert files["mode"] == "0o600" and files["dir_mode"] == "0o700"
    assert Path(seen["SKY_RUNTIME_DIR"]).parent == DEFAULT_HOME / "skypilot"
    assert seen["SKYPILOT_API_SERVER_LOCAL_PORT"] != "46580"
    # Every task's secrets reach SkyPilot as names only in the record; the team's secret nowhere.
    assert secret not in (standin_vm.dir / "calls.jsonl").read_text()
    # When skyvm is done with SkyPilot, the private files go.
    backend.close()
    assert not Path(files["file"]).exists()
    after = sorted(aws_dir.rglob("*")) if aws_dir.exists() else None
    assert before == after


def test_a_remote_api_server_uses_its_own_credentials_and_says_so(s3_server, registry, monkeypatch, caplog):
    from skyvm.settings import SkyVMConfig
    from skyvm.skypilot import credentials as module

    monkeypatch.setattr(module, "_warned_remote", False)
    monkeypatch.setenv("SKYPILOT_API_SERVER_ENDPOINT", "http://sky.example.internal:46580")
    settings = SkyVMConfig(team_settings(s3_server, registry)).resolve("n")
    with caplog.at_level(logging.WARNING, logger="skyvm.skypilot"):
        assert credential_set(settings) is None
    assert "launches with its own cloud credentials" in caplog.text and "team" in caplog.text


def test_implicit_connectors_leave_skypilot_to_its_own_credentials(s3_server, registry):
    from skyvm.settings import SkyVMConfig

    data = team_settings(s3_server, registry)
    data["connectors"]["team"] = {"type": "aws", "method": "implicit"}
    assert credential_set(SkyVMConfig(data).resolve("n")) is None
