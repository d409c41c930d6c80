"""Shared fixtures: real parts started by the test run itself.

- the Docker engine (./dev starts it; with CI=true its absence fails the run)
- a Docker registry with htpasswd auth (Debian's docker-registry), on loopback
- an S3-protocol server over HTTP (moto's standalone server), on loopback
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


def _private_home() -> str:
    """A skyvm home (install) of this test session only, set before skyvm is imported.

    Never ./dev's shared home: two sessions on one home are one install, and one session's
    end-of-run cleanup would take the other's clusters for its own. ``SKYVM_TEST_HOME`` names
    one on purpose. The wheel cache of ./dev's home is shared when present: it is
    content-addressed and written by rename, and building it again costs half a minute.
    """
    if os.environ.get("SKYVM_TEST_HOME"):
        return os.environ["SKYVM_TEST_HOME"]
    home = Path(tempfile.mkdtemp(prefix="skyvm-test-home-"))
    shared_wheels = Path(__file__).resolve().parent.parent / ".dev" / "home" / "wheels"
    if shared_wheels.is_dir():
        (home / "wheels").symlink_to(shared_wheels)
    return str(home)


os.environ["SKYVM_HOME"] = _private_home()
if not os.environ.get("SKYVM_TEST_HOME"):
    import atexit
    import shutil

    # After every fixture's teardown: the session's locks, leases and store go with it.
    atexit.register(shutil.rmtree, os.environ["SKYVM_HOME"], ignore_errors=True)
os.environ.setdefault("SKYVM_IDLE_POLL_S", "1")

from skyvm.backends.local import docker_available, list_managed  # noqa: E402
from skyvm.settings import RegistrySettings  # noqa: E402
from netutil import free_port, stop_group, wait_http  # noqa: E402,F401 - tests/ is on sys.path (rootdir conftest)
import emulators  # noqa: E402 - the GCS emulator and Azurite

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def docker_engine():
    if not docker_available():
        if IN_CI or os.environ.get("SKYVM_REQUIRE_DOCKER"):
            pytest.fail("no Docker engine reachable, and this run requires one (CI=true / SKYVM_REQUIRE_DOCKER): run ./dev test")
        pytest.skip("no Docker engine reachable")
    yield


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running():
    """After the whole run, nothing skyvm started may still exist (`skyvm status` is empty)."""
    if docker_available():
        from skyvm.backends.local import gc

        stale = gc()  # a home named by SKYVM_TEST_HOME may hold clusters of its earlier, dead runs
        if stale:
            print(f"removed {len(stale)} stale skyvm cluster(s) of earlier runs: {stale}")
    yield
    if docker_available():
        from skyvm.backends.local import home_id

        leftover = [r for r in list_managed() if r["home"] == home_id()]
        if leftover:
            subprocess.run(["docker", "rm", "-f", *[r["name"] for r in leftover]], capture_output=True)
            pytest.fail(f"containers left behind by the tests: {[r['name'] for r in leftover]}")


@pytest.fixture(scope="session", autouse=True)
def no_credential_files_left():
    """After the run, this test home's credential directory (in /dev/shm: not a temp dir) goes too."""
    yield
    from skyvm.connectors import files

    if "skyvm.backends.registry" in sys.modules:  # credential sets' backends hold directories until closed
        sys.modules["skyvm.backends.registry"].reset_backends()
    files.gc_secret_dirs()  # those of processes a test killed
    files._cleanup()
    root = files.secrets_root()
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


@pytest.fixture(scope="session")
def registry(docker_engine, tmp_path_factory):
    """A real registry on loopback with htpasswd auth; the password is in $SKYVM_TEST_REGISTRY_PASSWORD."""
    password = "s3cret-" + os.urandom(4).hex()
    try:
        server = emulators.LocalRegistry(tmp_path_factory.mktemp("registry"), "skyvm", password)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        os.environ["SKYVM_TEST_REGISTRY_PASSWORD"] = password
        yield RegistrySettings(server=server.server, username="skyvm", password_env="SKYVM_TEST_REGISTRY_PASSWORD")
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's standalone S3 server over HTTP on loopback, with a bucket; credentials in the environment."""
    proc, endpoint = emulators.start_moto(tmp_path_factory.mktemp("moto") / "log")
    try:
        os.environ.update({"AWS_ACCESS_KEY_ID": "skyvm-test-key", "AWS_SECRET_ACCESS_KEY": "skyvm-test-secret", "AWS_DEFAULT_REGION": "us-east-1"})
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="skyvm-test")
        yield endpoint
    finally:
        stop_group(proc)


@pytest.fixture
def project_root() -> Path:
    return Path(__file__).resolve().parents[1]


class StandInVM:
    """SkyPilot's environment, as skyvm reaches it from an engine's environment that cannot hold
    SkyPilot, answered by the recording stand-in VM of tests/skypilot/standin_vm.py."""

    def __init__(self, state: Path):
        self.dir = state

    def calls(self) -> list[dict]:
        path = self.dir / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def use_skypilot():
    """Make a backend the process's SkyPilot one for this test (through the registry); forgotten after it."""
    from skyvm.backends.registry import use_backend

    def use(backend):
        use_backend(backend, "skypilot")
        return backend

    yield use
    use_backend(None, "skypilot")


@pytest.fixture
def standin_vm(docker_engine, tmp_path, monkeypatch, use_skypilot):
    import importlib.util


    sky_python = os.environ.get("SKYVM_TEST_SKYPILOT_PYTHON", "")
    if not Path(sky_python).is_file():
        if IN_CI:
            pytest.fail("SKYVM_TEST_SKYPILOT_PYTHON must name SkyPilot's environment's python (./dev test sets it)")
        pytest.skip("no SkyPilot environment (set SKYVM_TEST_SKYPILOT_PYTHON)")
    # The point: this environment has no SkyPilot, so every call must cross to SkyPilot's own.
    assert importlib.util.find_spec("sky") is None
    state = tmp_path / "standin"
    monkeypatch.setenv("SKYVM_SKYPILOT_PYTHON", str(Path(__file__).resolve().parent / "skypilot" / "standin-python"))
    monkeypatch.setenv("SKYVM_STANDIN_DIR", str(state))
    use_skypilot(None)  # a backend made now, with the bridge above
    yield StandInVM(state)
    left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=dev.skyvm.standin={state}"], capture_output=True, text=True).stdout.split()
    if left:
        subprocess.run(["docker", "rm", "-f", *left], capture_output=True)
    assert not left, "a SkyPilot cluster (stand-in VM) was left running"


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """gcp-storage-emulator (in memory) on loopback with bucket skyvm-test; STORAGE_EMULATOR_HOST set. Yields the endpoint."""
    server = emulators.start_gcs(tmp_path_factory.mktemp("gcs"))
    try:
        yield server.endpoint
    finally:
        server.stop()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    """Azurite's blob service (from npm) on loopback with container skyvm-test; AZURE_STORAGE_CONNECTION_STRING set.

    Yields an object with .connection_string, .blob_endpoint, .account_name, .account_key.
    """
    try:
        server = emulators.start_azurite(tmp_path_factory.mktemp("azurite"))
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()
