"""The process's backends, as one explicit, resettable registry.

    local_backend()               # Docker when an engine answers, else plain processes
    skypilot_backend(settings)    # one per set of connectors (one SkyPilot process, one API server state)
    use_backend(backend)          # this backend answers for its name from now on (tests: a stand-in bridge)
    reset_backends()              # forget them all (closing SkyPilot's); the next call makes new ones

Holds: ``Backends`` and the functions above over the process's one registry.
May import: skyvm.backends.* (lazily), skyvm.engine, skyvm.errors, skyvm.pool (to forget pools).
"""

from __future__ import annotations

import atexit
import functools
import os
import threading
from typing import Optional

from skyvm.backends.base import Backend
from skyvm.errors import InfrastructureError


class Backends:
    """Which backend object answers for each name in this process."""

    def __init__(self):
        self._lock = threading.Lock()
        self._local: Optional[Backend] = None
        self._skypilot: Optional[Backend] = None
        self._with_credentials: dict[str, Backend] = {}

    def local(self) -> Backend:
        from skyvm.engine import docker_available

        with self._lock:
            if self._local is None:
                if docker_available():
                    from skyvm.backends.containers import DockerBackend

                    self._local = DockerBackend()
                elif os.environ.get("SKYVM_REQUIRE_DOCKER"):
                    raise InfrastructureError("SKYVM_REQUIRE_DOCKER is set but no Docker engine is reachable")
                else:
                    from skyvm.backends.processes import ProcessBackend

                    self._local = ProcessBackend()
            return self._local

    def skypilot(self, settings=None) -> Backend:
        from skyvm.backends.skypilot import SkyPilotBackend
        from skyvm.skypilot.credentials import credential_set

        creds = credential_set(settings) if settings is not None else None
        with self._lock:
            if creds is not None:
                if creds.key not in self._with_credentials:
                    self._with_credentials[creds.key] = SkyPilotBackend(credentials=creds)
                return self._with_credentials[creds.key]
            if self._skypilot is None:
                self._skypilot = SkyPilotBackend()
            return self._skypilot

    def all_skypilot(self) -> list[Backend]:
        with self._lock:
            return [b for b in [self._skypilot, *self._with_credentials.values()] if b is not None]

    def use(self, backend: Optional[Backend], name: str = "") -> None:
        """``backend`` answers for its name (``local``, ``local-process``, ``skypilot``) from now on; None: made anew when next asked."""
        name = name or backend.name
        with self._lock:
            if name in ("local", "local-process"):
                self._local = backend
            elif name == "skypilot":
                self._skypilot = backend
            else:
                raise ValueError(f"no backend is called {name!r}; accepted: local, local-process, skypilot")

    def close(self) -> None:
        """Every SkyPilot backend's bridge, its API server and private files go; all are forgotten."""
        with self._lock:
            sky = [b for b in [self._skypilot, *self._with_credentials.values()] if b is not None]
            self._local = self._skypilot = None
            self._with_credentials = {}
        for backend in sky:
            if getattr(backend, "credentials", None) is not None:
                backend.close()


@functools.cache
def backends() -> Backends:
    """This process's registry (made when first asked for)."""
    return Backends()


def local_backend() -> Backend:
    """The process's local backend: Docker when an engine answers, else plain processes."""
    return backends().local()


def skypilot_backend(settings=None) -> Backend:
    return backends().skypilot(settings)


def skypilot_bridge(settings=None):
    """The bridge a node's connectors reach SkyPilot through (``skyvm check`` asks it ``sky check``):
    the one its SkyPilot backend launches with, so the check sees what a launch would."""
    return backends().skypilot(settings).bridge


def use_backend(backend: Optional[Backend], name: str = "") -> None:
    backends().use(backend, name)


def reset_backends() -> None:
    """Forget every backend (closing the credentialed SkyPilot ones) and their pools."""
    from skyvm.pool import reset_pools

    backends().close()
    reset_pools()


@atexit.register
def _close_credentialed() -> None:
    if backends.cache_info().currsize:
        backends().close()
