"""A node's connector reaches SkyPilot's own process as private files and its own API server
state, and the node itself gets scoped temporary credentials. SkyPilot's environment is the
recording stand-in (tests/skypilot/standin_vm.py); S3/STS (moto) and the registry are real."""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from skyvm.api import Run
from skyvm.backends.skypilot import skypilot_backend
from skyvm.connectors.aws import AwsConnector
from skyvm.connectors.base import MARGIN_ENV
from skyvm.connectors.files import secrets_root
from skyvm.errors import InfrastructureError
from skyvm.home import Home
from skyvm.settings import SkyVMConfig
from skyvm.skypilot import credentials as credentials_module
from skyvm.skypilot.credentials import CredentialSet, credential_set


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
    assert Path(seen["SKY_RUNTIME_DIR"]).parent == Home.current().skypilot
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

    module._warn_remote.cache_clear()  # said once per server and set: this test hears it afresh
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


# -- ports: never shared by accident -------------------------------------------------------------


def aws_set(name: str) -> CredentialSet:
    return CredentialSet([AwsConnector(type="aws", method="secret-key", name=name, aws_access_key_id="env:TEAM_KEY", aws_secret_access_key="env:TEAM_SECRET")])


def recorded_ports() -> dict:
    path = credentials_module.ports_file()
    return json.loads(path.read_text()) if path.exists() else {}


@contextlib.contextmanager
def plain_http_server(port: int):
    """Something that is not SkyPilot's API server, listening on ``port`` (in this process)."""
    server = http.server.HTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def unrecorded_free_port() -> int:
    taken = {e["port"] for e in recorded_ports().values()}
    low, span = credentials_module.PORT_LOW, credentials_module.PORT_SPAN
    return next(p for p in range(low, low + span) if p not in taken and credentials_module._bindable(p))


def test_two_credential_sets_whose_ports_would_collide_each_get_their_own_recorded(monkeypatch):
    monkeypatch.setenv("TEAM_KEY", "AKIAPORTS")
    monkeypatch.setenv("TEAM_SECRET", "ports-secret")
    port = unrecorded_free_port()
    # Force the collision the old `46581 + hash % 2000` allowed: both sets hash to one port.
    monkeypatch.setattr(credentials_module, "preferred_port", lambda ident: port)
    tag = uuid.uuid4().hex[:8]
    a, b = aws_set(f"a-{tag}"), aws_set(f"b-{tag}")
    assert a.key != b.key
    assert a.port() == port and b.port() != port
    table = recorded_ports()
    assert table[a.key]["port"] == a.port() and table[b.key]["port"] == b.port()
    assert table[b.key]["connectors"] == [f"b-{tag}"]
    # Another process of this install (no forced hash there) reads the record: the same ports.
    script = (
        "import os; from skyvm.skypilot.credentials import CredentialSet; from skyvm.connectors.aws import AwsConnector; "
        "mk = lambda n: CredentialSet([AwsConnector(type='aws', method='secret-key', name=n, aws_access_key_id='env:TEAM_KEY', aws_secret_access_key='env:TEAM_SECRET')]); "
        f"print(mk('a-{tag}').port(), mk('b-{tag}').port())"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == [str(a.port()), str(b.port())], out.stderr
    # A port something else holds when a set is allocated is passed over.
    held = unrecorded_free_port()
    monkeypatch.setattr(credentials_module, "preferred_port", lambda ident: held)
    with plain_http_server(held):
        c = aws_set(f"c-{tag}")
        assert c.port() != held and c.port() not in (a.port(), b.port())


def test_a_foreign_listener_on_a_sets_port_is_an_error_naming_the_port(standin_vm, s3_server, registry, monkeypatch):
    monkeypatch.setenv("TEAM_KEY", "AKIAFOREIGN" + uuid.uuid4().hex[:6].upper())
    monkeypatch.setenv("TEAM_SECRET", "foreign-" + uuid.uuid4().hex)
    settings = SkyVMConfig(team_settings(s3_server, registry)).resolve("n")
    backend = skypilot_backend(settings)
    try:
        port = backend.credentials.port()
        with plain_http_server(port):
            with pytest.raises(InfrastructureError) as err:
                backend.bridge.status()
        text = str(err.value)
        assert f"port {port}" in text and "not by the SkyPilot API server skyvm started for that set" in text, text
        assert f"pid {os.getpid()}" in text  # who holds it: this test's own plain HTTP server
        # The port free again, SkyPilot's side answers (the stand-in: nothing listens, as before a server starts).
        assert backend.bridge.status() == []
    finally:
        backend.close()


def test_the_sets_server_is_kept_while_its_owner_lives_and_replaced_once_its_owner_is_gone(standin_vm, s3_server, registry, monkeypatch):
    from netutil import wait_http
    from skyvm.connectors.files import owner_token
    from skyvm.skypilot.credentials import OWNER_ENV, SET_ENV

    monkeypatch.setenv("TEAM_KEY", "AKIAORPHAN" + uuid.uuid4().hex[:6].upper())
    monkeypatch.setenv("TEAM_SECRET", "orphan-" + uuid.uuid4().hex)
    backend = skypilot_backend(SkyVMConfig(team_settings(s3_server, registry)).resolve("n"))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    servers = [live]
    try:
        port = backend.credentials.port()
        for owner in (owner_token(live.pid), f"{gone.pid}.1"):  # another engine process of the set (alive), then one that is gone
            # Stands for the set's server, started with the set's identity as SkyPilot's auto-start would.
            env = {**os.environ, SET_ENV: backend.credentials.ident, OWNER_ENV: owner}
            server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            servers.append(server)
            wait_http(f"http://127.0.0.1:{port}/", ok=(200,))
            assert backend.bridge.status() == []
            if owner == owner_token(live.pid):
                assert server.poll() is None  # its owner lives: it is the set's server, kept
                server.terminate()
                server.wait(timeout=10)
            else:
                assert server.wait(timeout=30) is not None  # left by a killed process: stopped
    finally:
        for server in servers:
            if server.poll() is None:
                server.kill()
                server.wait()
        backend.close()


# -- secret files never outlive their process ----------------------------------------------------

_HOLDER = """
import json, sys
from skyvm.connectors.aws import AwsConnector
from skyvm.skypilot.credentials import CredentialSet
s = CredentialSet([AwsConnector(type="aws", method="secret-key", name="team", aws_access_key_id="env:TEAM_KEY", aws_secret_access_key="env:TEAM_SECRET")])
print(json.dumps({"file": s.environment()["AWS_SHARED_CREDENTIALS_FILE"]}), flush=True)
sys.stdin.readline()
"""


def test_credential_files_of_a_killed_process_are_removed_by_skyvm_gc_and_a_live_ones_kept(docker_engine, monkeypatch):
    secret = "gc-canary-" + uuid.uuid4().hex
    monkeypatch.setenv("TEAM_KEY", "AKIAGC")
    monkeypatch.setenv("TEAM_SECRET", secret)
    holders = [subprocess.Popen([sys.executable, "-c", _HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    killed, live = holders
    try:
        files = [Path(json.loads(p.stdout.readline())["file"]) for p in holders]
        for f in files:
            assert secret in f.read_text() and f.parent.parent == secrets_root()
        killed.send_signal(signal.SIGKILL)  # no exit handler runs: its files stay behind
        killed.wait(timeout=30)
        assert files[0].exists()
        out = subprocess.run([sys.executable, "-m", "skyvm", "gc"], capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        assert not files[0].parent.exists(), out.stdout
        assert files[1].exists()  # its owner still runs
        assert "removed 1 credential directory(ies) of processes that are gone" in out.stdout and str(files[0].parent) in out.stdout
        assert secret not in out.stdout
        live.stdin.close()  # a normal exit removes its own
        live.wait(timeout=30)
        assert not files[1].parent.exists()
    finally:
        for p in holders:
            if p.poll() is None:
                p.kill()
                p.wait()


# -- minted credentials renewed in a long-lived process ------------------------------------------


def double(x):
    return 2 * x


def test_minted_keys_are_renewed_before_they_expire_in_a_long_lived_bridge(standin_vm, s3_server, registry, monkeypatch):
    monkeypatch.setenv("TEAM_KEY", "AKIAMINT" + uuid.uuid4().hex[:6].upper())
    monkeypatch.setenv("TEAM_SECRET", "mint-" + uuid.uuid4().hex)
    # Keys of 900 s (STS's least, honoured by moto) renewed 898 s before they expire: 2 s after minting.
    monkeypatch.setenv(MARGIN_ENV, "898")
    data = team_settings(s3_server, registry)
    data["connectors"]["team"] = {"type": "aws", "method": "session-token", "aws_access_key_id": "env:TEAM_KEY",
                                  "aws_secret_access_key": "env:TEAM_SECRET", "endpoint_url": s3_server, "duration_seconds": 900}
    backend = skypilot_backend(SkyVMConfig(data).resolve("first"))
    try:
        with Run(data) as run:
            assert run.submit(double, 1, node="first").result() == 2
            time.sleep(2.5)
            assert run.submit(double, 2, node="second").result() == 4
        # The second node is warm: it goes to the cluster's agent over SSH, whose address and key the
        # bridge gives (ssh_info), with no SkyPilot job (issue 20).
        seen = [c for c in standin_vm.calls() if c["call"] in ("launch", "exec", "ssh_info")]
        assert [c["call"] for c in seen] == ["launch", "ssh_info"]
        # One long-lived SkyPilot-side process (its boto3 session too), and fresh keys for the second node.
        assert seen[0]["pid"] == seen[1]["pid"]
        first, second = seen[0]["credentials"]["aws_expiry"], seen[1]["credentials"]["aws_expiry"]
        assert second > first
        assert seen[0]["credentials"]["AWS_PROFILE"] == "skyvm"
    finally:
        backend.close()
