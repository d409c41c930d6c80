"""Cloud credentials for SkyPilot's own process, from a node's connectors.

SkyPilot's API server reads cloud credentials when it starts, and a request
does not carry them. So each distinct set of connectors gets its own local
API server state: its own ``SKY_RUNTIME_DIR`` under ``$SKYVM_HOME/skypilot/``
and its own port, started (by SkyPilot's auto-start) from a bridge process
whose environment holds that set's credentials, as environment variables or
as 0600 files in a private temporary directory. Nothing is written to
``~/.aws``, ``~/.config/gcloud``, ``~/.azure``, ``~/.lambda_cloud`` or
``~/.kube``. When skyvm's process ends, the bridge, that API server and the
private directory go with it.

With a remote API server (``SKYPILOT_API_SERVER_ENDPOINT``) none of this
applies: the server uses its own credentials, and skyvm says so once.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Optional

from skyvm.connectors import node_connectors
from skyvm.connectors.base import Connector
from skyvm.connectors.files import private_dir, remove
from skyvm.payloads import DEFAULT_HOME
from skyvm.settings import NodeSettings

log = logging.getLogger("skyvm.skypilot")

DEFAULT_LOCAL_PORT = 46580
_warned_remote = False


def remote_server() -> Optional[str]:
    return os.environ.get("SKYPILOT_API_SERVER_ENDPOINT") or None


class CredentialSet:
    """The connectors a node gives SkyPilot (implicit ones need nothing: SkyPilot finds those itself)."""

    def __init__(self, connectors: list[Connector]):
        self.connectors = sorted(connectors, key=lambda c: c.type)
        self.key = hashlib.sha256("|".join(c.fingerprint() for c in self.connectors).encode()).hexdigest()[:12]
        self._dir: Optional[Path] = None

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.connectors]

    def state_dir(self) -> Path:
        return DEFAULT_HOME / "skypilot" / self.key

    def port(self) -> int:
        # Away from SkyPilot's default; one per credential set, stable across processes.
        return DEFAULT_LOCAL_PORT + 1 + int(self.key, 16) % 2000

    def environment(self) -> dict[str, str]:
        """The bridge process's extra environment: this set's credentials and its own server state."""
        if self._dir is None:
            self._dir = private_dir("skyvm-sky-")
        env: dict[str, str] = {}
        for conn in self.connectors:
            env.update(conn.skypilot_env(self._dir))
        state = self.state_dir()
        state.mkdir(parents=True, exist_ok=True)
        env.update(SKY_RUNTIME_DIR=str(state), SKYPILOT_API_SERVER_LOCAL_PORT=str(self.port()))
        return env

    def close(self) -> None:
        if self._dir is not None:
            remove(self._dir)
            self._dir = None


def credential_set(settings: NodeSettings) -> Optional[CredentialSet]:
    """The node's SkyPilot credentials, or None when SkyPilot's ambient ones (or a remote server's) apply."""
    global _warned_remote
    conns = [c for c in node_connectors(settings) if c.method != "implicit"]
    if not conns:
        return None
    if remote_server():
        if not _warned_remote:
            _warned_remote = True
            log.warning(
                "SkyPilot API server %s is remote: it launches with its own cloud credentials; "
                "connectors %s are used for payload stores and registries only",
                remote_server(),
                ", ".join(c.name for c in conns),
            )
        return None
    return CredentialSet(conns)
