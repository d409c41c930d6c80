"""One SSH connection per SkyPilot cluster: the way from the launcher to the cluster's agent.

``SSHLink`` opens the connection SkyPilot already set up for the cluster (the head's address,
user, port and private key from the cluster's handle, through the bridge's ``ssh_info``; into
the node's container through the head when SkyPilot runs one, as ``ssh <cluster>`` does) with
asyncssh, and forwards a local Unix socket of this process to the agent's socket on the
cluster: ``AgentChannel`` connects to it as to a local agent. No port is opened on the VM.
The same connection runs short commands in the container (a node's status, log and cancel for a
process that did not start it) and carries reverse forwards (the VM reaching a port of the
launcher's machine).

A dropped connection is noted (``down_since``) and opened again on the next use, until a bound:
past it, the cluster counts as out of reach. A wrong key or a host key that does not match is
``SSHRefused`` (never retried, never hidden by a fallback); no answer at all is ``SSHUnreachable``.

All asyncssh work runs on one event loop thread of the process; the methods here are blocking.

Holds: ``SSHLink``, ``SSHRefused``, ``SSHUnreachable``. May import: the standard library, asyncssh.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Optional

log = logging.getLogger("skyvm.skypilot.ssh")

CONNECT_TIMEOUT_S = 20.0
# A connection that stops answering (a VM gone without a FIN) is noticed after about this long.
KEEPALIVE_S = 15
KEEPALIVE_COUNT = 3

_loop: Optional[asyncio.AbstractEventLoop] = None
_loop_lock = threading.Lock()


class SSHUnreachable(Exception):
    """The cluster did not answer over SSH (no route, sshd down, a dropped connection not back yet)."""


class SSHRefused(Exception):
    """The cluster's sshd refused the key, or its host key is not the one SkyPilot recorded."""


def _event_loop() -> asyncio.AbstractEventLoop:
    """The process's one loop for SSH, on a daemon thread (started on first use)."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="skyvm-ssh", daemon=True).start()
            _loop = loop
        return _loop


def _call(coro, timeout: Optional[float]):
    return asyncio.run_coroutine_threadsafe(coro, _event_loop()).result(timeout)


class SSHLink:
    """The SSH connection to one cluster, with a local socket forwarded to ``remote_socket``."""

    def __init__(self, cluster: str, info: dict, forward_path: str, remote_socket: str, *, connect_timeout: float = CONNECT_TIMEOUT_S):
        self.cluster = cluster
        self.info = info
        self.forward_path = forward_path
        self.remote_socket = remote_socket
        self.connect_timeout = connect_timeout
        self.down_since: Optional[float] = None  # monotonic time the connection dropped (None: up, or never opened)
        self.last_error = ""
        self._conn = None
        self._hops: list = []  # connections this one tunnels through (the VM, when the node runs in its container)
        self._listener = None
        self._reverse: dict[tuple[str, int], int] = {}  # (local host, port) -> the VM's port that reaches it
        self._hold_wanted = False
        self._held = None  # the session with a terminal kept open while nodes run (see hold)
        self._closed = False
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        i = self.info
        inner = i.get("docker")
        return f"{i['user']}@{i['host']}:{i['port']}" + (f" (container: {inner['user']}@{inner['host']}:{inner['port']})" if inner else "")

    @property
    def up(self) -> bool:
        return self._conn is not None and self.down_since is None and not self._closed

    # -- connecting ------------------------------------------------------------------

    def open(self) -> None:
        """Connect and forward (again, after a drop). SSHRefused / SSHUnreachable name the cluster."""
        with self._lock:
            if self.up:
                return
            try:
                _call(self._open(), self.connect_timeout * 2 + 5)
            except SSHRefused:
                raise
            except Exception as exc:  # noqa: BLE001 - every way of not answering (OSError, timeouts, asyncssh's)
                self.last_error = f"{type(exc).__name__}: {exc}".strip()
                if self.down_since is None:
                    self.down_since = time.monotonic()
                raise SSHUnreachable(f"cluster {self.cluster} does not answer over SSH at {self.where}: {self.last_error}") from None

    def ensure_up(self, deadline: float, pause: float = 0.5) -> None:
        """Open the connection again until ``deadline`` (monotonic): SSHUnreachable past it."""
        while True:
            try:
                return self.open()
            except SSHUnreachable:
                if time.monotonic() + pause >= deadline:
                    raise
            time.sleep(pause)

    async def _open(self) -> None:
        import asyncssh

        await self._drop_connection()
        conn = await self._connect()
        try:
            try:
                os.unlink(self.forward_path)  # this process's own, left by a connection that dropped
            except FileNotFoundError:
                pass
            old = os.umask(0o177)  # the forwarded socket is this user's alone, as the agent's own is
            try:
                listener = await conn.forward_local_path(self.forward_path, self.remote_socket)
            finally:
                os.umask(old)
            for (host, port), remote in self._reverse.items():
                # The same port on the VM as before the drop: nodes already running keep their URLs.
                await conn.forward_remote_port("127.0.0.1", remote, host, port)
        except (OSError, asyncssh.Error):
            conn.close()
            raise
        self._conn, self._listener = conn, listener
        self.down_since = None
        asyncio.ensure_future(self._watch(conn))
        if self._hold_wanted:
            await self._hold(True)

    async def _connect(self):
        import asyncssh

        info = self.info
        try:
            key = asyncssh.import_private_key(info["private_key"])
        except (KeyError, asyncssh.KeyImportError) as exc:
            raise SSHRefused(f"cluster {self.cluster}: SkyPilot's private key for it cannot be read: {exc}") from None
        hops = [info] + ([info["docker"]] if info.get("docker") else [])
        tunnel, opened = None, []
        try:
            for hop in hops:
                options = dict(
                    username=hop["user"], client_keys=[key], known_hosts=self._known(hop), config=None, agent_path=None,
                    connect_timeout=self.connect_timeout, keepalive_interval=KEEPALIVE_S, keepalive_count_max=KEEPALIVE_COUNT,
                )
                if tunnel is None and info.get("proxy_command"):
                    options["proxy_command"] = info["proxy_command"]
                if tunnel is not None:
                    options["tunnel"] = tunnel
                try:
                    tunnel = await asyncssh.connect(hop["host"], int(hop["port"]), **options)
                except asyncssh.HostKeyNotVerifiable as exc:
                    raise SSHRefused(
                        f"cluster {self.cluster}: the host key of {hop['host']}:{hop['port']} is not the one SkyPilot recorded "
                        f"for it ({exc.reason}); refusing to connect (was the VM replaced, or is someone in between?)"
                    ) from None
                except asyncssh.PermissionDenied as exc:
                    raise SSHRefused(
                        f"cluster {self.cluster}: {hop['user']}@{hop['host']}:{hop['port']} refused SkyPilot's key for the cluster "
                        f"({exc.reason}); check `ssh {self.cluster}` works"
                    ) from None
                opened.append(tunnel)
        except BaseException:
            for conn in reversed(opened):
                conn.close()
            raise
        self._hops = opened[:-1]
        return opened[-1]

    @staticmethod
    def _known(hop: dict):
        """The host key SkyPilot recorded (checked), or none (SkyPilot itself does not check one)."""
        import asyncssh

        if not hop.get("host_key"):
            return None
        return ([asyncssh.import_public_key(hop["host_key"])], [], [])

    async def _watch(self, conn) -> None:
        await conn.wait_closed()
        if self._conn is conn and not self._closed:
            self.down_since = time.monotonic()
            self.last_error = "the SSH connection closed"
            log.warning("the SSH connection to cluster %s (%s) dropped", self.cluster, self.where)

    async def _hold(self, wanted: bool) -> None:
        self._hold_wanted = wanted
        if wanted and self._held is None and self._conn is not None:
            # `cat` on a terminal: it waits for input that never comes, and ends when the session closes.
            self._held = await self._conn.create_process("cat", term_type="dumb")
        elif not wanted and self._held is not None:
            held, self._held = self._held, None
            held.close()

    async def _drop_connection(self) -> None:
        conn, listener, hops = self._conn, self._listener, self._hops
        self._conn, self._listener, self._hops, self._held = None, None, [], None
        if listener is not None:
            listener.close()
        for c in ([conn] if conn is not None else []) + list(reversed(hops)):
            c.close()

    # -- using it ---------------------------------------------------------------------

    def run(self, command: str, timeout: float = 60.0) -> tuple[int, bytes, bytes]:
        """Run a short command where the node runs; (exit code, stdout, stderr). SSHUnreachable when down."""
        self.open()
        conn = self._conn
        try:
            result = _call(self._run(conn, command, timeout), timeout + 5)
        except Exception as exc:  # noqa: BLE001 - the connection dropped under the command
            raise SSHUnreachable(f"cluster {self.cluster}: `{command.split()[0]}` over SSH failed: {type(exc).__name__}: {exc}") from None
        code = result.exit_status if result.exit_status is not None else 255
        return code, result.stdout or b"", result.stderr or b""

    @staticmethod
    async def _run(conn, command: str, timeout: float):
        return await conn.run(command, check=False, encoding=None, timeout=timeout)

    def reverse_forward(self, local_host: str, local_port: int) -> int:
        """The VM's loopback port (chosen by its sshd once, kept across reconnects) that reaches
        ``local_host:local_port`` here."""
        self.open()
        with self._lock:
            if (local_host, local_port) not in self._reverse:
                self._reverse[(local_host, local_port)] = _call(self._forward_remote(local_host, local_port), self.connect_timeout)
            return self._reverse[(local_host, local_port)]

    async def _forward_remote(self, local_host: str, local_port: int) -> int:
        listener = await self._conn.forward_remote_port("127.0.0.1", 0, local_host, local_port)
        return listener.get_port()

    def hold(self, busy: bool) -> None:
        """Keep a session with a terminal open on the cluster while nodes run there (``busy``): SkyPilot's
        autostop counts no node the agent runs as a job, but its default (``wait_for: jobs_and_ssh``)
        counts an SSH session with a terminal as activity; closed again when the last node ends."""
        with self._lock:
            if self._hold_wanted == busy:
                return
            if not self.up:
                self._hold_wanted = busy  # taken up when the connection is opened again
                return
            _call(self._hold(busy), self.connect_timeout)

    def close(self) -> None:
        self._closed = True
        try:
            _call(self._drop_connection(), 10)
        except Exception as exc:  # noqa: BLE001 - closing a connection that is gone already
            log.debug("closing the SSH connection to %s: %s", self.cluster, exc)
        try:
            os.unlink(self.forward_path)
        except FileNotFoundError:
            pass
