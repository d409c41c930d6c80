"""The cloud storage protocol servers the tests start on loopback: a GCS emulator and Azurite.

Each helper starts the real server in its own process group on a port it
holds itself (``netutil.start_owned``: never another test run's server),
waits until it answers, makes the ``skyvm-test`` bucket or container, and returns a handle
whose ``stop()`` kills the whole group. The fixtures in conftest.py use them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from netutil import popen_logged, start_owned, stop_group

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "skyvm-test"
# Azurite's well-known development account (public, documented, not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
# Where ./dev (or the fixture, lazily) installs Azurite from npm.
AZURITE_DIR = Path(os.environ.get("SKYVM_AZURITE_DIR", ROOT / ".dev" / "azurite"))


@dataclass
class Server:
    proc: subprocess.Popen
    endpoint: str
    log: Path

    def stop(self) -> None:
        stop_group(self.proc)


def _start(make_cmd, log: Path, probe, ok=(200,), env=None) -> tuple[subprocess.Popen, str]:
    """Start ``make_cmd(port)`` on a port of its own (see netutil.start_owned) and wait until
    ``probe(endpoint)`` answers with a status in ``ok``: (process, endpoint)."""
    proc, port = start_owned(lambda port: popen_logged(make_cmd(port), log, env=env), lambda port: probe(f"http://127.0.0.1:{port}"), log, what=Path(log).stem, ok=ok)
    return proc, f"http://127.0.0.1:{port}"


def start_moto(log: Path, env=None) -> tuple[subprocess.Popen, str]:
    """moto's standalone server (S3, STS, ECR, IAM) on loopback: (process, endpoint)."""
    return _start(lambda port: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log, lambda e: f"{e}/moto-api/", env=env)


def start_gcs(workdir: Path) -> Server:
    """gcp-storage-emulator (in memory) with bucket skyvm-test; sets STORAGE_EMULATOR_HOST."""
    # Run through tests/gcs_emulator.py (its multipart uploads keep an object's last byte), by the Python
    # that has the emulator: this one, else the one of the command on PATH.
    exe = shutil.which("gcp-storage-emulator", path=str(Path(sys.executable).parent)) or shutil.which("gcp-storage-emulator")
    python = sys.executable if importlib.util.find_spec("gcp_storage_emulator") or not exe else str(Path(exe).parent / "python")
    cmd = [python, str(Path(__file__).with_name("gcs_emulator.py"))]
    cmd += ["start", "--host", "127.0.0.1", "--in-memory", "--default-bucket", BUCKET]
    proc, endpoint = _start(lambda port: [*cmd, "--port", str(port)], workdir / "gcs.log", lambda e: f"{e}/storage/v1/b/{BUCKET}")
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    return Server(proc, endpoint, workdir / "gcs.log")


def azurite_blob_exe() -> Path:
    """Azurite's blob server, installed from npm into AZURITE_DIR the first time."""
    exe = AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob"
    if exe.is_file():
        return exe
    if not (shutil.which("npm") and shutil.which("node")):
        raise RuntimeError(f"Azurite is not installed at {AZURITE_DIR} and npm/node are not on PATH: install Node.js (Debian: nodejs npm), then ./dev setup")
    AZURITE_DIR.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["npm", "install", "--prefix", str(AZURITE_DIR), "--no-audit", "--no-fund", "azurite"], capture_output=True, text=True, timeout=600)
    if out.returncode != 0 or not exe.is_file():
        raise RuntimeError(f"npm install azurite into {AZURITE_DIR} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return exe


@dataclass
class Azurite(Server):
    account_name: str = AZURITE_ACCOUNT
    account_key: str = field(default=AZURITE_KEY, repr=False)

    @property
    def blob_endpoint(self) -> str:
        return f"{self.endpoint}/{self.account_name}"

    @property
    def connection_string(self) -> str:
        return connection_string(self.blob_endpoint, account_name=self.account_name, account_key=self.account_key)


def connection_string(blob_endpoint: str, *, account_name: Optional[str] = None, account_key: Optional[str] = None, sas: Optional[str] = None) -> str:
    """An Azure Storage connection string: the account's (name and key) or a SAS one."""
    if sas is not None:
        return f"BlobEndpoint={blob_endpoint};SharedAccessSignature={sas}"
    return f"DefaultEndpointsProtocol=http;AccountName={account_name};AccountKey={account_key};BlobEndpoint={blob_endpoint};"


def start_azurite(workdir: Path) -> Azurite:
    """Azurite's blob service with container skyvm-test; sets AZURE_STORAGE_CONNECTION_STRING."""
    exe = azurite_blob_exe()
    data = Path(tempfile.mkdtemp(prefix="azurite-", dir=workdir))
    cmd = [str(exe), "--blobHost", "127.0.0.1", "--location", str(data), "--skipApiVersionCheck", "--loose"]
    # Any HTTP answer means it listens (an unauthenticated request gets 400/403).
    proc, endpoint = _start(lambda port: [*cmd, "--blobPort", str(port)], workdir / "azurite.log", lambda e: f"{e}/{AZURITE_ACCOUNT}?comp=list", ok=(200, 400, 403))
    server = Azurite(proc, endpoint, workdir / "azurite.log")
    try:
        from azure.storage.blob import BlobServiceClient

        BlobServiceClient.from_connection_string(server.connection_string).create_container(BUCKET)
    except Exception:
        server.stop()
        raise
    os.environ["AZURE_STORAGE_CONNECTION_STRING"] = server.connection_string
    return server


class LocalRegistry:
    """Debian's docker-registry on loopback with htpasswd auth for one user."""

    def __init__(self, d: Path, user: str, password: str):
        import bcrypt

        exe = shutil.which("docker-registry")
        if not exe:
            raise RuntimeError("docker-registry is not installed (./dev installs Debian's docker-registry package)")
        (d / "htpasswd").write_text(f"{user}:" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode() + "\n")

        def command(port: int) -> list[str]:
            (d / "config.yml").write_text(
                f"""version: 0.1
log: {{level: error}}
storage: {{filesystem: {{rootdirectory: {d / 'data'}}}, delete: {{enabled: true}}}}
http: {{addr: 127.0.0.1:{port}, secret: skyvm-test}}
auth: {{htpasswd: {{realm: skyvm, path: {d / 'htpasswd'}}}}}
"""
            )
            return [exe, "serve", str(d / "config.yml")]

        # /v2/ asks for a login (401): the registry is up.
        self.proc, endpoint = _start(command, d / "log", lambda e: f"{e}/v2/", ok=(200, 401))
        self.server = endpoint.removeprefix("http://")

    def stop(self) -> None:
        stop_group(self.proc)
