"""The resident agent of a cluster: the cluster's main process, which runs each node as a forked child.

``python -m skyvm.agent --socket PATH --key-file PATH [--minutes M]`` listens on a Unix socket
(``multiprocessing.connection``: framed messages, HMAC challenge with the cluster's key) and
serves every launcher that connects: one long-lived channel per launcher and cluster, never a
process start per node. Why a fork server (as multiprocessing's "forkserver"): the parent
imports the node runtime (and Prefect's task engine when the image has it) once and never runs
user code, so each node is a fresh child of a pristine, warm interpreter, started in a
millisecond or two, with no state left over from the node before.

While the cluster is idle it also keeps spares (``skyvm.spares``): children forked ahead, each with the
pages nodes write already copied, that wait for a node each.

Each child: its own session and process group (cancel kills the whole group), the node's
environment, stdout and stderr into a pipe the parent forwards to whoever follows the attempt;
it runs ``skyvm.node``'s attempt as ``python -m skyvm.node run --detached`` would (the log, exit
code and pid files are the same, so ``skyvm.node status|log|cancel`` through an exec find it
from any process). The parent is single-threaded (a selector loop), so forking is always safe;
it also keeps the cluster's autostop, as ``skyvm.node idle-watch`` does for clusters without it.

Messages, launcher -> agent: ``("run", {attempt, payload, payload_url, result_url, env})``,
``("cancel", attempt, grace_s)``, ``("ping",)``; agent -> launcher: ``("started", attempt, pid)``,
``("log", attempt, bytes)``, ``("exit", attempt, code)``, ``("pong",)``. Only plain types travel.

May import: the standard library and skyvm.node (the node image has nothing else of the launcher's).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import importlib.util
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Optional

from skyvm import node as runtime
from skyvm import spares
from skyvm.limits import memory_limit

# Modules a warm node should not pay for, imported by the pristine parent when the image has them.
PRELOAD_WHEN = {"prefect": ("prefect_skyvm.on_node",)}
# A launcher that stops reading for this long loses its channel, not the agent's other launchers. Long: a
# launcher on a loaded machine may not read for seconds, and a dropped channel ends its running nodes.
SEND_TIMEOUT_S = 120
EXIT_SIGNALLED = 128  # + the signal's number, as a shell reports a child killed by a signal
# Nodes that record the pages they wrote, for the spares to fault in (``spares``): the first ones, then now and then.
LEARN_FIRST, LEARN_EVERY = 2, 100


@dataclass
class Child:
    attempt: str
    pid: int
    pipe: int  # the read end of the child's stdout and stderr
    followers: list = field(default_factory=list)  # connections that started it
    pidfd: Optional[int] = None
    code: Optional[int] = None  # set once reaped
    kill_at: Optional[float] = None  # SIGKILL to the group after a cancel's grace


@dataclass
class Job:
    """What a forked child runs: returned from the loop in the child alone."""

    attempt: str
    payload: Optional[bytes]
    payload_url: str
    result_url: str
    env: dict
    learn: bool = False  # record the pages it wrote at its end (spares.record_written_pages)


def _job(req: dict, learn: bool) -> Job:
    return Job(req["attempt"], req.get("payload"), req["payload_url"], req["result_url"], req.get("env") or {}, learn)


def pages_file():
    return runtime.STATE_DIR / "agent-written-pages"


# The modules preload() imported: each child tells them its environment (``agent_child_env()``), since
# what they read from the parent's environment at import (Prefect's settings) is not the node's.
PRELOADED: list = []


def preload() -> None:
    for probe, modules in PRELOAD_WHEN.items():
        if importlib.util.find_spec(probe) is None:
            continue
        for name in modules:
            try:
                module = importlib.import_module(name)
                # What every node would otherwise redo once it runs (Prefect's logging setup, its models'
                # rebuild), done once here: a module says so with an ``agent_preload()``.
                warm = getattr(module, "agent_preload", None)
                if warm is not None:
                    warm()
                PRELOADED.append(module)
            except Exception as exc:  # noqa: BLE001 - a node imports it again and reports its own error
                print(f"skyvm.agent: preloading {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


class Agent:
    def __init__(self, sock_path: str, key: bytes, minutes: Optional[float]):
        self.sock_path = sock_path
        self.key = key
        self.minutes = minutes
        self.poll_s = float(os.environ.get("SKYVM_IDLE_POLL_S", "5"))
        self.sel = selectors.DefaultSelector()
        self.children: dict[str, Child] = {}
        self.spares: list[spares.Spare] = []
        self.spares_max = spares.count()
        self._pages_seen: Optional[int] = -1  # the learnt pages' mtime spares_max was counted for
        self._memory_limit = memory_limit()
        self.last_busy = time.monotonic()
        self.nodes = 0
        self.conns: set = set()
        self.stopping = False
        try:
            os.unlink(sock_path)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is its owner's alone, before anyone can connect
        try:
            self.listener.bind(sock_path)
        finally:
            os.umask(old)
        # The launcher may be another user than the container's (a rootless host user): the socket is the
        # directory's owner's, who made it and its key.
        st = os.stat(os.path.dirname(sock_path) or ".")
        try:
            os.chown(sock_path, st.st_uid, st.st_gid)
        except PermissionError:
            pass
        self.listener.listen(64)
        self.sel.register(self.listener, selectors.EVENT_READ, ("accept", None))

    # -- the loop ------------------------------------------------------------------

    def loop(self) -> Optional[Job]:
        """Serve until idle long enough (None) or, in a forked child, return the child's job.

        No try/finally here: the child returns through these frames, and must not run the parent's cleanup.
        """
        last_check = time.monotonic()
        while not self.stopping:
            job = self.step(self._timeout())
            if job is None and self._spare_due():
                job = self._fork_spare()
            if job is not None:
                return job
            if time.monotonic() - last_check >= self.poll_s:
                last_check = time.monotonic()
                if self._idle_long_enough():
                    return None
        return None

    def step(self, timeout: float) -> Optional[Job]:
        """One round: what is ready within ``timeout`` seconds, the children that ended, the kills due."""
        for key, _events in self.sel.select(timeout=timeout):
            kind, obj = key.data
            if kind == "accept":
                self._accept()
            elif kind == "conn":
                job = self._message(obj)
                if job is not None:
                    return job
            elif kind == "pipe":
                self._pipe(obj)
            elif kind == "pidfd":
                self._reap(obj)
            elif kind == "spare":  # a spare ended before it had a node (killed from outside)
                self.spares.remove(obj)
                self._retire(obj)
                self.last_busy = time.monotonic()  # made again once idle again, never in a tight loop
        self._reap_all()
        self._kill_late()
        return None

    def _timeout(self) -> float:
        timeout = self.poll_s
        for child in self.children.values():
            if child.kill_at is not None:
                timeout = min(timeout, max(0.0, child.kill_at - time.monotonic()))
            if child.pidfd is None:
                timeout = min(timeout, 0.05)  # no pidfd on this kernel: poll for the child's end
        if len(self.spares) < self.spares_max and not self.children:
            timeout = min(timeout, max(0.0, self.last_busy + spares.IDLE_S - time.monotonic()))
        return timeout

    def _idle_long_enough(self) -> bool:
        if self.minutes is None or self.minutes < 0:
            return False
        if self.children or runtime._busy():
            runtime._touch_activity()
            return False
        idle = time.time() - runtime.ACTIVITY.stat().st_mtime
        if idle < self.minutes * 60:
            return False
        print(f"skyvm.agent: idle for {idle:.0f}s, autostop after {self.minutes} min", flush=True)
        return True

    # -- channels ------------------------------------------------------------------

    def _accept(self) -> None:
        sock, _ = self.listener.accept()
        # The handshake and every later send or read are bounded. Not settimeout(): it would make the fd
        # non-blocking, and Connection reads it with plain os.read.
        bound = struct.pack("ll", SEND_TIMEOUT_S, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, bound)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, bound)
        conn = Connection(sock.detach())
        try:
            deliver_challenge(conn, self.key)
            answer_challenge(conn, self.key)
        except Exception as exc:  # noqa: BLE001 - a wrong key or a dropped peer: refuse it, serve the rest
            print(f"skyvm.agent: refused a connection: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            conn.close()
            return
        self.conns.add(conn)
        self.sel.register(conn.fileno(), selectors.EVENT_READ, ("conn", conn))

    def _drop(self, conn) -> None:
        if conn in self.conns:
            self.conns.discard(conn)
            self.sel.unregister(conn.fileno())
            conn.close()
        for child in self.children.values():
            if conn in child.followers:
                child.followers.remove(conn)

    def _send(self, conn, msg: tuple) -> None:
        try:
            conn.send(msg)
        except (OSError, EOFError, ValueError) as exc:
            print(f"skyvm.agent: dropped a launcher's channel ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
            self._drop(conn)

    def _message(self, conn) -> Optional[Job]:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            self._drop(conn)
            return None
        op = msg[0]
        if op == "run":
            return self._fork(conn, msg[1])
        if op == "cancel":
            self._cancel(msg[1], float(msg[2]))
        elif op == "ping":
            self._send(conn, ("pong",))
        return None

    # -- children ------------------------------------------------------------------

    def _fork(self, conn, req: dict) -> Optional[Job]:
        """Start the node ``req`` asks for: in a spare when one is ready, else in a child forked for it."""
        attempt = req["attempt"]
        runtime._touch_activity()
        self.last_busy = time.monotonic()
        self.nodes += 1
        learn = self.spares_max > 0 and (self.nodes <= LEARN_FIRST or self.nodes % LEARN_EVERY == 0)
        blob = spares.job_blob(req, learn)
        while self.spares and blob is not None:
            spare = self.spares.pop()
            if spare.pidfd is not None:
                self.sel.unregister(spare.pidfd)  # registered again below, as the node's
            if spares.hand_over(spare, blob):
                return self._started(conn, attempt, spare.pid, spare.pipe, spare.pidfd)
            self._retire(spare)  # gone: the next one, or a fork
        read, write = os.pipe()
        pid, held = self._fork_held()
        if pid == 0:
            os.close(read)
            self._become_child(write, held)
            return _job(req, learn)
        os.close(write)
        return self._started(conn, attempt, pid, read, _pidfd(pid))

    def _fork_held(self) -> tuple[int, object]:
        sys.stdout.flush()  # nothing buffered here may be written twice, once by the child
        sys.stderr.flush()
        # A cancel may follow the run at once (a node cancelled while it launched): until the child has
        # let go of the parent's SIGTERM handler, a SIGTERM it got would only set the child's copy of
        # `stopping`. Held back across the fork, it reaches the child once the default action is back.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        return pid, held

    def _started(self, conn, attempt: str, pid: int, pipe: int, pidfd: Optional[int]) -> None:
        os.set_blocking(pipe, False)
        child = Child(attempt, pid, pipe, [conn], pidfd)
        if pidfd is not None:
            self.sel.register(pidfd, selectors.EVENT_READ, ("pidfd", child))
        self.children[attempt] = child
        self.sel.register(pipe, selectors.EVENT_READ, ("pipe", child))
        self._send(conn, ("started", attempt, pid))
        return None

    # -- spares (skyvm.spares) ---------------------------------------------------------

    def _spare_due(self) -> bool:
        if self.children or self.stopping or time.monotonic() - self.last_busy < spares.IDLE_S:
            return False  # the cheap checks first: this runs after every step of the loop
        self._count_spares()
        return len(self.spares) < self.spares_max

    def _count_spares(self) -> None:
        """Spares hold what nodes were seen to write: how many fit the cluster's memory is counted again
        when a node has recorded more."""
        try:
            seen: Optional[int] = pages_file().stat().st_mtime_ns
        except OSError:
            seen = None
        if seen != self._pages_seen:
            self._pages_seen = seen
            self.spares_max = spares.wanted(pages_file(), self._memory_limit)

    def _fork_spare(self) -> Optional[Job]:
        """A child that waits for its node; in the child, its job once it comes."""
        job_read, job_write = os.pipe()
        read, write = os.pipe()
        pid, held = self._fork_held()
        if pid == 0:
            os.close(read)
            os.close(job_write)
            self._become_child(write, held)
            got = spares.wait_for_job(job_read, pages_file())
            if got is None:
                os._exit(0)  # retired: the agent stopped, or went away
            return _job(*got)
        os.close(write)
        os.close(job_read)
        spare = spares.Spare(pid, job_write, read, _pidfd(pid))
        if spare.pidfd is not None:
            self.sel.register(spare.pidfd, selectors.EVENT_READ, ("spare", spare))
        self.spares.append(spare)
        return None

    def _retire(self, spare: "spares.Spare") -> None:
        """End a spare that has no job (the agent stops, or it died): its pipes closed, its group killed, reaped."""
        if spare.pidfd is not None and spare.pidfd in self.sel.get_map():
            self.sel.unregister(spare.pidfd)
        spares.close(spare)
        runtime.signal_group(spare.pid, signal.SIGKILL)
        try:
            os.waitpid(spare.pid, 0)
        except ChildProcessError:
            pass

    def _become_child(self, write: int, held) -> None:
        """In the forked child: its own session and process group, the parent's fds closed, output to the pipe."""
        os.setsid()
        self.sel.close()
        self.listener.close()
        for conn in self.conns:
            conn.close()
        for child in self.children.values():
            for fd in (child.pipe, child.pidfd):
                if fd is not None:
                    os.close(fd)
        for spare in self.spares:
            for fd in spare.fds():
                os.close(fd)
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.close(write)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def _pipe(self, child: Child) -> None:
        if child.pipe < 0:
            return  # closed already by its reap, earlier in the same select() batch
        try:
            data = os.read(child.pipe, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            for conn in list(child.followers):
                self._send(conn, ("log", child.attempt, data))
            return
        self.sel.unregister(child.pipe)
        os.close(child.pipe)
        child.pipe = -1
        self._finish_if_done(child)

    def _reap(self, child: Child) -> None:
        if child.code is not None:
            return  # reaped already, earlier in the same select() batch
        try:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = child.pid, 0
        if pid == 0:
            return
        child.code = os.waitstatus_to_exitcode(status)
        if child.code < 0:
            child.code = EXIT_SIGNALLED - child.code
        if child.pidfd is not None:
            self.sel.unregister(child.pidfd)
            os.close(child.pidfd)
            child.pidfd = None
        # The node is over: what it left running in its group goes with it (a node is one process group).
        # Its group alone: the pid itself is free now, and may be another process's soon.
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._drain(child)
        self._finish_if_done(child)

    def _drain(self, child: Child) -> None:
        """Forward what the child wrote before it ended; close the pipe (a leftover writer is dead now)."""
        if child.pipe < 0:
            return
        while True:
            try:
                data = os.read(child.pipe, 65536)
            except (BlockingIOError, OSError):
                break
            if not data:
                break
            for conn in list(child.followers):
                self._send(conn, ("log", child.attempt, data))
        self.sel.unregister(child.pipe)
        os.close(child.pipe)
        child.pipe = -1

    def _reap_all(self) -> None:
        for child in list(self.children.values()):
            if child.code is None and child.pidfd is None:
                self._reap(child)

    def _finish_if_done(self, child: Child) -> None:
        if child.code is None or child.pipe >= 0:
            return
        rc_file = runtime.STATE_DIR / f"{child.attempt}.rc"
        if not rc_file.exists():
            # Killed before it could say (OOM, SIGKILL): another process's status() must still see the end.
            rc_file.write_text(str(child.code))
        runtime._pidfile(child.attempt).unlink(missing_ok=True)
        self.children.pop(child.attempt, None)
        runtime._touch_activity()
        self.last_busy = time.monotonic()
        for conn in list(child.followers):
            self._send(conn, ("exit", child.attempt, child.code))

    def _cancel(self, attempt: str, grace_s: float) -> None:
        child = self.children.get(attempt)
        if child is None or child.code is not None:
            return
        # The SIGKILL after the grace is due whatever the SIGTERM did: a node may ignore or outlive it.
        child.kill_at = time.monotonic() + grace_s
        runtime.signal_group(child.pid, signal.SIGTERM)

    def _kill_late(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if child.kill_at is not None and child.code is None and now >= child.kill_at:
                child.kill_at = None
                runtime.signal_group(child.pid, signal.SIGKILL)

    def close(self) -> None:
        while self.spares:
            self._retire(self.spares.pop())
        for child in list(self.children.values()):
            if child.code is None:  # not reaped: its pid is still its own
                runtime.signal_group(child.pid, signal.SIGTERM)
        try:
            os.unlink(self.sock_path)
        except FileNotFoundError:
            pass


def run_child(job: Job) -> int:
    """The forked child: the node's attempt, with its environment, as ``skyvm.node run --detached``."""
    os.environ.update(job.env)
    # Says that this node's output reaches its launcher live, over the channel (a relayed record,
    # ``skyvm.node.RELAY_MARK``, is read while the node runs, not after).
    os.environ["SKYVM_AGENT_CHILD"] = "1"
    for module in PRELOADED:
        settle = getattr(module, "agent_child_env", None)
        if settle is not None:
            settle()
    args = argparse.Namespace(payload=job.payload_url, result=job.result_url, attempt=job.attempt, detached=True, payload_bytes=job.payload)
    return runtime.cmd_run(args)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skyvm.agent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="the Unix socket to listen on")
    parser.add_argument("--key-file", required=True, help="the cluster's key: launchers prove they hold it")
    parser.add_argument("--minutes", type=float, default=None, help="autostop: exit after this many idle minutes")
    args = parser.parse_args(argv)
    with open(args.key_file, "rb") as fh:
        key = fh.read().strip()
    agent = Agent(args.socket, key, args.minutes)
    signal.signal(signal.SIGTERM, lambda *_: setattr(agent, "stopping", True))
    runtime._touch_activity()
    preload()
    print(f"skyvm.agent: serving {args.socket} (python {sys.version.split()[0]})", flush=True)
    # What the parent imported stays put: the collector never touches (and so never copies) those pages in a child.
    gc.freeze()
    try:
        job = agent.loop()
    except BaseException:
        # The agent's own failure: kept beside its socket (the container and its log go with the agent).
        with open(os.path.join(os.path.dirname(args.socket), "agent-failure.log"), "a") as fh:
            traceback.print_exc(file=fh)
        raise
    if job is not None:
        return _exit_child(run_child(job), job.learn)  # the forked child: its exit code is the node's
    agent.close()
    return 0


def _pidfd(pid: int) -> Optional[int]:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None  # an old kernel: _reap_all polls


def _exit_child(code: int, learn: bool = False) -> int:
    """End a forked child as an interpreter's exit would (exit handlers: Prefect drains its log and event
    workers in them), without tearing down every module the parent imported, which costs more than the node."""
    try:
        threading._shutdown()  # as at an interpreter's exit: non-daemon threads (an executor's) finish first
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        if learn:
            try:
                spares.record_written_pages(pages_file())
            except Exception:  # noqa: BLE001 - spares fault in less; the node's exit code stands
                pass
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
