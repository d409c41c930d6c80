"""The AWS connector against moto's server over HTTP: every auth method, refresh, scoped node
credentials, ECR tokens, and what SkyPilot's process is given. Every secret is a unique marker."""

from __future__ import annotations

import os
import stat
import time
import uuid
from pathlib import Path

import boto3
import pytest

from skyvm import redact
from skyvm.connectors import CREDENTIALS, ConnectorError, aws as aws_module, parse_connector
from skyvm.connectors.aws import AwsConnector, store_policy
from skyvm.errors import SettingsError
from skyvm.settings import SkyVMConfig


@pytest.fixture
def account(aws_iam_server, monkeypatch):
    """The IAM user's keys behind env: references; the endpoint through the standard variable."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_iam_server.endpoint)
    monkeypatch.setenv("TEAM_AWS_KEY", aws_iam_server.access_key)
    monkeypatch.setenv("TEAM_AWS_SECRET", aws_iam_server.secret_key)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    CREDENTIALS.clear()
    return aws_iam_server


KEYS = {"aws_access_key_id": "env:TEAM_AWS_KEY", "aws_secret_access_key": "env:TEAM_AWS_SECRET"}


def conn(method: str, **fields) -> AwsConnector:
    return parse_connector("team", {"type": "aws", "method": method, **fields}, "connectors.team")


def test_secret_key_proves_identity_and_the_secret_is_redacted(account):
    c = conn("secret-key", **KEYS)
    assert "user/skyvm-ci" in c.identity()
    assert redact.redact(f"leaked {account.secret_key}") == "leaked ***"


def test_a_wrong_secret_is_a_clear_error_naming_the_connector(account, monkeypatch):
    monkeypatch.setenv("TEAM_AWS_SECRET", "wrong-" + uuid.uuid4().hex)
    with pytest.raises(ConnectorError) as err:
        conn("secret-key", **KEYS).identity()
    text = str(err.value)
    assert "connector 'team' (aws/secret-key)" in text and "get-caller-identity" in text and "check the keys" in text
    assert os.environ["TEAM_AWS_SECRET"] not in text


@pytest.mark.parametrize("method,extra", [("iam-role", {"role_arn": "arn:aws:iam::123456789012:role/skyvm", "external_id": "env:TEAM_EXT", "session_name": "ci"}),
                                          ("session-token", {}), ("federation-token", {"federation_name": "skyvm-ci"})])
def test_temporary_methods_mint_credentials_and_refresh_them_before_they_expire(account, monkeypatch, method, extra):
    monkeypatch.setenv("TEAM_EXT", "ext-" + uuid.uuid4().hex[:8])
    c = conn(method, duration_seconds=900, **KEYS, **extra)
    first = c.credentials_now()
    assert first.token and first.access_key != account.access_key
    assert first.expires_at > time.time() + 600
    assert c.credentials_now() is first  # cached while fresh
    # Within the refresh margin of its expiry, a new set is minted.
    CREDENTIALS.put("aws", c, aws_module.AwsCredentials(first.access_key, first.secret_key, first.token, time.time() + 60))
    second = c.credentials_now()
    assert second is not first and second.expires_at > time.time() + 600
    assert redact.redact(second.secret_key) == "***" and redact.redact(second.token) == "***"


def test_sts_token_passes_the_given_temporary_credentials(account, monkeypatch):
    sts = boto3.client("sts", aws_access_key_id=account.access_key, aws_secret_access_key=account.secret_key, region_name="us-east-1")
    c = sts.get_session_token(DurationSeconds=900)["Credentials"]
    monkeypatch.setenv("T_KEY", c["AccessKeyId"])
    monkeypatch.setenv("T_SECRET", c["SecretAccessKey"])
    monkeypatch.setenv("T_TOKEN", c["SessionToken"])
    got = conn("sts-token", aws_access_key_id="env:T_KEY", aws_secret_access_key="env:T_SECRET", aws_session_token="env:T_TOKEN").credentials_now()
    assert (got.access_key, got.token) == (c["AccessKeyId"], c["SessionToken"])


@pytest.mark.parametrize(
    "fields,fragment",
    [
        ({"method": "secret-key"}, "needs aws_access_key_id and aws_secret_access_key"),
        ({"method": "secret-key", "aws_access_key_id": "AKIAPASTED", "aws_secret_access_key": "env:X"}, "never the secret itself"),
        ({"method": "iam-role", **KEYS}, "needs role_arn"),
        ({"method": "sts-token", **KEYS}, "needs aws_session_token"),
        ({"method": "assume"}, "accepted aws methods: implicit, secret-key, sts-token, iam-role, session-token, federation-token"),
        ({"method": "secret-key", **KEYS, "regoin": "x"}, "unknown field"),
        ({"method": "secret-key", **KEYS, "duration_seconds": 60}, "got 60"),
    ],
)
def test_bad_connector_settings_name_the_entry_the_field_and_what_is_accepted(fields, fragment):
    with pytest.raises(SettingsError) as err:
        SkyVMConfig({"connectors": {"team": {"type": "aws", **fields}}}, source="skyvm.yaml")
    assert "skyvm.yaml: connectors.team" in str(err.value) and fragment in str(err.value)


def test_a_node_gets_its_own_scoped_short_lived_credentials_never_the_launchers(account):
    c = conn("secret-key", **KEYS)
    access = c.node_store_access("s3://team-bucket/skyvm", node="train", ttl_s=1200, endpoint=account.endpoint)
    assert access.secrets["AWS_SESSION_TOKEN"]
    assert access.secrets["AWS_ACCESS_KEY_ID"] != account.access_key
    assert account.secret_key not in access.secrets.values()
    assert access.envs["AWS_ENDPOINT_URL_S3"] == account.endpoint
    assert access.expires_at and access.expires_at - time.time() > 1000
    assert access.scope.startswith("s3://team-bucket/skyvm/*")


def test_the_session_policy_allows_only_the_stores_prefix():
    policy = store_policy("team-bucket", "/skyvm/")
    objects, listing = policy["Statement"]
    assert objects["Resource"] == "arn:aws:s3:::team-bucket/skyvm/*"
    assert set(objects["Action"]) == {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"}
    assert listing["Condition"]["StringLike"]["s3:prefix"] == ["skyvm/*", "skyvm"]


def test_ecr_token_comes_from_the_connector(account):
    user, password = conn("secret-key", **KEYS).registry_credentials("123456789012.dkr.ecr.us-east-1.amazonaws.com")
    assert user == "AWS" and password
    assert redact.redact(password) == "***"


def test_skypilot_gets_private_files_and_the_users_aws_dir_is_untouched(account, tmp_path):
    aws_dir = Path.home() / ".aws"
    before = sorted(aws_dir.rglob("*")) if aws_dir.exists() else None
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    env = conn("iam-role", role_arn="arn:aws:iam::123456789012:role/skyvm", **KEYS).skypilot_env(private)
    assert env["AWS_PROFILE"] == "skyvm"
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        path = Path(env[name])
        assert path.parent == private and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "role_arn = arn:aws:iam::123456789012:role/skyvm" in Path(env["AWS_CONFIG_FILE"]).read_text()
    assert account.access_key not in "".join(v for v in env.values() if v)
    assert env["AWS_ACCESS_KEY_ID"] is None  # the engine's own keys are taken away from SkyPilot's process
    # SkyPilot's boto3 reads the private profile and assumes the role itself.
    import botocore.session

    bs = botocore.session.Session()
    for k in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE"):
        bs.set_config_variable({"AWS_CONFIG_FILE": "config_file", "AWS_SHARED_CREDENTIALS_FILE": "credentials_file", "AWS_PROFILE": "profile"}[k], env[k])
    arn = boto3.Session(botocore_session=bs).client("sts", endpoint_url=account.endpoint, region_name="us-east-1").get_caller_identity()["Arn"]
    assert ":assumed-role/skyvm/" in arn
    after = sorted(aws_dir.rglob("*")) if aws_dir.exists() else None
    assert before == after


def test_implicit_without_any_credentials_says_how_to_give_some(monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConnectorError) as err:
        conn("implicit").node_store_access("s3://b/p", node="train")
    assert "no AWS credentials found" in str(err.value) and "method secret-key" in str(err.value)


def test_missing_boto3_names_the_extra(account, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(ConnectorError) as err:
        conn("secret-key", **KEYS).identity()
    assert "pip install 'skyvm[aws]'" in str(err.value)


def test_a_store_held_through_a_long_node_renews_its_minted_keys(s3_server, monkeypatch):
    """A payload store opened when a node starts is read when it ends: by then minted keys may be
    past their renewal (here: keys of 900 s renewed 2 s after minting), so the store takes fresh ones."""
    from skyvm.connectors.base import MARGIN_ENV
    from skyvm.payloads import open_store

    monkeypatch.setenv(MARGIN_ENV, "898")
    monkeypatch.setenv("TEAM_AWS_KEY", "AKIASTORE")
    monkeypatch.setenv("TEAM_AWS_SECRET", "store-" + uuid.uuid4().hex)
    CREDENTIALS.clear()
    c = conn("session-token", endpoint_url=s3_server, duration_seconds=900, **KEYS)
    url = f"s3://skyvm-test/renew-{uuid.uuid4().hex[:8]}"
    store = open_store(url, s3_server, storage_options=c.renewing_fs_options(url, s3_server), node="long")
    store.put("payload", b"argument")
    first_fs, first_keys = store.fs, CREDENTIALS.get("aws", c)
    assert store.fs is first_fs  # kept while its keys are fresh
    time.sleep(2.5)
    assert store.get("payload") == b"argument"
    renewed = CREDENTIALS.get("aws", c)
    assert store.fs is not first_fs and renewed is not first_keys and renewed.expires_at > first_keys.expires_at
    assert store.fs.storage_options["token"] == renewed.token


def test_minted_keys_reach_skypilots_long_lived_boto3_through_a_renewed_profile(s3_server, monkeypatch):
    """SkyPilot's API server keeps one boto3 session for its life: it must see renewed keys without a restart."""
    import json as _json
    import subprocess
    import sys

    from skyvm.connectors.base import MARGIN_ENV
    from skyvm.skypilot.credentials import CredentialSet

    monkeypatch.setenv(MARGIN_ENV, "898")
    monkeypatch.setenv("TEAM_AWS_KEY", "AKIAPROFILE")
    monkeypatch.setenv("TEAM_AWS_SECRET", "profile-" + uuid.uuid4().hex)
    CREDENTIALS.clear()
    creds = CredentialSet([conn("federation-token", endpoint_url=s3_server, duration_seconds=900, **KEYS)])
    try:
        env = {k: v for k, v in {**os.environ, **creds.environment()}.items() if v is not None}
        assert "credential_process" in Path(env["AWS_CONFIG_FILE"]).read_text()
        assert stat.S_IMODE(Path(env["AWS_CONFIG_FILE"]).stat().st_mode) == 0o600
        script = (
            "import sys, json, boto3\n"
            "c = boto3.Session().get_credentials()\n"
            "for _ in range(2):\n"
            "    f = c.get_frozen_credentials()\n"
            "    print(json.dumps([f.access_key, bool(f.token), c._expiry_time.timestamp()]), flush=True)\n"
            "    sys.stdin.readline()\n"
        )
        reader = subprocess.Popen([sys.executable, "-c", script], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        first = _json.loads(reader.stdout.readline())
        renew_at = creds.renew_at
        time.sleep(2.5)  # past renew_at: the set's timer rewrites the file with nobody calling
        assert creds.renew_at > renew_at
        reader.stdin.write("\n")
        reader.stdin.flush()
        second = _json.loads(reader.stdout.readline())
        reader.stdin.close()
        reader.wait(timeout=30)
        assert first[1] and second[1]
        assert second[2] > first[2]  # the same process, fresh keys
    finally:
        creds.close()
