"""The Docker backend: a TaskSpec runs on this machine the way SkyPilot runs it on a VM.

A *cluster* is a long-lived container started from the node image with the signature's limits
(``--cpus``, ``--memory``, GPUs) plus ``docker_run_args``; ``setup`` runs in it once, and each
attempt's ``run`` is a ``docker exec`` in it, as SkyPilot runs jobs inside the container of a
docker-image cluster. The container's main process is the idle watcher, so autostop happens
inside the "VM" even when the launching process is gone; an attempt keeps its log and exit code
in the container, so it runs on when its launcher's stream closes.

With skyvm's own image, the container's main process is the cluster's agent (``skyvm.agent``):
every attempt then goes over one channel per cluster (``agent_channel``) to a child forked from a
warm interpreter, with no exec at all; the exec path stays for user images, for ``SKYVM_AGENT=0``,
and as the fallback when an agent cannot be reached.

Holds: the container labels, ``local_cluster_name``, ``cluster_row``, ``DockerBackend``.
May import: skyvm.backends.base, skyvm.engine, skyvm.capacity, skyvm.home, skyvm.images,
skyvm.redact, skyvm.errors, skyvm.plan, skyvm.watcher (never the pool or the API).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Optional

from skyvm import redact
from skyvm.backends.agent_channel import INLINE_PAYLOAD_MAX, KEY, SOCKET, AgentChannel, AgentGone, agent_dir, new_key
from skyvm.backends.base import Backend, ClusterGone, JobState, JobStatus, LogSink, NodeRef, state_of_exit, store_pending_payload
from skyvm.backends.run_args import run_options, start_with_cli
from skyvm.capacity import check_satisfiable, quantity
from skyvm.engine import EngineAPI, exec_bytes, exec_output
from skyvm.errors import InfrastructureError, NodeCancelled
from skyvm.home import Home
from skyvm.plan import MAX_NAME, TaskSpec

log = logging.getLogger("skyvm.local")

LABEL = "dev.skyvm"
L_MANAGED = f"{LABEL}.managed"
L_RUN = f"{LABEL}.run-id"
L_NODE = f"{LABEL}.node"
L_SIG = f"{LABEL}.signature"
L_DOWN = f"{LABEL}.down"
L_OWNER = f"{LABEL}.owner-pid"
# Which skyvm install (its home: the state directory of claims, run leases, the default store)
# started a container, as an id and as the home's path. A cluster is its install's alone: the claims
# and records that say whether a node runs in it, and the store it mounts, are that home's.
L_HOME = f"{LABEL}.home"
L_HOME_PATH = f"{LABEL}.home-path"
# The socket of the cluster's agent on this host (absent: the cluster has none, attempts are execs).
L_AGENT = f"{LABEL}.agent"
# How many finished attempts' exits a backend remembers for status() (the watched ones).
KEEP_EXITS = 4096
# How long a fresh cluster's agent may take to listen (its interpreter starts, pre-imports the engine), and a
# warm one to answer (it listens already: not answering at once means it is out of reach).
AGENT_START_S = 120.0
AGENT_ANSWER_S = 3.0
# A cancelled node gets this long after SIGTERM before its process group is killed.
CANCEL_GRACE_S = 10


def uses_agent(spec: TaskSpec) -> bool:
    """A cluster of skyvm's own image runs an agent (a user's image gets skyvm's runtime only in its setup,
    after the container's first process started); ``SKYVM_AGENT=0`` turns agents off (every node an exec)."""
    return spec.settings.image is None and os.environ.get("SKYVM_AGENT", "1") != "0"


def local_cluster_name(spec: TaskSpec, slot: int) -> str:
    """The slot-th local cluster of the spec's signature: its cluster name with the install's id.

    Container names are global on the engine: with the id in them, two installs (which keep
    their claims apart) can never pick the same free name at once, even for equal run ids.
    """
    tag = "-" + Home.current().id[:8]
    suffix = f"-{slot}" if slot else ""
    return spec.cluster_name[: MAX_NAME - len(tag) - len(suffix)].rstrip("-") + tag + suffix


def cluster_row(name: str, state: str, status: str, labels: dict, image: str) -> dict:
    """A skyvm container as ``skyvm status`` shows it."""
    return {
        "name": name, "state": state, "status": status, "run_id": labels.get(L_RUN, ""), "node": labels.get(L_NODE, ""),
        "signature": labels.get(L_SIG, "")[:12], "down": labels.get(L_DOWN, ""), "home": labels.get(L_HOME, ""),
        "home_path": labels.get(L_HOME_PATH, ""), "image": image,
    }


def remember_exit(exits: dict, attempt_id: str, status: JobStatus) -> None:
    """Keep how a watched attempt ended (its status() answers from it), the oldest forgotten past KEEP_EXITS."""
    exits[attempt_id] = status
    while len(exits) > KEEP_EXITS:
        exits.pop(next(iter(exits)))


class DockerBackend(Backend):
    """Clusters are containers on this machine's Docker engine, driven through the docker SDK
    over one connection (no CLI process per call). A node's end comes from its exec's own stream."""

    name = "local"
    poll_s = 1.0
    lists_warm = True
    # A warm cluster's agent gets the payload over its channel: written to the store only for an exec (no agent).
    inline_payload_max = INLINE_PAYLOAD_MAX

    def inline_limit(self, store) -> int:
        # Only a store on this machine (the default): a bucket gets the payload first, as before, so a missing
        # bucket or a refused key fails the node before its code runs, not when it writes its result.
        from skyvm.payloads import LocalStore

        return self.inline_payload_max if isinstance(store, LocalStore) else 0

    def __init__(self):
        from skyvm.images import docker_client

        self.client = docker_client()
        self.api = EngineAPI(self.client.api)
        self._lock = threading.Lock()
        self._streams: dict[str, tuple] = {}  # attempt -> (socket, exec id): launched, not yet watched
        self._exits: dict[str, JobStatus] = {}  # attempt -> how its exec ended (watched attempts)
        self._channels: dict[str, AgentChannel] = {}  # cluster -> the channel to its agent
        self._channel_locks: dict[str, threading.Lock] = {}
        self._agents: dict[str, Optional[str]] = {}  # cluster -> its agent's socket (None: it has none)
        self._agent_runs: dict[str, AgentChannel] = {}  # attempt -> its channel, until it ends

    # -- clusters ----------------------------------------------------------------

    def check(self, spec: TaskSpec) -> None:
        check_satisfiable(spec)

    def cluster_name(self, spec: TaskSpec, slot: int) -> str:
        return local_cluster_name(spec, slot)

    def clusters(self, signature: Optional[str] = None, running: bool = False) -> list[dict]:
        labels = [f"{L_MANAGED}=1", f"{L_HOME}={Home.current().id}"] + ([f"{L_SIG}={signature}"] if signature else [])
        filters: dict = {"label": labels}
        if running:
            filters["status"] = "running"
        rows = self.api.containers(all=not running, filters=filters)
        return [cluster_row(r["Names"][0].lstrip("/"), r["State"], r["Status"], r.get("Labels") or {}, r["Image"]) for r in rows]

    def _pull(self, spec: TaskSpec) -> None:
        """A fresh login (the attempt's token) and pull when the image comes from the node's registry."""
        import docker

        reg = spec.registry
        if reg is None or not spec.image.startswith(reg.server.rstrip("/") + "/"):
            return  # a local image and no registry: nothing to log in to or pull
        repo, _, tag = spec.image.rpartition(":")
        auth = {"username": spec.registry_auth[0], "password": spec.registry_auth[1]} if spec.registry_auth else None
        try:
            # The credentials go with the request only: nothing is written to a docker config file.
            for chunk in self.api.pull(repo, tag=tag, auth_config=auth, stream=True, decode=True):
                if "error" in chunk:
                    raise docker.errors.APIError(chunk["error"])
        except docker.errors.APIError as exc:
            text = redact.redact(str(exc))
            if auth and any(w in text.lower() for w in ("unauthorized", "authentication", "denied", "no basic auth")):
                raise InfrastructureError(
                    f"node {spec.node!r}: registry {reg.server} refused the login of {auth['username']} ({text}); "
                    "fix registry.password (or the registry's connector)"
                ) from None
            raise InfrastructureError(f"node {spec.node!r}: cannot pull {spec.image} from {reg.server}: {text}") from None

    def start_cluster(self, spec: TaskSpec, name: str, *, on_log: Optional[LogSink] = None) -> None:
        try:
            self._start(spec, name)
        except BaseException:
            self._remove(name)
            raise

    def _start(self, spec: TaskSpec, name: str) -> None:
        import docker

        s = spec.settings
        home = Home.current()
        self._pull(spec)
        labels = {
            L_MANAGED: "1", L_RUN: spec.run_id, L_NODE: spec.node, L_SIG: spec.signature, L_DOWN: str(s.down).lower(),
            L_OWNER: str(os.getpid()), L_HOME: home.id, L_HOME_PATH: str(home.resolved), **{f"{LABEL}.user.{k}": v for k, v in s.labels.items()},
        }
        env = {"SKYVM_CLUSTER": name}
        if os.environ.get("SKYVM_IDLE_POLL_S"):
            env["SKYVM_IDLE_POLL_S"] = os.environ["SKYVM_IDLE_POLL_S"]
        minutes = s.autostop_minutes
        watch = ["python3", "-m", "skyvm.node", "idle-watch"] + (["--minutes", str(minutes)] if minutes is not None else [])
        binds = []
        if uses_agent(spec):
            # The agent is the cluster's first process: the first node needs no second exec.
            directory = agent_dir(name)
            new_key(directory)
            sock = str(directory / SOCKET)
            binds.append(f"{directory}:{directory}")
            labels[L_AGENT] = sock
            watch = ["python3", "-m", "skyvm.agent", "--socket", sock, "--key-file", str(directory / KEY)] + (["--minutes", str(minutes)] if minutes is not None else [])
        with self._lock:
            self._agents[name] = labels.get(L_AGENT)
        store = s.payload_store or str(home.store)
        if "://" not in store or store.startswith("file://"):
            # The VM would reach a directory store through a mount; here the same path is bind-mounted.
            path = store.removeprefix("file://")
            Path(path).mkdir(parents=True, exist_ok=True)
            binds.append(f"{path}:{path}")
        options = run_options(list(spec.docker_run_args))
        if options is None:
            start_with_cli(spec, name, labels, env, binds, watch)
        else:
            host: dict = {"network_mode": "host", "init": True, "auto_remove": True, "binds": binds}
            if s.cpus:
                host["nano_cpus"] = int(quantity(s.cpus) * 1e9)
            if s.memory:
                # No swap beyond the limit: a node sees the memory a VM of that size has.
                host["mem_limit"] = host["memswap_limit"] = f"{int(quantity(s.memory) * 1024)}m"
            for e in options.pop("_env", []):
                key, _, val = e.partition("=")
                env[key] = val
            host["binds"] = binds + options.pop("binds", [])
            host.update(options)
            try:
                self.api.create_container(spec.image, command=watch, name=name, labels=labels, environment=env, host_config=self.api.create_host_config(**host), detach=True)
                self.api.start(name)
            except docker.errors.ImageNotFound:
                raise InfrastructureError(f"node {spec.node!r}: image {spec.image} is not on this machine; build it, or set registry: to pull it") from None
            except docker.errors.APIError as exc:
                raise InfrastructureError(f"node {spec.node!r}: cannot start cluster {name}: {redact.redact(str(exc))}") from None
        if s.image:
            # A user's image: make sure skyvm's runtime is there before the first node (skyvm's own always has it).
            # Installs may be silent for long: the setup's own bound is the node's timeout, else an hour.
            code, out, err = self._exec_output(name, ["sh", "-c", spec.setup], timeout=spec.settings.timeout or 3600)
            if code != 0:
                raise InfrastructureError(f"setup failed on cluster {name} (exit {code}): {(out + err).strip()[-2000:]}")

    def _exec_output(self, name: str, cmd: list[str], timeout: Optional[float] = None) -> tuple[int, str, str]:
        return exec_output(self.api, name, cmd, timeout)

    def remove_cluster(self, name: str, *, shared: bool = False) -> None:
        """Remove a cluster of this install. Another install's is left alone, whatever a reference
        says: its claims are under its own home."""
        import docker

        try:
            labels = self.api.inspect_container(name)["Config"]["Labels"] or {}
        except docker.errors.NotFound:
            return
        if labels.get(L_HOME) != Home.current().id:
            log.warning("cluster %s belongs to another skyvm install (home %s at %s): not removed", name, labels.get(L_HOME), labels.get(L_HOME_PATH, "?"))
            return
        self._remove(name)

    def _remove(self, name: str) -> None:
        import docker

        self._close_channel(name)
        try:
            self.api.remove_container(name, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if "already in progress" not in str(exc):
                log.warning("removing cluster %s: %s", name, exc)
        shutil.rmtree(agent_dir(name), ignore_errors=True)

    # -- agents ------------------------------------------------------------------

    def _close_channel(self, name: str) -> None:
        with self._lock:
            channel = self._channels.pop(name, None)
            self._agents.pop(name, None)
        if channel is not None:
            channel.close()

    def _agent_socket(self, name: str) -> Optional[str]:
        """The cluster's agent socket (None: it has none). ClusterGone when the cluster is."""
        import docker

        with self._lock:
            if name in self._agents:
                return self._agents[name]
        try:
            labels = self.api.inspect_container(name)["Config"]["Labels"] or {}
        except docker.errors.NotFound:
            raise ClusterGone(name) from None
        sock = labels.get(L_AGENT)
        with self._lock:
            self._agents[name] = sock
        return sock

    def _running(self, name: str) -> bool:
        import docker

        try:
            return bool(self.api.inspect_container(name)["State"]["Running"])
        except docker.errors.NotFound:
            return False

    def _channel(self, name: str, fresh: bool = False) -> Optional[AgentChannel]:
        """This process's channel to the cluster's agent, opened once (None: the cluster has no agent)."""
        with self._lock:
            channel = self._channels.get(name)
            if channel is not None and channel.alive:
                return channel
            lock = self._channel_locks.setdefault(name, threading.Lock())
        sock = self._agent_socket(name)
        if sock is None:
            return None
        with lock:
            with self._lock:
                channel = self._channels.get(name)
            if channel is not None and channel.alive:
                return channel
            try:
                key = (Path(sock).parent / KEY).read_bytes().strip()
            except OSError as exc:
                raise AgentGone(f"cannot read the key of cluster {name}'s agent: {exc}") from None
            # A fresh cluster's agent may still be starting; a warm one's answers at once or not at all.
            channel = AgentChannel(name, sock, key, connect_timeout=AGENT_START_S if fresh else AGENT_ANSWER_S, alive=lambda: self._running(name))
            with self._lock:
                self._channels[name] = channel
            return channel

    def _run_on_agent(self, spec: TaskSpec, name: str, fresh: bool) -> bool:
        """Start the attempt through the cluster's agent; False when the cluster has none (or it is out of reach)."""
        try:
            channel = self._channel(name, fresh)
            if channel is None:
                return False
            channel.run(spec.attempt_id, spec.payload, spec.payload_url, spec.result_url, {**spec.envs, **spec.secrets})
        except AgentGone as exc:
            if not self._running(name):
                raise ClusterGone(name) from None
            log.warning("node %s: %s; running it with an exec instead", spec.node, exc)
            return False
        with self._lock:
            self._agent_runs[spec.attempt_id] = channel
        return True

    # -- attempts ----------------------------------------------------------------

    def run_attempt(self, spec: TaskSpec, cluster: Optional[str], *, fresh: bool = False, on_log: Optional[LogSink] = None, cancelled=None) -> NodeRef:
        import docker

        name = cluster
        if fresh:
            log.info("starting cluster %s for node %s", name, spec.node)
            self.start_cluster(spec, name)
        try:
            if cancelled is not None and cancelled():
                raise NodeCancelled(f"node {spec.node!r} was cancelled before it started")
            if self._run_on_agent(spec, name, fresh):
                return NodeRef(backend=self.name, cluster=name, attempt_id=spec.attempt_id, node=spec.node, run_id=spec.run_id, fresh=fresh)
            store_pending_payload(spec)  # an exec's node reads it from the store
            try:
                eid = self.api.exec_create(name, ["sh", "-c", spec.run + " --detached"], environment={**spec.envs, **spec.secrets})["Id"]
            except docker.errors.NotFound:
                raise ClusterGone(name) from None
            sock = self.api.exec_start(eid, socket=True)
        except ClusterGone:
            raise
        except BaseException as exc:
            if fresh:
                self._remove(name)
            if isinstance(exc, docker.errors.APIError):
                raise InfrastructureError(f"node {spec.node!r}: cannot run on cluster {name}: {redact.redact(str(exc))}") from None
            raise
        with self._lock:
            self._streams[spec.attempt_id] = (sock, eid)
        return NodeRef(backend=self.name, cluster=name, attempt_id=spec.attempt_id, node=spec.node, run_id=spec.run_id, fresh=fresh)

    def watch(self, ref: NodeRef, on_log: LogSink, on_exit) -> bool:
        from skyvm.context import watcher

        with self._lock:
            stream = self._streams.pop(ref.attempt_id, None)
            channel = self._agent_runs.get(ref.attempt_id)
        if channel is not None:
            def on_agent_exit(status: JobStatus) -> None:
                with self._lock:
                    self._agent_runs.pop(ref.attempt_id, None)
                    remember_exit(self._exits, ref.attempt_id, status)
                on_exit(status)

            return channel.follow(ref.attempt_id, on_log, on_agent_exit)
        if stream is None:
            return False
        sock, eid = stream
        raw = getattr(sock, "_sock", sock)
        raw.setblocking(False)

        def ended() -> None:
            try:
                code = self.api.exec_inspect(eid)["ExitCode"]
            except Exception as exc:  # noqa: BLE001 - the engine is gone: so is the node
                status = JobStatus(JobState.GONE, None, f"the Docker engine lost the exec on {ref.cluster}: {exc}")
            else:
                status = JobStatus(state_of_exit(code), code) if code is not None else JobStatus(JobState.GONE, None, "the exec ended with no exit code")
            try:
                sock.close()
            except OSError:
                pass
            with self._lock:
                remember_exit(self._exits, ref.attempt_id, status)
            on_exit(status)

        watcher().add_stream(raw, raw.recv, on_log, ended, docker_frames=True)
        return True

    def let_go(self, ref: NodeRef) -> None:
        """Nobody here follows the attempt: its output is read and dropped while this process lives
        (unread, the exec's pipe would fill and stall the node); its log and exit stay in the cluster."""
        from skyvm.context import watcher

        with self._lock:
            stream = self._streams.pop(ref.attempt_id, None)
            channel = self._agent_runs.pop(ref.attempt_id, None)
        if channel is not None:
            channel.drop(ref.attempt_id)
        if stream is None:
            return
        sock = stream[0]
        raw = getattr(sock, "_sock", sock)
        raw.setblocking(False)
        watcher().add_stream(raw, raw.recv, lambda _line: None, sock.close, docker_frames=True)

    def status(self, ref: NodeRef) -> JobStatus:
        import docker

        with self._lock:
            known = self._exits.get(ref.attempt_id)
        if known is not None:
            return known
        try:
            code, out, _err = self._exec_output(ref.cluster, ["python3", "-m", "skyvm.node", "status", "--attempt", ref.attempt_id])
        except docker.errors.NotFound:
            return JobStatus(JobState.GONE, None, f"cluster {ref.cluster} is gone")
        except docker.errors.APIError as exc:
            if "is not running" in str(exc):
                return JobStatus(JobState.GONE, None, f"cluster {ref.cluster} stopped")
            raise InfrastructureError(f"node {ref.node!r}: cannot ask cluster {ref.cluster} for its status: {exc}") from None
        if code != 0:
            raise InfrastructureError(f"node {ref.node!r}: status in cluster {ref.cluster} failed (exit {code}): {out.strip()[-500:]}")
        state = json.loads(out)
        if state["running"]:
            return JobStatus(JobState.RUNNING, None, "running")
        if state["rc"] is None:
            return JobStatus(JobState.PENDING, None, "starting" if state["known"] else "not started")
        return JobStatus(state_of_exit(state["rc"]), state["rc"], "exited")

    def read_log(self, ref: NodeRef, offset: int = 0) -> tuple[str, int]:
        import docker

        try:
            _code, data, _err = exec_bytes(self.api, ref.cluster, ["python3", "-m", "skyvm.node", "log", "--attempt", ref.attempt_id, "--offset", str(offset)])
        except docker.errors.APIError:
            return "", offset
        return data.decode(errors="replace"), offset + len(data)  # the offset counts the log file's bytes

    def cancel(self, ref: NodeRef) -> None:
        import docker

        with self._lock:
            channel = self._agent_runs.get(ref.attempt_id)
        if channel is not None:
            try:
                channel.cancel(ref.attempt_id, CANCEL_GRACE_S)  # the agent stops the node's whole process group
                return
            except AgentGone:
                pass  # the exec below finds it by its pid file, if the cluster is still there
        try:
            self._exec_output(ref.cluster, ["python3", "-m", "skyvm.node", "cancel", "--attempt", ref.attempt_id, "--grace", str(CANCEL_GRACE_S)])
        except docker.errors.APIError:
            pass  # the cluster is gone: so is the attempt
