"""SkyPilot suite: catalogs kept in the repo (a subset of SkyPilot's public catalog, see catalog/README.md),
and a real SkyPilot API server started by the tests in SkyPilot's own environment."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netutil import start_owned

HERE = Path(__file__).resolve().parent
CATALOG = HERE / "catalog"
SERVER_SITE = HERE / "server_site"


@pytest.fixture(scope="session")
def catalog_dir() -> str:
    return str(CATALOG)


@pytest.fixture
def cloud_settings(s3_server, registry, monkeypatch):
    monkeypatch.setenv("SKYVM_S3_ENDPOINT_URL", s3_server)
    return {
        "defaults": {
            "backend": "skypilot",
            "cloud": "aws",
            "cpus": "2+",
            "payload_store": "s3://skyvm-test/sky",
            "payload_store_endpoint": s3_server,
            "registry": registry.model_dump(),
            "idle_minutes_to_autostop": 15,
        }
    }


class ApiServer:
    def __init__(self, url: str, root: Path, proc: subprocess.Popen, client_env: dict):
        self.url, self.root, self.proc, self.client_env = url, root, proc, client_env

    @property
    def log(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")


@pytest.fixture(scope="session")
def api_server(tmp_path_factory):
    """`python -m sky.server.server` on loopback, with its own state and the repo's catalogs.

    Clouds count as enabled without credentials in its worker processes (see
    server_site/sitecustomize.py: SkyPilot's own `enable_all_clouds`). Clients
    reach it through SKYPILOT_API_SERVER_ENDPOINT, as a team's remote server.
    """
    pytest.importorskip("sky")
    root = tmp_path_factory.mktemp("sky-api-server")
    runtime = root / "runtime"
    shutil.copytree(CATALOG, runtime / ".sky" / "catalogs" / "v8", ignore=shutil.ignore_patterns("*.md"))
    (root / "home").mkdir()
    (root / "client-home").mkdir()
    def common(port: int) -> dict:
        return {
            "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",
            # Moves the server's internal queue port with it: never the default one a user's own server holds.
            "SKYPILOT_API_SERVER_LOCAL_PORT": str(port),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def launch(port: int) -> subprocess.Popen:
        server_env = {
            **os.environ,
            **common(port),
            "HOME": str(root / "home"),
            "SKY_RUNTIME_DIR": str(runtime),
            "PYTHONPATH": os.pathsep.join([str(SERVER_SITE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "SKYVM_TEST_ENABLED_CLOUDS": "gcp,lambda",
            "IS_SKYPILOT_SERVER": "true",
        }
        with open(root / "server.log", "a") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "sky.server.server", "--host", "127.0.0.1", f"--port={port}"],
                env=server_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )

    # A port this server holds itself: another test run's SkyPilot server never answers for it.
    proc, port = start_owned(launch, lambda port: f"http://127.0.0.1:{port}/api/health", root / "server.log", what="SkyPilot API server", timeout=180)
    url = f"http://127.0.0.1:{port}"
    client_env = {**os.environ, **common(port), "HOME": str(root / "client-home"), "SKYPILOT_API_SERVER_ENDPOINT": url}
    client_env.pop("SKY_RUNTIME_DIR", None)
    try:
        yield ApiServer(url, root, proc, client_env)
    finally:
        # The server and every worker it spawned share its process group: stop them all, check none is left.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.time() + 10  # it drains its daemon requests first; past that, kill
        while time.time() < deadline and _group_alive(proc.pid):
            time.sleep(0.5)
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture
def chosen_bridge():
    """``chosen_bridge(b)``: every ``get_bridge()`` answers ``b`` until the test ends (``use_bridge``)."""
    import contextlib

    from skyvm.skypilot.bridge import use_bridge

    with contextlib.ExitStack() as stack:
        yield lambda bridge: stack.enter_context(use_bridge(bridge))
