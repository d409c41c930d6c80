"""What the Prefect and Airflow suites both check (test_clouds.py, test_canary.py of each).

- Cloud stores: which store a test uses, what a round trip left in it (listed with each cloud's own
  client, not skyvm's), and what credentials the nodes reported they were given.
- Secret markers: unique values, and where they surfaced.
- ``Watch``: a node connects to ``Watch.port`` on loopback (nodes share the host's network) and waits
  for a line (the node's code does it inline: it runs where this module cannot be imported); the
  watch then takes ``ps -eww -o args`` (full command lines) and ``docker inspect`` of skyvm's
  containers (and of their execs) before it lets the node go on, so the snapshot is taken while
  the node certainly runs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import uuid
from dataclasses import dataclass
from typing import Optional

# What a node reports of its environment: the store credentials and endpoints it may have been given.
NODE_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AZURE_STORAGE_CONNECTION_STRING",
    "SKYVM_GCS_TOKEN",
    "STORAGE_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
)


# -- cloud stores ----------------------------------------------------------------


@dataclass
class CloudStore:
    scheme: str
    url: str  # payload_store
    endpoint: Optional[str]  # payload_store_endpoint (S3 only: the others come from the fixtures' variables)
    listing: str  # what store_keys reaches the server with
    account_key: Optional[str] = None  # Azurite's, which no node may get


def cloud_store(scheme: str, request, prefix: str) -> CloudStore:
    """The store on the protocol server of ``scheme`` (its fixture started on first use)."""
    url = f"{scheme}://skyvm-test/{prefix}"
    if scheme == "s3":
        endpoint = request.getfixturevalue("s3_server")
        return CloudStore(scheme, url, endpoint, endpoint)
    if scheme == "gs":
        return CloudStore(scheme, url, None, request.getfixturevalue("gcs_server"))
    azurite = request.getfixturevalue("azurite")
    return CloudStore(scheme, url, None, azurite.connection_string, azurite.account_key)


def store_keys(store: CloudStore) -> list[str]:
    """The objects under the store's prefix, listed with the cloud's own client."""
    prefix = store.url.split("/", 3)[3] + "/"
    if store.scheme == "s3":
        import boto3

        listing = boto3.client("s3", endpoint_url=store.listing).list_objects_v2(Bucket="skyvm-test", Prefix=prefix)
        return [o["Key"].removeprefix(prefix) for o in listing.get("Contents", [])]
    if store.scheme == "gs":
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": store.listing})
        return [b.name.removeprefix(prefix) for b in client.list_blobs("skyvm-test", prefix=prefix)]
    from azure.storage.blob import ContainerClient

    container = ContainerClient.from_connection_string(store.listing, "skyvm-test")
    return [b.name.removeprefix(prefix) for b in container.list_blobs(name_starts_with=prefix)]


def check_round_trip(store: CloudStore, *node_envs: dict) -> None:
    """Each node's payload went in and its result came out through the bucket; each node got
    short-lived credentials scoped to the store, never the launcher's."""
    keys = store_keys(store)
    n = len(node_envs)
    assert sum(k.startswith("payloads/") for k in keys) == n and sum(k.startswith("results/") for k in keys) == n, keys
    for env in node_envs:
        if store.scheme == "s3":
            # The node's own federation token, scoped to the prefix: never the long-lived key the
            # launcher has (the s3_server fixture put skyvm-test-key/skyvm-test-secret in its environment).
            assert env["AWS_SECRET_ACCESS_KEY"] and env["AWS_SECRET_ACCESS_KEY"] != os.environ["AWS_SECRET_ACCESS_KEY"] == "skyvm-test-secret"
            assert env["AWS_ACCESS_KEY_ID"] != "skyvm-test-key" and env["AWS_SESSION_TOKEN"]
            assert env["AWS_ENDPOINT_URL_S3"] == store.endpoint
        elif store.scheme == "gs":
            # An emulator takes anonymous requests: the node gets its address and no token at all.
            assert env["STORAGE_EMULATOR_HOST"] == store.listing and env["SKYVM_GCS_TOKEN"] is None
            assert env["GOOGLE_APPLICATION_CREDENTIALS"] is None
        else:
            # A SAS for the container, never the account key.
            conn = env["AZURE_STORAGE_CONNECTION_STRING"]
            assert "SharedAccessSignature=" in conn and "AccountKey" not in conn and store.account_key not in conn


# -- secret markers ----------------------------------------------------------------


def marker(what: str) -> str:
    """A unique secret value that cannot occur by chance."""
    return f"canary-{what}-{uuid.uuid4().hex}"


def canary_markers(*names: str, registry_password: str) -> dict[str, str]:
    """A marker per name, and the registry's password (the registry fixture's own, random)."""
    return {**{name: marker(name) for name in names}, "registry_password": registry_password}


def leaked(markers: dict[str, str], **places: str) -> dict[str, list[str]]:
    """{place: [names of the markers found in it]} for every place that holds one."""
    found = {place: [name for name, value in markers.items() if value in (text or "")] for place, text in places.items()}
    return {place: names for place, names in found.items() if names}


# -- a look at the machine while a node runs -------------------------------------


class Watch:
    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(300)
        self.port = self._server.getsockname()[1]
        self.snapshot = ""
        self._thread = threading.Thread(target=self._serve, daemon=True, name="canary-watch")
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._server.accept()
        except OSError:
            return
        with conn:
            self.snapshot = self._look()
            conn.sendall(b"go\n")
        self._server.close()

    @staticmethod
    def _look() -> str:
        import docker

        ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
        names = subprocess.run(["docker", "ps", "-q", "--filter", "label=dev.skyvm.managed=1"], capture_output=True, text=True).stdout.split()
        inspect = subprocess.run(["docker", "inspect", *names], capture_output=True, text=True).stdout if names else ""
        api = docker.from_env().api
        execs = []
        for container in json.loads(inspect or "[]"):
            for exec_id in container.get("ExecIDs") or []:
                try:
                    execs.append(api.exec_inspect(exec_id))
                except docker.errors.NotFound:
                    pass  # an exec that ended meanwhile (a status or log call)
        # A node forked by its cluster's agent has no exec record (its values travelled over the agent's
        # socket); one run through an exec does. Either way the container is running and is looked at.
        assert names, "the watch found no skyvm container running"
        return "\n".join([ps, inspect, json.dumps(execs, default=str)])

    def result(self) -> str:
        self._thread.join(timeout=10)
        assert self.snapshot, "the node never called the watch"
        return self.snapshot
