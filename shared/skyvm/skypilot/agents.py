"""The agents of SkyPilot clusters: started by a cluster's setup (``agent_setup``), reached over its SSH connection.

Once the cluster is UP, a warm node goes over the cluster's one SSH connection (``ssh_channel.SSHLink``)
to its agent (``AgentChannel``: payload inline, log, exit, cancel), never as a SkyPilot job, and with
no bridge call once the connection is open. The node leaves its result on the cluster
(``agent_setup.REMOTE_RESULTS``), read back over the same connection: no payload store round trip
either way for a node whose payload goes inline. A node's log says
which path it takes; without SSH access, a key or an answering agent, it is ``sky exec`` as
before. A dropped connection is opened again and the node followed through its log and exit
files on the cluster; one that stays down past ``RECONNECT_ENV``'s bound ends the node GONE,
naming the cluster. Another process (an Airflow trigger) follows a node from its ``NodeRef``
the same way: the bridge's ``ssh_info`` and a connection of its own.

Holds: ``ClusterAgents``, ``VIA_AGENT``. May import: the standard library,
skyvm.backends.base, skyvm.backends.agent_channel, skyvm.errors, skyvm.payloads (unframe), skyvm.plan,
skyvm.skypilot.interface, .agent_setup and .ssh_channel.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import threading
import time
import urllib.parse
from typing import Callable, Optional

from skyvm.backends.agent_channel import KEY, AgentChannel, AgentGone, agent_dir
from skyvm.backends.base import JobState, JobStatus, LogSink, NodeRef, state_of_exit
from skyvm.errors import InfrastructureError, PayloadError
from skyvm.payloads import unframe
from skyvm.plan import TaskSpec
from skyvm.skypilot.agent_setup import NODE_CMD, REMOTE_SOCKET, agents_enabled, result_path
from skyvm.skypilot.interface import SkyBridge
from skyvm.skypilot.ssh_channel import SSHLink, SSHRefused, SSHUnreachable

log = logging.getLogger("skyvm.skypilot.agents")

# A NodeRef's extra["via"] for a node dispatched through its cluster's agent (it has no SkyPilot job).
VIA_AGENT = "agent"
# How long a dropped connection may stay down before its nodes are GONE (seconds).
RECONNECT_ENV = "SKYVM_SSH_RECONNECT_S"
RECONNECT_S = 120.0
# A warm cluster's agent listens already: not answering at once means it is not there.
AGENT_ANSWER_S = 5.0
CANCEL_GRACE_S = 10
RESUME_POLL_S = 0.5

# Variables whose URL, when it names this machine's loopback, a node on the VM reaches through a reverse
# forward over the cluster's SSH connection (engine-mode Prefect nodes reach a launcher's local API).
# More names: SKYVM_FORWARD_URL_ENVS (comma-separated).
FORWARDED_URL_ENVS = ("PREFECT_API_URL",)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Results read from clusters and not yet asked for (a poll found the node over): kept at most this many.
KEEP_RESULTS = 64


def reconnect_bound() -> float:
    return float(os.environ.get(RECONNECT_ENV) or RECONNECT_S)


def _loopback_urls(env: dict) -> list[tuple[str, urllib.parse.SplitResult]]:
    """(name, URL) of each variable of FORWARDED_URL_ENVS (and SKYVM_FORWARD_URL_ENVS) naming this machine's loopback."""
    names = FORWARDED_URL_ENVS + tuple(n.strip() for n in os.environ.get("SKYVM_FORWARD_URL_ENVS", "").split(",") if n.strip())
    found = [(name, urllib.parse.urlsplit(str(env.get(name) or ""))) for name in names]
    return [(name, parts) for name, parts in found if parts.hostname in LOOPBACK]


def needs_forward(spec: TaskSpec) -> bool:
    """Whether the node reaches something on the launcher's loopback (a local Prefect API): only through the
    cluster's SSH connection, so even its cluster's first node goes through the agent, not as a launch's job."""
    return bool(_loopback_urls({**spec.envs, **spec.secrets}))


class _Lines:
    """A log read back by offset, handed on line by line (the partial last line kept for the next read)."""

    def __init__(self, on_log: LogSink):
        self.on_log, self.rest = on_log, b""

    def feed(self, data: bytes, final: bool = False) -> None:
        *done, self.rest = (self.rest + data).split(b"\n")
        if final and self.rest:
            done.append(self.rest)
            self.rest = b""
        for line in done:
            self.on_log(line.decode(errors="replace"))


class ClusterAgents:
    """Per cluster: this process's SSH connection and its channel to the agent; per node: its channel."""

    def __init__(self, bridge: Callable[[], SkyBridge]):
        self._bridge = bridge
        self._lock = threading.Lock()
        self._links: dict[str, SSHLink] = {}
        self._channels: dict[str, AgentChannel] = {}
        self._cluster_locks: dict[str, threading.Lock] = {}
        self._runs: dict[str, AgentChannel] = {}  # attempt -> its channel, until it ends
        self._busy: dict[str, set[str]] = {}  # cluster -> the attempts this process runs there
        self._exits: dict[str, JobStatus] = {}
        self._results: dict[str, bytes] = {}  # attempt -> its result, read from the cluster ahead of being asked

    # -- connections ------------------------------------------------------------------

    def _cluster_lock(self, cluster: str) -> threading.Lock:
        with self._lock:
            return self._cluster_locks.setdefault(cluster, threading.Lock())

    def link(self, cluster: str) -> Optional[SSHLink]:
        """This process's SSH connection to the cluster, opened once (None: SkyPilot gives no SSH access)."""
        with self._cluster_lock(cluster):
            with self._lock:
                link = self._links.get(cluster)
            if link is None:
                ask = getattr(self._bridge(), "ssh_info", None)  # a bridge of before the call (a test's own) has none
                try:
                    info = ask(cluster) if ask is not None else None
                except InfrastructureError as exc:
                    raise SSHUnreachable(f"cluster {cluster}: SkyPilot gave no SSH access to it: {exc}") from None
                if not info:
                    return None
                forward = str(agent_dir(cluster) / f"fwd-{os.getpid()}.sock")
                agent_dir(cluster).mkdir(parents=True, exist_ok=True, mode=0o700)
                link = SSHLink(cluster, info, forward, REMOTE_SOCKET)
                with self._lock:
                    self._links[cluster] = link
            link.open()
            return link

    def _channel(self, cluster: str, key: bytes) -> tuple[Optional[AgentChannel], str]:
        """The channel to the cluster's agent, or None and why not (the node then goes as ``sky exec``)."""
        with self._lock:
            channel = self._channels.get(cluster)
        if channel is not None and channel.alive:
            return channel, ""
        try:
            link = self.link(cluster)
        except SSHUnreachable as exc:
            return None, str(exc)
        if link is None:
            return None, "SkyPilot gives no SSH access to it"
        with self._cluster_lock(cluster):
            with self._lock:
                channel = self._channels.get(cluster)
            if channel is not None and channel.alive:
                return channel, ""
            try:
                channel = AgentChannel(cluster, link.forward_path, key, connect_timeout=AGENT_ANSWER_S, alive=lambda: link.up)
            except AgentGone as exc:
                return None, str(exc)
            with self._lock:
                self._channels[cluster] = channel
            return channel, ""

    # -- dispatch -------------------------------------------------------------------

    def dispatch(self, spec: TaskSpec, cluster: str, on_log: Optional[LogSink]) -> Optional[NodeRef]:
        """Start the attempt through the cluster's agent over SSH; None when it must go as ``sky exec``
        (the node's log says why). A refused key or host key is an InfrastructureError naming the cluster."""
        say = on_log or (lambda _line: None)
        why = self._why_not(spec, cluster)
        channel = None
        if not why:
            try:
                channel, why = self._channel(cluster, (agent_dir(cluster) / KEY).read_bytes().strip())
            except SSHRefused as exc:
                raise InfrastructureError(f"node {spec.node!r}: {exc}") from None
        if channel is not None:
            try:
                env = self._forwarded(cluster, {**spec.envs, **spec.secrets}, say)
                # The result stays on the cluster, read back over this connection (result()): not the store.
                channel.run(spec.attempt_id, spec.payload, spec.payload_url, f"file://{result_path(spec.attempt_id)}", env)
            except (AgentGone, SSHUnreachable) as exc:
                channel, why = None, str(exc)
        if channel is None:
            say(f"skyvm: {spec.node} runs on cluster {cluster} as a SkyPilot job (sky exec): {why}")
            log.info("node %s: sky exec on %s: %s", spec.node, cluster, why)
            return None
        with self._lock:
            self._runs[spec.attempt_id] = channel
            link = self._links[cluster]
        self._mark(cluster, spec.attempt_id, True)
        say(f"skyvm: {spec.node} runs on cluster {cluster} through its agent over SSH ({link.where})")
        return NodeRef(backend="skypilot", cluster=cluster, attempt_id=spec.attempt_id, node=spec.node, run_id=spec.run_id, extra={"via": VIA_AGENT})

    def _forwarded(self, cluster: str, env: dict, say: LogSink) -> dict:
        """The node's environment with each loopback URL of FORWARDED_URL_ENVS turned into the VM's end
        of a reverse forward to it (the value's other parts kept: path, scheme, credentials)."""
        out = dict(env)
        for name, parts in _loopback_urls(env):
            port = parts.port or (443 if parts.scheme == "https" else 80)
            with self._lock:
                link = self._links[cluster]
            try:
                remote = link.reverse_forward(parts.hostname, port)
            except SSHUnreachable:
                raise
            except Exception as exc:  # noqa: BLE001 - the VM's sshd allows no forwarding: the node gets the URL as it is
                say(f"skyvm: {name} cannot be forwarded to the VM over SSH ({type(exc).__name__}: {exc}); the node gets it unchanged")
                continue
            auth = parts.netloc.rpartition("@")[0]
            out[name] = urllib.parse.urlunsplit(parts._replace(netloc=f"{auth + '@' if auth else ''}127.0.0.1:{remote}"))
            say(f"skyvm: {name} on the node is the VM's 127.0.0.1:{remote}, forwarded over SSH to this machine's {parts.hostname}:{port}")
        return out

    @staticmethod
    def _why_not(spec: TaskSpec, cluster: str) -> str:
        if not agents_enabled():
            return "agents are off (SKYVM_AGENT=0)"
        if spec.resources.get("image_id") is not None:
            return "a VM image (image_id) runs the node's container itself: no agent in it"
        if not (agent_dir(cluster) / KEY).is_file():
            return "this host holds no key for its agent (launched by another skyvm install, or without one)"
        return ""

    # -- following ------------------------------------------------------------------

    def watch(self, ref: NodeRef, on_log: LogSink, on_exit: Callable[[JobStatus], None]) -> bool:
        with self._lock:
            channel = self._runs.get(ref.attempt_id)
        if channel is None:
            return False
        seen = [0]  # bytes of the node's log handed on: where a resumed follow reads on from

        def line(text: str) -> None:
            seen[0] += len(text.encode()) + 1
            on_log(text)

        def ended(status: JobStatus) -> None:
            if status.state is JobState.GONE:
                # The channel dropped, not the node: follow it on over a new connection, up to the bound.
                threading.Thread(target=self._resume, args=(ref, seen[0], on_log, on_exit, status.detail), daemon=True, name=f"skyvm-resume-{ref.node}").start()
                return
            self._ended(ref.attempt_id, status)
            on_exit(status)

        return channel.follow(ref.attempt_id, line, ended)

    def _mark(self, cluster: str, attempt: str, running: bool) -> None:
        """Count the cluster's running nodes; its link holds a session open while any runs (SSHLink.hold)."""
        with self._lock:
            attempts = self._busy.setdefault(cluster, set())
            before = bool(attempts)
            (attempts.add if running else attempts.discard)(attempt)
            now, link = bool(attempts), self._links.get(cluster)
        if link is not None and before != now:
            try:
                link.hold(now)
            except Exception as exc:  # noqa: BLE001 - the node runs on; only autostop's view of it is at stake
                log.warning("cluster %s: could not %s its busy session: %s", cluster, "open" if now else "close", exc)

    def _ended(self, attempt: str, status: JobStatus) -> None:
        with self._lock:
            clusters = [c for c, attempts in self._busy.items() if attempt in attempts]
        for cluster in clusters:
            self._mark(cluster, attempt, False)
        with self._lock:
            self._runs.pop(attempt, None)
            self._exits[attempt] = status
            while len(self._exits) > 4096:
                self._exits.pop(next(iter(self._exits)))

    def _resume(self, ref: NodeRef, offset: int, on_log: LogSink, on_exit: Callable[[JobStatus], None], why: str) -> None:
        log.warning("node %s: %s; following it over a new SSH connection", ref.node, why)
        lines = _Lines(on_log)
        deadline = time.monotonic() + reconnect_bound()
        while True:
            try:
                status = self.remote_status(ref)
                text = self._remote_log(ref, offset)
            except SSHUnreachable as exc:
                if time.monotonic() >= deadline:
                    status = JobStatus(JobState.GONE, None, f"cluster {ref.cluster} stayed out of reach over SSH for {reconnect_bound():g}s ({why}; {exc})")
                    break
                time.sleep(RESUME_POLL_S)
                continue
            offset += len(text)
            lines.feed(text)
            if status.state.finished:
                break
            if status.state is JobState.PENDING and status.detail == "not started" and time.monotonic() >= deadline:
                status = JobStatus(JobState.GONE, None, f"cluster {ref.cluster}: its agent never started node {ref.node!r} ({why})")
                break
            time.sleep(RESUME_POLL_S)
        lines.feed(b"", final=True)
        self._ended(ref.attempt_id, status)
        on_exit(status)

    def let_go(self, ref: NodeRef) -> None:
        self._mark(ref.cluster, ref.attempt_id, False)  # whoever follows it now keeps no session for it
        with self._lock:
            channel = self._runs.pop(ref.attempt_id, None)
        if channel is not None:
            channel.drop(ref.attempt_id)

    def status(self, ref: NodeRef) -> JobStatus:
        with self._lock:
            known = self._exits.get(ref.attempt_id)
            channel = self._runs.get(ref.attempt_id)
        if known is not None:
            return known
        if channel is not None and channel.alive:
            mine = channel.status(ref.attempt_id)
            if mine is not None:
                return mine
        try:
            status = self.remote_status(ref)
        except SSHUnreachable as exc:
            link = self._links.get(ref.cluster)
            if link is not None and link.down_since is not None and time.monotonic() - link.down_since > reconnect_bound():
                return JobStatus(JobState.GONE, None, f"cluster {ref.cluster} out of reach over SSH for over {reconnect_bound():g}s: {exc}")
            raise InfrastructureError(f"node {ref.node!r}: {exc}") from None
        if status.exit_code is not None:
            self._keep_result(ref)
        return status

    def _keep_result(self, ref: NodeRef) -> None:
        """Read an ended attempt's result now: whoever asked may release the cluster next (a node found
        again, with down: true), and the result would go with it."""
        with self._lock:
            if ref.attempt_id in self._results:
                return
        try:
            blob = self._read_result(ref)
        except (PayloadError, SSHUnreachable) as exc:
            log.debug("node %s: no result on %s: %s", ref.node, ref.cluster, exc)
            return
        with self._lock:
            self._results[ref.attempt_id] = blob
            while len(self._results) > KEEP_RESULTS:
                self._results.pop(next(iter(self._results)))

    def result(self, ref: NodeRef) -> bytes:
        """The attempt's result, as its node left it on the cluster (PayloadError when it left none)."""
        with self._lock:
            blob = self._results.pop(ref.attempt_id, None)
        if blob is None:
            try:
                blob = self._read_result(ref)
            except SSHUnreachable as exc:
                raise InfrastructureError(f"node {ref.node!r}: its result cannot be read from cluster {ref.cluster}: {exc}") from None
        return unframe(blob, f"the result of node {ref.node!r} on cluster {ref.cluster}")

    def _read_result(self, ref: NodeRef) -> bytes:
        link = self.link(ref.cluster)
        if link is None:
            raise SSHUnreachable(f"cluster {ref.cluster}: SkyPilot no longer gives SSH access to it")
        path = result_path(ref.attempt_id)
        code, out, err = link.run(f"cat {shlex.quote(path)}")
        if code != 0:
            raise PayloadError(f"node {ref.node!r} left no result at {path} on cluster {ref.cluster}: {err.decode(errors='replace').strip()[-300:]}")
        return out

    def _remote(self, ref: NodeRef, args: str) -> bytes:
        link = self.link(ref.cluster)
        if link is None:
            raise SSHUnreachable(f"cluster {ref.cluster}: SkyPilot no longer gives SSH access to it")
        code, out, err = link.run(f"{NODE_CMD} {args} --attempt {shlex.quote(ref.attempt_id)}")
        if code != 0:
            raise InfrastructureError(f"node {ref.node!r}: `skyvm.node {args.split()[0]}` on cluster {ref.cluster} failed (exit {code}): {err.decode(errors='replace')[-500:]}")
        return out

    def remote_status(self, ref: NodeRef) -> JobStatus:
        """The attempt's state from its files on the cluster (any process, over its own connection)."""
        state = json.loads(self._remote(ref, "status"))
        if state["rc"] is not None:
            return JobStatus(state_of_exit(state["rc"]), state["rc"], "exited")
        if state["running"]:
            return JobStatus(JobState.RUNNING, None, "running")
        return JobStatus(JobState.PENDING, None, "starting" if state["known"] else "not started")

    def _remote_log(self, ref: NodeRef, offset: int) -> bytes:
        return self._remote(ref, f"log --offset {int(offset)}")

    def read_log(self, ref: NodeRef, offset: int = 0) -> tuple[str, int]:
        try:
            data = self._remote_log(ref, offset)
        except SSHUnreachable:
            return "", offset
        return data.decode(errors="replace"), offset + len(data)

    def cancel(self, ref: NodeRef) -> None:
        with self._lock:
            channel = self._runs.get(ref.attempt_id)
        try:
            if channel is not None:
                return channel.cancel(ref.attempt_id, CANCEL_GRACE_S)  # the agent stops the node's whole process group
        except AgentGone:
            pass  # the node runtime on the cluster finds it by its pid file
        try:
            self._remote(ref, f"cancel --grace {CANCEL_GRACE_S}")
        except SSHUnreachable as exc:
            raise InfrastructureError(f"node {ref.node!r}: cannot cancel it: {exc}") from None

    def forget(self, cluster: str) -> None:
        """The cluster is torn down: its connection and channel go."""
        with self._lock:
            link = self._links.pop(cluster, None)
            channel = self._channels.pop(cluster, None)
        if channel is not None:
            channel.close()
        if link is not None:
            link.close()

    def close(self) -> None:
        with self._lock:
            clusters = list(self._links)
        for cluster in clusters:
            self.forget(cluster)
