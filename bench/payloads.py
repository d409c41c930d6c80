"""payloads: a large argument and result through skyvm's bucket stores, against each cloud's own client.

For each store (S3 on moto's server, GCS on the GCS emulator, Azure Blob on Azurite; the last two
through tests/emulators.py, skipped with a note when they cannot start), per repetition, with
fresh random bytes (payloads are content-addressed: the same bytes twice would not be uploaded
again):

- skyvm: ``skyvm.payloads.open_store(url, endpoint)``: ``put_payload`` (the argument's way) then
  ``get`` (the result's way): fsspec (s3fs / gcsfs / adlfs), with skyvm's SHA-256 framing;
- raw: the same bytes with the cloud's own SDK: boto3 ``put_object`` / ``get_object``,
  google-cloud-storage ``upload_from_string`` / ``download_as_bytes``, azure-storage-blob
  ``upload_blob`` / ``download_blob``.

Plus, for S3, one node end to end (a warm node echoing the bytes back: the argument up, the node's
download and upload, the result down) against the same four transfers done with boto3.

Target (issue): skyvm's throughput at least 0.8x the raw client's, per store (put + get).
``--n`` is the size in MiB (default 256).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from bench import scenario
from bench.common import Skip, docker_ok, start_moto, tests_on_path

MIB = 2**20


def _raw_s3(endpoint: str, bucket: str):
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)

    def put(key: str, data: bytes) -> None:
        client.put_object(Bucket=bucket, Key=key, Body=data)

    def get(key: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def delete(key: str) -> None:
        client.delete_object(Bucket=bucket, Key=key)

    return put, get, delete


def _raw_gcs(endpoint: str, bucket: str):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="skyvm-bench", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint})
    b = client.bucket(bucket)

    def put(key: str, data: bytes) -> None:
        b.blob(key).upload_from_string(data, content_type="application/octet-stream")

    def get(key: str) -> bytes:
        return b.blob(key).download_as_bytes()

    def delete(key: str) -> None:
        b.blob(key).delete()

    return put, get, delete


def _raw_azure(connection_string: str, container: str):
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient.from_connection_string(connection_string)
    c = service.get_container_client(container)

    def put(key: str, data: bytes) -> None:
        c.upload_blob(key, data, overwrite=True)

    def get(key: str) -> bytes:
        return c.download_blob(key).readall()

    def delete(key: str) -> None:
        c.delete_blob(key)

    return put, get, delete


def _stores(b, workdir: Path) -> list[tuple]:
    """(name, store URL, endpoint, raw client) for every store that can start here."""
    stores = []
    s3 = start_moto(b)
    stores.append(("s3", f"s3://skyvm-bench/{b.session}", s3, _raw_s3(s3, "skyvm-bench")))
    tests_on_path()
    try:
        import emulators
    except ImportError as exc:
        b.note(f"GCS and Azure skipped: tests/emulators.py does not import here ({exc})")
        return stores
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "AZURE_STORAGE_CONNECTION_STRING")}

    def restore() -> None:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    b.on_exit(restore)
    try:
        gcs = emulators.start_gcs(workdir)
        b.on_exit(gcs.stop)
        stores.append(("gcs", f"gs://{emulators.BUCKET}/{b.session}", gcs.endpoint, _raw_gcs(gcs.endpoint, emulators.BUCKET)))
    except Exception as exc:  # noqa: BLE001 - a store that cannot start is skipped, and said so
        b.note(f"GCS skipped: the emulator did not start ({type(exc).__name__}: {str(exc)[:200]})")
    try:
        az = emulators.start_azurite(workdir)
        b.on_exit(az.stop)
        stores.append(("azure", f"az://{emulators.BUCKET}/{b.session}", None, _raw_azure(az.connection_string, emulators.BUCKET)))
    except Exception as exc:  # noqa: BLE001
        b.note(f"Azure skipped: Azurite did not start ({type(exc).__name__}: {str(exc)[:200]})")
    return stores


@scenario(
    "payloads",
    env="core",
    help="a large argument and result through the S3 / GCS / Azure stores vs each cloud's own client",
    n=256,
    reps=3,
    smoke_n=1,
    n_means="MiB",
    options={"e2e": 1},
)
def payloads(b) -> None:
    try:
        import boto3  # noqa: F401
        from skyvm.payloads import open_store
    except ImportError as exc:
        raise Skip(f"needs skyvm[clouds] and boto3: {exc}") from None

    size = b.n * MIB
    workdir = Path(tempfile.mkdtemp(prefix="skyvm-bench-stores-"))
    b.on_exit(lambda: shutil.rmtree(workdir, ignore_errors=True))
    stores = _stores(b, workdir)
    b.params["stores"] = [s[0] for s in stores]
    state: dict = {}

    def fresh(rep: int) -> bytes:
        if state.get("rep") != rep:
            state.clear()
            state.update(rep=rep, data=os.urandom(size))
        return state["data"]

    arms = {}
    for name, url, endpoint, (raw_put, raw_get, raw_delete) in stores:
        store = open_store(url, endpoint)
        # Connections opened and first calls made outside the timings, on both sides.
        warm = store.put_payload(os.urandom(1024))
        store.get(store.key_of(warm))
        store.delete(store.key_of(warm))
        raw_put(f"{b.session}-warmup", b"x" * 1024)
        raw_get(f"{b.session}-warmup")
        raw_delete(f"{b.session}-warmup")

        def skyvm_arm(rep, name=name, store=store):
            data = fresh(rep)
            t0 = time.perf_counter()
            obj = store.put_payload(data)
            t1 = time.perf_counter()
            back = store.get(store.key_of(obj))
            t2 = time.perf_counter()
            b.check(back == data, f"{name}: skyvm's store gave back other bytes")
            del back
            store.delete(store.key_of(obj))
            b.add(f"skyvm {name} put", t1 - t0)
            b.add(f"skyvm {name} get", t2 - t1)
            b.add(f"skyvm {name} put+get", t2 - t0)

        def raw_arm(rep, name=name, raw_put=raw_put, raw_get=raw_get, raw_delete=raw_delete):
            data = fresh(rep)
            key = f"{b.session}-raw/{uuid.uuid4().hex}"
            t0 = time.perf_counter()
            raw_put(key, data)
            t1 = time.perf_counter()
            back = raw_get(key)
            t2 = time.perf_counter()
            b.check(back == data, f"{name}: the raw client gave back other bytes")
            del back
            raw_delete(key)
            b.add(f"raw {name} put", t1 - t0)
            b.add(f"raw {name} get", t2 - t1)
            b.add(f"raw {name} put+get", t2 - t0)

        arms[f"skyvm {name}"] = skyvm_arm
        arms[f"raw {name}"] = raw_arm

    e2e = bool(int(b.opt("e2e", 1))) and docker_ok()
    if e2e:
        import skyvm

        from bench import nodefns

        s3_endpoint = stores[0][2]
        run = skyvm.Run({"defaults": {"payload_store": f"s3://skyvm-bench/{b.session}-e2e", "payload_store_endpoint": s3_endpoint, "labels": b.labels(kind="e2e")}})
        b.on_exit(run.close)
        t0 = time.perf_counter()
        b.check(run.submit(nodefns.noop, node="warmup").result(900) == 1, "the warm-up node failed")
        print(f"  e2e warm cluster (and node image) ready in {time.perf_counter() - t0:.1f} s (not counted)", flush=True)
        raw_put, raw_get, raw_delete = stores[0][3]

        def node_arm(rep):
            data = fresh(rep)
            t0 = time.perf_counter()
            back = run.submit(nodefns.echo, data, node="echo").result(900)
            b.add("skyvm s3 node echo (end to end)", time.perf_counter() - t0)
            b.check(back == data, "the echo node returned other bytes")

        def raw_four(rep):
            data = fresh(rep)
            keys = [f"{b.session}-raw4/{uuid.uuid4().hex}" for _ in range(2)]
            t0 = time.perf_counter()
            raw_put(keys[0], data)
            got = raw_get(keys[0])
            raw_put(keys[1], got)
            back = raw_get(keys[1])
            b.add("raw s3 put+get+put+get", time.perf_counter() - t0)
            b.check(back == data, "raw four transfers gave back other bytes")
            for key in keys:
                raw_delete(key)

        arms["skyvm s3 node"] = node_arm
        arms["raw s3 x4"] = raw_four
    elif int(b.opt("e2e", 1)):
        b.note("end-to-end node skipped: no Docker engine")

    b.alternate(arms)

    mib = size / MIB
    for name, *_ in stores:
        for way in ("put", "get", "put+get"):
            for who in ("skyvm", "raw"):
                med = b.med(f"{who} {name} {way}")
                b.comparisons.append({"name": f"{who} {name} {way} throughput", "kind": "throughput", "value": (mib * (2 if way == "put+get" else 1)) / med if med else None, "unit": "MiB/s"})
        b.ratio(f"{name} put: skyvm / raw throughput", f"raw {name} put", f"skyvm {name} put")
        b.ratio(f"{name} get: skyvm / raw throughput", f"raw {name} get", f"skyvm {name} get")
        ratio = b.ratio(f"{name} put+get: skyvm / raw throughput", f"raw {name} put+get", f"skyvm {name} put+get")
        b.target(
            f"{name} throughput vs raw client",
            ratio,
            ">=",
            0.8,
            "x",
            "skyvm goes through fsspec (s3fs, gcsfs, adlfs), not the cloud's own client, and frames every object "
            "with its SHA-256 (a hash and a copy on put and on get)",
        )
    if e2e:
        b.ratio("s3 node end to end / raw four transfers", "skyvm s3 node echo (end to end)", "raw s3 put+get+put+get")
