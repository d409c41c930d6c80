"""Payload stores: a directory, and S3 (moto), GCS (its emulator) and Azure Blob (Azurite) through
fsspec, each server real and on loopback; checksums; clear errors; the node's environment contract."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from skyvm.errors import PayloadError
from skyvm.payloads import FsspecStore, LocalStore, frame, open_store, store_for_object

CLOUDS = ["s3", "gs", "az"]


def cloud_store(request, kind: str, prefix: str) -> FsspecStore:
    """A store on the kind's test server, reached the way the launching host reaches it by default."""
    if kind == "s3":
        return open_store(f"s3://skyvm-test/{prefix}", request.getfixturevalue("s3_server"), node="train")
    request.getfixturevalue({"gs": "gcs_server", "az": "azurite"}[kind])  # sets the standard variable
    return open_store(f"{kind}://skyvm-test/{prefix}", node="train")


@pytest.fixture(params=["local", *CLOUDS])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return cloud_store(request, request.param, f"t-{tmp_path.name}")


def write_raw(store, key: str, blob: bytes) -> None:
    """Put bytes in the store as they are, past the framing (what corruption looks like)."""
    if isinstance(store, LocalStore):
        store._path(key).parent.mkdir(parents=True, exist_ok=True)
        store._path(key).write_bytes(blob)
    else:
        store.fs.pipe_file(store._path(key), blob)


@pytest.mark.parametrize("tail", [b"\r", b"\r\n", b"\n", b"\x00"])
def test_a_payload_comes_back_byte_for_byte_whatever_its_last_byte(store, tail):
    """Random bytes end in a CR one time in 256: the GCS emulator's multipart reading once dropped it
    (tests/gcs_emulator.py), and the bench saw a corrupt payload at random."""
    data = os.urandom(1000) + tail
    assert store.get(store.key_of(store.put_payload(data))) == data


def test_roundtrip_and_content_addressing(store, monkeypatch):
    url = store.put_payload(b"hello")
    assert url.endswith("payloads/2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")
    writes = []
    real_put = store.put
    monkeypatch.setattr(store, "put", lambda key, data: writes.append(key) or real_put(key, data))
    assert url == store.put_payload(b"hello")  # same content, same key, stored once
    assert writes == []
    assert url != store.put_payload(b"other")
    assert len(writes) == 1
    assert store.get(store.key_of(url)) == b"hello"
    s, key = store_for_object(url, getattr(store, "endpoint_url", None))
    assert s.get(key) == b"hello"
    store.delete(store.key_of(url))
    assert not store.exists(store.key_of(url))
    store.delete(store.key_of(url))  # deleting what is gone is fine


def test_missing_object_is_a_clear_error(store):
    with pytest.raises(PayloadError, match=re.escape(store.url_for("results/nothing-here")) + " does not exist"):
        store.get("results/nothing-here")


def test_corruption_is_detected(store):
    store.put("results/r1", b"payload-bytes")
    write_raw(store, "results/r1", frame(b"payload-bytes")[:-1] + b"X")
    with pytest.raises(PayloadError, match="checksum mismatch"):
        store.get("results/r1")
    write_raw(store, "results/r2", b"not framed")
    with pytest.raises(PayloadError, match=re.escape(store.url_for("results/r2")) + " is corrupt: not a skyvm object"):
        store.get("results/r2")


@pytest.mark.parametrize("kind", CLOUDS)
def test_missing_bucket(kind, request):
    what = "container" if kind == "az" else "bucket"
    store = cloud_store(request, kind, "p")
    missing = open_store(f"{kind}://no-such-bucket/p", store.endpoint_url, node="train")
    fix = f"{what} 'no-such-bucket' does not exist: create it or fix payload_store"
    with pytest.raises(PayloadError, match=rf"node 'train': cannot read {kind}://no-such-bucket/p/x: {fix}"):
        missing.get("x")
    with pytest.raises(PayloadError, match=rf"node 'train': cannot write {kind}://no-such-bucket/p/payloads/\w+: {fix}"):
        missing.put_payload(b"x")


def test_open_store_forms(tmp_path):
    assert open_store(str(tmp_path / "a")).url == f"file://{tmp_path / 'a'}"
    assert open_store(f"file://{tmp_path / 'b'}").url == f"file://{tmp_path / 'b'}"
    # Opening needs no credentials: they are used on the first read or write.
    for url in ("s3://bucket/some/prefix", "gs://bucket/p", "gcs://bucket", "az://container/p", "abfs://container/p/"):
        assert open_store(url).url == url.rstrip("/")
        assert open_store(url).url_for("payloads/x") == url.rstrip("/") + "/payloads/x"
    with pytest.raises(PayloadError, match="unsupported store URL 'ftp://host/x'"):
        open_store("ftp://host/x")
    with pytest.raises(PayloadError, match="names no container"):
        open_store("az:///p")
    with pytest.raises(PayloadError, match="escapes"):
        LocalStore(tmp_path / "c").get("../../etc/passwd")
    with pytest.raises(PayloadError, match="not a plain object key"):
        open_store("s3://bucket").get("../x")
    store, key = store_for_object("gcs://bucket/pre/payloads/abc")
    assert (store.url, key) == ("gcs://bucket", "pre/payloads/abc")


def test_each_store_gets_its_own_file_system():
    # No instance cache: a store made with new credentials uses them.
    a = open_store("s3://bucket", storage_options={"key": "k1", "secret": "s1"})
    b = open_store("s3://bucket", storage_options={"key": "k2", "secret": "s2"})
    assert a.fs is not b.fs and b.fs.key == "k2"


@pytest.mark.parametrize(("module", "kind", "extra"), [("s3fs", "s3", "aws"), ("adlfs", "az", "azure")])
def test_a_missing_extra_names_it(monkeypatch, module, kind, extra):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(PayloadError, match=rf"node 'n1': a {kind}:// payload store needs {module}.*pip install 'skyvm\[{extra}\]'"):
        open_store(f"{kind}://bucket", node="n1").get("x")


# --- the node side: only the environment contract, in a process that has nothing else ---

NODE_SCRIPT = """
import json, sys
from skyvm.errors import PayloadError
from skyvm.payloads import store_for_object
try:
    store, key = store_for_object(sys.argv[1])
    data = store.get(key)
    result, result_key = store_for_object(sys.argv[2])
    result.put(result_key, b"result:" + data)
    print(json.dumps({"ok": data.decode()}))
except PayloadError as exc:
    print(json.dumps({"error": str(exc)}))
"""


def on_node(tmp_path, env: dict, payload_url: str, result_url: str = "") -> dict:
    """Run store_for_object in a subprocess whose environment holds only ``env`` (no ambient credentials)."""
    home = tmp_path / "node-home"
    home.mkdir(exist_ok=True)
    clean = {"PATH": os.environ["PATH"], "HOME": str(home), "SKYVM_NODE": "train", **env}
    out = subprocess.run(
        [sys.executable, "-c", NODE_SCRIPT, payload_url, result_url or payload_url.rsplit("/payloads/", 1)[0] + "/results/a1"],
        env=clean, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Warning" not in out.stderr, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def node_env(kind: str, request) -> dict:
    """The variables a connector hands a node for the kind's test server (see skyvm.payloads)."""
    if kind == "s3":
        return {
            "AWS_ACCESS_KEY_ID": "skyvm-test-key", "AWS_SECRET_ACCESS_KEY": "skyvm-test-secret", "AWS_SESSION_TOKEN": "skyvm-test-session",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": request.getfixturevalue("s3_server"),
        }
    if kind == "gs":
        return {"SKYVM_GCS_TOKEN": "ya29.skyvm-test-access-token", "SKYVM_GCS_PROJECT": "skyvm-test", "STORAGE_EMULATOR_HOST": request.getfixturevalue("gcs_server")}
    return {"AZURE_STORAGE_CONNECTION_STRING": container_sas_connection_string(request.getfixturevalue("azurite"), "skyvm-test")}


def container_sas_connection_string(azurite, container: str) -> str:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    sas = generate_container_sas(
        azurite.account_name, container, account_key=azurite.account_key,
        permission=ContainerSasPermissions(read=True, write=True, delete=True, list=True),
        expiry=datetime.now(timezone.utc) + timedelta(hours=1),
    )
    return f"BlobEndpoint={azurite.blob_endpoint};SharedAccessSignature={sas}"


@pytest.mark.parametrize("kind", CLOUDS)
def test_node_reads_and_writes_with_the_env_contract_only(kind, request, tmp_path):
    store = cloud_store(request, kind, f"n-{tmp_path.name}")
    url = store.put_payload(b"the payload")
    assert on_node(tmp_path, node_env(kind, request), url) == {"ok": "the payload"}
    assert store.get("results/a1") == b"result:the payload"
    missing = store.url_for("payloads/" + "0" * 64)
    assert on_node(tmp_path, node_env(kind, request), missing) == {"error": f"node 'train': object {missing} does not exist"}


def test_node_s3_endpoint_under_the_old_name(request, tmp_path):
    store = cloud_store(request, "s3", f"o-{tmp_path.name}")
    url = store.put_payload(b"old name")
    env = node_env("s3", request)
    env["SKYVM_S3_ENDPOINT_URL"] = env.pop("AWS_ENDPOINT_URL_S3")
    assert on_node(tmp_path, env, url) == {"ok": "old name"}


def test_node_without_s3_credentials_names_the_node_and_url(request, tmp_path):
    store = cloud_store(request, "s3", f"c-{tmp_path.name}")
    url = store.put_payload(b"unreachable")
    env = {k: v for k, v in node_env("s3", request).items() if not k.startswith(("AWS_ACCESS", "AWS_SECRET", "AWS_SESSION"))}
    env["AWS_EC2_METADATA_DISABLED"] = "true"  # this machine is no EC2 instance: do not wait on its metadata service
    error = on_node(tmp_path, env, url)["error"]
    assert error.startswith(f"node 'train': cannot read {url}: no credentials: give the node a connector or set AWS_ACCESS_KEY_ID")
    assert "Unable to locate credentials" not in error


def test_node_with_a_container_sas(azurite, request, tmp_path):
    from azure.storage.blob import BlobServiceClient

    store = cloud_store(request, "az", f"s-{tmp_path.name}")
    url = store.put_payload(b"sas payload")
    env = node_env("az", request)
    assert "AccountKey" not in env["AZURE_STORAGE_CONNECTION_STRING"]
    assert on_node(tmp_path, env, url) == {"ok": "sas payload"}
    # The SAS is the container's: another container of the same account stays out of reach.
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    if not service.get_container_client("other").exists():
        service.create_container("other")
    other = open_store("az://other/p")
    other_url = other.put_payload(b"not yours")
    error = on_node(tmp_path, env, other_url)["error"]
    assert error.startswith(f"node 'train': cannot read {other_url}: access denied")
    signature = re.search(r"sig=([^&;]+)", env["AZURE_STORAGE_CONNECTION_STRING"]).group(1)
    assert signature not in error and "SharedAccessSignature" not in error
