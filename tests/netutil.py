"""Loopback helpers for the fixtures that start real servers.

A free port picked here is only free *now*: another test run on the same
machine may pick it too, and whichever server binds second fails while its
client's probe is answered by the first one, so the client talks to the other
run's server (a checksum mismatch in the payloads bench was that). So servers
start through ``start_owned``: a server counts as up only when the process we
started (or its process group) holds the listening socket; if it lost the port,
it is started again on another one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str, ok: Iterable[int]) -> tuple[bool, object]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status in ok, resp.status
    except urllib.error.HTTPError as exc:
        return exc.code in ok, exc
    except OSError as exc:
        return False, exc


def wait_http(url: str, timeout: float = 30, ok=(200, 401)) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        up, last = _answers(url, ok)
        if up:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout}s: {last}")


def _listening_inodes(port: int) -> Optional[set[str]]:
    """The socket inodes listening on ``port`` (any address), or None where /proc has no net tables."""
    found: set[str] = set()
    tables = [p for p in ("/proc/net/tcp", "/proc/net/tcp6") if os.path.exists(p)]
    if not tables:
        return None
    for table in tables:
        with open(table) as fh:
            next(fh, None)
            for line in fh:
                cols = line.split()
                # local_address is HEX_IP:HEX_PORT; state 0A is LISTEN; column 9 is the inode.
                if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    found.add(cols[9])
    return found


def _group(pgid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getpgid(int(name)) == pgid:
                    pids.append(int(name))
            except OSError:
                pass
    return pids


def owns_port(proc: subprocess.Popen, port: int) -> Optional[bool]:
    """Whether ``proc`` (started with start_new_session, so its group is its own) listens on ``port``;
    None where this cannot be told (no /proc)."""
    inodes = _listening_inodes(port)
    if inodes is None:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    for pid in _group(proc.pid):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    return True
            except OSError:
                pass
    return False


def stop_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    import signal

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def start_owned(
    launch: Callable[[int], subprocess.Popen],
    probe: Optional[Callable[[int], str]],
    log: Path,
    *,
    what: str = "server",
    ok=(200,),
    timeout: float = 60,
    attempts: int = 5,
) -> tuple[subprocess.Popen, int]:
    """Start a server on a free port and wait until it answers ``probe(port)`` *and* holds the port
    (``probe`` None: holding it is enough, for a server the caller probes itself, e.g. over TLS).

    ``launch(port)`` starts it with ``start_new_session=True`` (its group is checked for the socket,
    and stopped as a whole). When the server exits early (the port was taken between picking and
    binding) or never holds the port, it is started again on another port, up to ``attempts`` times.
    """
    failures = []
    for _ in range(attempts):
        port = free_port()
        proc = launch(port)
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            up = probe is None or _answers(probe(port), ok)[0]
            if up and owns_port(proc, port) is not False:
                return proc, port
            time.sleep(0.2)
        stop_group(proc)
        failures.append(f"port {port}: " + ("exited with code %s" % proc.returncode if proc.returncode is not None else f"not holding it after {timeout:g}s"))
    tail = Path(log).read_text(errors="replace")[-2000:] if Path(log).exists() else ""
    raise RuntimeError(f"{what} did not come up on a port of its own ({'; '.join(failures)}); its log ({log}):\n{tail}")


def popen_logged(cmd: list[str], log: Path, env: Optional[dict] = None, **kwargs) -> subprocess.Popen:
    """``cmd`` in a process group of its own, appending its output to ``log`` (every attempt's)."""
    with open(log, "a") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env, **kwargs)
