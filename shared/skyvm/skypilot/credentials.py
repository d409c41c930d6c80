"""Cloud credentials for SkyPilot's own process, from a node's connectors.

SkyPilot's API server reads cloud credentials when it starts, and a request
does not carry them. So each distinct set of connectors gets its own local
API server state: its own ``SKY_RUNTIME_DIR`` under ``$SKYVM_HOME/skypilot/``
and its own port, started (by SkyPilot's auto-start) from a bridge process
whose environment holds that set's credentials, as environment variables or
as 0600 files in a private directory (``skyvm.connectors.files``: memory-backed
where the machine allows, removed by ``skyvm gc`` once their process is gone).
Nothing is written to ``~/.aws``, ``~/.config/gcloud``, ``~/.azure``,
``~/.lambda_cloud`` or ``~/.kube``. When skyvm's process ends, the bridge,
that API server and the private directory go with it.

Ports: each set's port is allocated once per install, under a lock, and
recorded in ``$SKYVM_HOME/skypilot/ports.json`` (set key -> port): two sets
never share one, and a port something else holds at allocation is passed
over. The first candidate hashes the install and the set, so two installs with
equal settings start apart. The set's server is started with
``SKYVM_SKYPILOT_SET`` (install:set) in its environment, and the bridge checks,
before every call, that whatever listens on the port carries it
(``verify_local_server``): anything else is an error naming the port.

Minted credentials (AWS session-token, federation-token) are renewed before
they expire (``Connector.renew_at``): the set rewrites its files in place, and
SkyPilot's boto3 reads them again through its ``credential_process``, so the
long-lived API server and bridge keep working with no restart.

With a remote API server (``SKYPILOT_API_SERVER_ENDPOINT``) none of this
applies: the server uses its own credentials, and skyvm says so once.

May import: filelock, skyvm.connectors, skyvm.errors, skyvm.home, skyvm.settings (skyvm.backends
never: the backend imports this).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from filelock import FileLock

from skyvm.connectors import node_connectors
from skyvm.connectors.base import Connector
from skyvm.connectors.files import owner_token, private_dir, remove, write_private
from skyvm.errors import InfrastructureError
from skyvm.home import Home
from skyvm.settings import NodeSettings

log = logging.getLogger("skyvm.skypilot")

DEFAULT_LOCAL_PORT = 46580
# The ports credential sets' servers take: away from SkyPilot's default, 2,000 of them.
PORT_LOW, PORT_SPAN = DEFAULT_LOCAL_PORT + 1, 2000
# In the environment of a set's bridge and so of the API server SkyPilot starts from it: whose it is.
SET_ENV = "SKYVM_SKYPILOT_SET"
# ... and which process's credential files it reads (pid.start time): a server whose owner was killed
# reads files that `skyvm gc` removes, so the next bridge of the set replaces it.
OWNER_ENV = "SKYVM_SKYPILOT_OWNER"


def ports_file() -> Path:
    return Home.current().skypilot / "ports.json"


def _ports_locked() -> FileLock:
    """The install's lock on ports_file(), across its processes (and threads: not thread-local)."""
    path = ports_file().with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path, thread_local=False)


def preferred_port(ident: str) -> int:
    """The first port tried for a set (``ident`` = install:set): a hash, so installs and sets start apart."""
    return PORT_LOW + int(hashlib.sha256(ident.encode()).hexdigest(), 16) % PORT_SPAN


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def allocate_port(key: str, ident: str, names: list[str]) -> int:
    """This install's port for credential set ``key``: the recorded one, else a new one no other set
    of the install has and nothing holds now, recorded in ports_file()."""
    path = ports_file()
    with _ports_locked():
        try:
            table = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            log.warning("%s is not JSON: SkyPilot API server ports are allocated afresh", path)
            table = {}
        if key in table:
            return int(table[key]["port"])
        taken = {int(e["port"]) for e in table.values()}
        first = preferred_port(ident)
        for i in range(PORT_SPAN):
            port = PORT_LOW + (first - PORT_LOW + i) % PORT_SPAN
            if port not in taken and _bindable(port):
                table[key] = {"port": port, "connectors": names, "allocated_at": time.time()}
                write_private(path, json.dumps(table, indent=1, sort_keys=True))
                return port
    raise InfrastructureError(
        f"no free port in {PORT_LOW}-{PORT_LOW + PORT_SPAN - 1} for the SkyPilot API server of connectors {names}: "
        f"{len(taken)} are recorded in {path} and the rest are held; remove entries of connector sets no longer used"
    )


def remote_server() -> Optional[str]:
    return os.environ.get("SKYPILOT_API_SERVER_ENDPOINT") or None


class CredentialSet:
    """The connectors a node gives SkyPilot (implicit ones need nothing: SkyPilot finds those itself)."""

    def __init__(self, connectors: list[Connector]):
        self.connectors = sorted(connectors, key=lambda c: c.type)
        self.key = hashlib.sha256("|".join(c.fingerprint() for c in self.connectors).encode()).hexdigest()[:12]
        self._dir: Optional[Path] = None
        self._port: Optional[int] = None
        self._renew_lock = threading.RLock()
        self._timer: Optional[threading.Timer] = None
        # When the files' minted credentials are next due for renewal (None: nothing minted).
        self.renew_at: Optional[float] = None

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.connectors]

    def state_dir(self) -> Path:
        return Home.current().skypilot / self.key

    @property
    def ident(self) -> str:
        """install:set, what the set's API server carries in its environment (SET_ENV)."""
        return f"{Home.current().id}:{self.key}"

    def port(self) -> int:
        """The set's own port, allocated once per install and recorded (see the module's docstring)."""
        if self._port is None:
            self._port = allocate_port(self.key, self.ident, self.names)
        return self._port

    def environment(self) -> dict[str, str]:
        """The bridge process's extra environment: this set's credentials and its own server state."""
        with self._renew_lock:
            if self._dir is None:
                self._dir = private_dir("skyvm-sky-")
            env = self._write()
        state = self.state_dir()
        state.mkdir(parents=True, exist_ok=True)
        env.update(SKY_RUNTIME_DIR=str(state), SKYPILOT_API_SERVER_LOCAL_PORT=str(self.port()), **{SET_ENV: self.ident, OWNER_ENV: owner_token()})
        return env

    def _write(self) -> dict[str, str]:
        """Each connector's environment and files (written afresh), and when to renew them next."""
        env: dict[str, str] = {}
        for conn in self.connectors:
            env.update(conn.skypilot_env(self._dir))
        due = [t for t in (conn.renew_at() for conn in self.connectors) if t is not None]
        self.renew_at = min(due) if due else None
        self._schedule()
        return env

    def renew_if_due(self) -> bool:
        """Write the files again with fresh credentials when the minted ones are due (True if so).

        Their paths and so the bridge's environment stay the same: SkyPilot's own process reads the
        new ones the next time its SDK asks (a credential_process profile for AWS).
        """
        with self._renew_lock:
            if self._dir is None or self.renew_at is None or time.time() < self.renew_at:
                return False
            self._write()
            log.info("SkyPilot credentials of connectors %s renewed (next at %s)", self.names, time.strftime("%H:%M:%S", time.localtime(self.renew_at or 0)))
            return True

    def _schedule(self) -> None:
        # Renewed on time even when nothing calls SkyPilot for a while (its server refreshes cluster
        # states by itself); each renewal schedules the next.
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.renew_at is not None:
            self._timer = threading.Timer(max(0.0, self.renew_at - time.time()), self._renew_on_time)
            self._timer.daemon = True
            self._timer.name = f"skyvm-renew-{self.key}"
            self._timer.start()

    def _renew_on_time(self) -> None:
        try:
            self.renew_if_due()
        except Exception as exc:  # noqa: BLE001 - the next call to SkyPilot tries again, and says why if it fails
            log.warning("renewing the SkyPilot credentials of connectors %s failed: %s", self.names, exc)
            with self._renew_lock:
                self.renew_at = time.time() + 30
                self._schedule()

    def close(self) -> None:
        with self._renew_lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.renew_at = None
            if self._dir is not None:
                remove(self._dir)
                self._dir = None


@functools.cache  # said once per server and connector set in a process (cache_clear() to hear it again)
def _warn_remote(server: str, names: str) -> None:
    log.warning(
        "SkyPilot API server %s is remote: it launches with its own cloud credentials; "
        "connectors %s are used for payload stores and registries only",
        server,
        names,
    )


def credential_set(settings: NodeSettings) -> Optional[CredentialSet]:
    """The node's SkyPilot credentials, or None when SkyPilot's ambient ones (or a remote server's) apply."""
    conns = [c for c in node_connectors(settings) if c.method != "implicit"]
    if not conns:
        return None
    if remote_server():
        _warn_remote(remote_server(), ", ".join(c.name for c in conns))
        return None
    return CredentialSet(conns)
