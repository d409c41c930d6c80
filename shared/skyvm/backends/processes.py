"""The process backend: where no Docker engine is reachable, the node runtime runs as a plain host process.

The same contract as the Docker backend, without isolation or limits beyond what the OS gives
(it warns once). An attempt brings its own "cluster" (its process), and keeps its log and exit
code under the install's home, so another process finds it from its ``NodeRef``.

Holds: ``ProcessBackend``.
May import: skyvm.backends.base, skyvm.backends.containers (exit bookkeeping), skyvm.capacity,
skyvm.home, skyvm.plan, skyvm.watcher (never the pool or the API).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
from typing import Optional

from skyvm.backends.base import EXIT_CANCELLED, NONE, Backend, JobState, JobStatus, LogSink, NodeRef, state_of_exit
from skyvm.backends.containers import remember_exit
from skyvm.capacity import check_satisfiable
from skyvm.home import Home
from skyvm.plan import TaskSpec

log = logging.getLogger("skyvm.local")


class ProcessBackend(Backend):
    """No Docker engine: run the node runtime as a plain host process, with the same contract."""

    name = "local-process"
    needs_image = False
    poll_s = 0.5
    _warned = False

    def __init__(self):
        self._lock = threading.Lock()
        self._procs: dict[str, subprocess.Popen] = {}
        self._exits: dict[str, JobStatus] = {}
        if not ProcessBackend._warned:
            ProcessBackend._warned = True
            log.warning("no Docker engine reachable: the local backend runs nodes as plain processes (no container, no limits)")

    @property
    def state(self):
        return Home.current().node_state

    def check(self, spec: TaskSpec) -> None:
        check_satisfiable(spec)

    def cluster_kind(self, spec: TaskSpec) -> str:
        return NONE

    def start_cluster(self, spec: TaskSpec, name: str, *, on_log: Optional[LogSink] = None) -> None:
        """Nothing to start: every attempt is its own process."""

    def clusters(self, signature: Optional[str] = None, running: bool = False) -> list[dict]:
        return []

    def remove_cluster(self, name: str, *, shared: bool = False) -> None:
        """Nothing to remove: an attempt's process ends with it."""

    def run_attempt(self, spec: TaskSpec, cluster: Optional[str], *, fresh: bool = False, on_log: Optional[LogSink] = None, cancelled=None) -> NodeRef:
        env = {**os.environ, **spec.envs, **spec.secrets, "PYTHONUNBUFFERED": "1", "SKYVM_NODE_STATE": str(self.state)}
        cmd = shlex.split(spec.run) + ["--detached"]
        cmd[0] = sys.executable
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        with self._lock:
            self._procs[spec.attempt_id] = proc
        return NodeRef(backend=self.name, cluster=f"process-{proc.pid}", attempt_id=spec.attempt_id, node=spec.node, run_id=spec.run_id, fresh=True)

    def watch(self, ref: NodeRef, on_log: LogSink, on_exit) -> bool:
        from skyvm.context import watcher

        with self._lock:
            proc = self._procs.get(ref.attempt_id)
        if proc is None:
            return False
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)

        def ended() -> None:
            code = proc.wait()
            proc.stdout.close()
            # SIGTERM before the runtime's own handler was in place counts as the cancel it was.
            status = JobStatus(JobState.CANCELLED, EXIT_CANCELLED) if code == -15 else JobStatus(state_of_exit(code), code)
            with self._lock:
                remember_exit(self._exits, ref.attempt_id, status)
                self._procs.pop(ref.attempt_id, None)
            on_exit(status)

        watcher().add_stream(proc.stdout, lambda n: os.read(fd, n), on_log, ended, docker_frames=False)
        return True

    def status(self, ref: NodeRef) -> JobStatus:
        with self._lock:
            if ref.attempt_id in self._exits:
                return self._exits[ref.attempt_id]
            if ref.attempt_id in self._procs:
                return JobStatus(JobState.RUNNING)
        rc = self.state / f"{ref.attempt_id}.rc"
        if rc.is_file():
            code = int(rc.read_text())
            return JobStatus(state_of_exit(code), code)
        if (self.state / f"{ref.attempt_id}.pid").is_file():
            return JobStatus(JobState.RUNNING, None, "running (another process's)")
        return JobStatus(JobState.GONE, None, "no such attempt on this machine")

    def read_log(self, ref: NodeRef, offset: int = 0) -> tuple[str, int]:
        try:
            with open(self.state / f"{ref.attempt_id}.log", "rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except FileNotFoundError:
            return "", offset
        return data.decode(errors="replace"), offset + len(data)

    def cancel(self, ref: NodeRef) -> None:
        with self._lock:
            proc = self._procs.get(ref.attempt_id)
        if proc is None:
            self._cancel_by_runtime(ref)
            return
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)

    def _cancel_by_runtime(self, ref: NodeRef) -> None:
        """Another process's attempt: the node runtime's own cancel finds it by its pidfile."""
        env = {**os.environ, "SKYVM_NODE_STATE": str(self.state)}
        subprocess.run([sys.executable, "-m", "skyvm.node", "cancel", "--attempt", ref.attempt_id, "--grace", "10"], env=env, capture_output=True, timeout=60)
