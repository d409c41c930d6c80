"""The check a credential set's bridge server makes before each call: is the SkyPilot API server on
the set's port the one started for the set (see ``credentials``)?

Holds ``LocalServerGuard`` and ``local_server_guard()`` (the guard of this process's set, from its
environment). Runs in SkyPilot's environment, which has psutil (a SkyPilot dependency).

May import: the standard library, psutil, ``skyvm.errors``, ``skyvm.connectors.files`` and
``skyvm.skypilot.credentials`` (its environment names).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional

from skyvm.errors import InfrastructureError

log = logging.getLogger("skyvm.skypilot")


class LocalServerGuard:
    """Before a call: is whatever listens on this credential set's port the SkyPilot API server
    started for the set? (SkyPilot starts it from this process, so it carries SET_ENV as we do.)

    Nothing listening is fine (SkyPilot starts ours). Anything else, a foreign program or another
    set's server, would take our calls with the wrong account: an error naming the port. The set's
    server left by a process that was killed (its credential files are gone, or soon) is stopped,
    and SkyPilot starts a fresh one. Runs in SkyPilot's environment, which has psutil (a SkyPilot
    dependency).
    """

    def __init__(self, port: int, ident: str):
        self.port, self.ident = port, ident
        self._known: Optional[tuple[int, float]] = None  # (pid, create time) of the server seen to be ours

    def _listening(self) -> bool:
        import socket

        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def _still_ours(self, psutil) -> bool:
        if self._known is None:
            return False
        pid, created = self._known
        try:
            proc = psutil.Process(pid)
            return proc.create_time() == created and any(
                c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port for c in proc.net_connections("tcp")
            )
        except (psutil.Error, OSError):
            return False

    def check(self) -> None:
        if not self._listening():
            return
        import psutil

        if self._still_ours(psutil):
            return
        from skyvm.skypilot.credentials import OWNER_ENV, SET_ENV

        holders = sorted({c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port}, key=lambda p: p or 0)
        said = []
        for pid in holders:
            if pid is None:
                said.append("a process of another user")
                continue
            try:
                proc = psutil.Process(pid)
                env = proc.environ()
                if env.get(SET_ENV) == self.ident:
                    if _owner_gone(env.get(OWNER_ENV), os.environ.get(OWNER_ENV)):
                        log.warning("the SkyPilot API server on port %s (pid %s) was left by a process that is gone: stopping it", self.port, pid)
                        _stop_tree(psutil, proc)
                        return  # SkyPilot starts the set's server afresh, with this bridge's files
                    self._known = (pid, proc.create_time())
                    return
                said.append(f"pid {pid} ({' '.join(proc.cmdline())[:200]})")
            except psutil.Error:
                said.append(f"pid {pid} (not readable by this user)")
        key = self.ident.rsplit(":", 1)[-1]
        raise InfrastructureError(
            f"port {self.port}, the local SkyPilot API server port of credential set {key}, is held by "
            f"{', '.join(said) or 'a process this user cannot see'}, not by the SkyPilot API server skyvm started for that set; "
            f"stop that process, or remove the set's entry ({key}) from $SKYVM_HOME/skypilot/ports.json so skyvm allocates another port"
        )


def _owner_gone(owner: Optional[str], mine: Optional[str]) -> bool:
    """Whether the engine process a server was started for (pid.start time) is gone."""
    from skyvm.connectors.files import process_alive

    if not owner or owner == mine:
        return False
    pid, _, started = owner.partition(".")
    return pid.isdigit() and not process_alive(int(pid), int(started or 0))


def _stop_tree(psutil, proc) -> None:
    """A server and the workers it started: terminated, killed when they do not go within 10 s."""
    procs = [proc, *proc.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _gone, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=10)


def local_server_guard() -> Optional[LocalServerGuard]:
    """The guard of this bridge's credential set, when it has one (its environment says so)."""
    from skyvm.skypilot.credentials import SET_ENV

    ident, port = os.environ.get(SET_ENV), os.environ.get("SKYPILOT_API_SERVER_LOCAL_PORT")
    if not ident or not port or os.environ.get("SKYPILOT_API_SERVER_ENDPOINT"):
        return None
    return LocalServerGuard(int(port), ident)
