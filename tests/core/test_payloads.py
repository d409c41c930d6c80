"""Payload stores: a directory and S3 (moto's server over HTTP); checksums; clear errors."""

from __future__ import annotations

import pytest

from skyvm.errors import PayloadError
from skyvm.payloads import LocalStore, S3Store, open_store, store_for_object


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_server")
    return S3Store("skyvm-test", f"t-{tmp_path.name}", endpoint_url=endpoint)


def test_roundtrip_and_content_addressing(store):
    url = store.put_payload(b"hello")
    assert url == store.put_payload(b"hello")  # same content, same key
    assert url != store.put_payload(b"other")
    assert url.endswith("payloads/2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")
    s, key = store_for_object(url, getattr(store, "endpoint_url", None))
    assert s.get(key) == b"hello"


def test_missing_object_is_a_clear_error(store):
    with pytest.raises(PayloadError, match="does not exist"):
        store.get("results/nothing-here")


def test_corruption_is_detected(store):
    store.put("results/r1", b"payload-bytes")
    blob = store._path("results/r1").read_bytes() if isinstance(store, LocalStore) else None
    if blob is not None:
        store._path("results/r1").write_bytes(blob[:-1] + b"X")
    else:
        from skyvm.payloads import frame

        framed = frame(b"payload-bytes")
        store.client.put_object(Bucket=store.bucket, Key=store._key("results/r1"), Body=framed[:-1] + b"X")
    with pytest.raises(PayloadError, match="checksum mismatch"):
        store.get("results/r1")
    if isinstance(store, LocalStore):
        store._path("results/r2").write_bytes(b"not framed")
    else:
        store.client.put_object(Bucket=store.bucket, Key=store._key("results/r2"), Body=b"not framed")
    with pytest.raises(PayloadError, match="bad header"):
        store.get("results/r2")


def test_missing_bucket(s3_server):
    with pytest.raises(PayloadError, match="bucket 'no-such-bucket' does not exist"):
        S3Store("no-such-bucket", endpoint_url=s3_server).get("x")


def test_open_store_forms(tmp_path):
    assert open_store(str(tmp_path / "a")).url == f"file://{tmp_path / 'a'}"
    assert open_store(f"file://{tmp_path / 'b'}").url == f"file://{tmp_path / 'b'}"
    assert open_store("s3://bucket/some/prefix").url == "s3://bucket/some/prefix"
    with pytest.raises(PayloadError, match="unsupported payload store"):
        open_store("gs://bucket")
    with pytest.raises(PayloadError, match="escapes"):
        LocalStore(tmp_path / "c").get("../../etc/passwd")
