"""A credential set's own local SkyPilot API server, as SkyPilot's auto-start makes it from the
set's bridge process: on the set's recorded port, recognised by the bridge's check before every
call (it carries the set's identity in its environment), and stopped with the set.

Starting SkyPilot's server costs tens of seconds on a busy machine: one test does it all."""

from __future__ import annotations

import json
import uuid

import pytest

sky = pytest.importorskip("sky")
psutil = pytest.importorskip("psutil")

from skyvm.backends.skypilot import SkyPilotBackend  # noqa: E402
from skyvm.connectors.aws import AwsConnector  # noqa: E402
from skyvm.skypilot.credentials import SET_ENV, CredentialSet, ports_file  # noqa: E402


def listeners(port: int) -> set[int]:
    return {c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port}


def test_a_sets_own_local_api_server_is_recognised_on_its_recorded_port_and_stopped_with_it(monkeypatch):
    monkeypatch.setenv("LOCAL_SET_KEY", "AKIALOCAL" + uuid.uuid4().hex[:6].upper())
    monkeypatch.setenv("LOCAL_SET_SECRET", "local-" + uuid.uuid4().hex)
    monkeypatch.setenv("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("SKYPILOT_API_SERVER_ENDPOINT", raising=False)
    name = f"local-{uuid.uuid4().hex[:8]}"
    creds = CredentialSet([AwsConnector(type="aws", method="secret-key", name=name, aws_access_key_id="env:LOCAL_SET_KEY", aws_secret_access_key="env:LOCAL_SET_SECRET")])
    backend = SkyPilotBackend(credentials=creds)
    port = creds.port()
    assert json.loads(ports_file().read_text())[creds.key]["port"] == port
    try:
        assert backend.bridge.status() == []  # nothing listened: SkyPilot started the set's server
        holders = listeners(port)
        assert holders and all(psutil.Process(pid).environ().get(SET_ENV) == creds.ident for pid in holders)
        assert backend.bridge.status() == []  # now something listens: checked, and it is ours
    finally:
        backend.close()
    assert not listeners(port)  # the set's server went with it
