"""The local backend: a TaskSpec runs on this machine the way SkyPilot runs it on a VM.

A *cluster* is a long-lived container started from the node image with the
signature's limits (``--cpus``, ``--memory``, GPUs) plus ``docker_run_args``;
``setup`` runs in it once, and each node's ``run`` is a ``docker exec`` in it,
as SkyPilot runs jobs inside the container of a docker-image cluster. The
container's main process is the idle watcher, so autostop happens inside the
"VM" even when the launching process is gone.

Where no Docker engine is reachable, ``ProcessBackend`` runs the same
contract as plain processes (no isolation; it says so once).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Optional

from skyvm import redact
from skyvm.backends.base import Backend, JobState, JobStatus, LogSink, NodeRef, state_of_exit
from skyvm.errors import InfrastructureError, NodeCancelled, UnsatisfiableRequest
from skyvm.pool import ClusterPool
from skyvm.watcher import watcher
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
# Which skyvm install (its home: the state directory of locks, run leases, the default store)
# started a container, as an id and as the home's path. A cluster is its install's alone: the busy
# locks that say whether a node runs in it, and the store it mounts, are that home's.
L_HOME = f"{LABEL}.home"
L_HOME_PATH = f"{LABEL}.home-path"


def home_id(home: Optional[Path] = None) -> str:
    """The install's id: a hash of its home's resolved path (this process's ``SKYVM_HOME`` by default)."""
    return _home_id(str(Path(home or Home.current().path).resolve()))


@functools.lru_cache(maxsize=None)
def _home_id(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()[:12]


def local_cluster_name(spec: TaskSpec, slot: int) -> str:
    """The slot-th local cluster of the spec's signature: its cluster name with the install's id.

    Container names are global on the engine: with the id in them, two installs (which keep
    their busy locks apart) can never pick the same free name at once, even for equal run ids.
    """
    tag = "-" + home_id()[:8]
    suffix = f"-{slot}" if slot else ""
    return spec.cluster_name[: MAX_NAME - len(tag) - len(suffix)].rstrip("-") + tag + suffix


def _docker_env(config: Optional[str] = None) -> dict:
    # skyvm's own docker config dir: registry logins never touch the user's ~/.docker.
    env = dict(os.environ)
    env["DOCKER_CONFIG"] = config or str(Home.current().path / "docker")
    return env


def docker(*args: str, input: Optional[str] = None, check: bool = True, timeout: Optional[float] = 600, config: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run the docker CLI (as SkyPilot does on a VM); raise InfrastructureError with its output on failure."""
    cmd = ["docker", *args]
    try:
        out = subprocess.run(cmd, input=input, capture_output=True, text=True, env=_docker_env(config), timeout=timeout)
    except FileNotFoundError:
        raise InfrastructureError("the docker CLI is not installed") from None
    except subprocess.TimeoutExpired:
        raise InfrastructureError(f"docker {args[0]} timed out after {timeout}s") from None
    if check and out.returncode != 0:
        raise InfrastructureError(f"docker {args[0]} failed (exit {out.returncode}): {(out.stderr or out.stdout).strip()[-2000:]}")
    return out


def docker_available() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return docker("version", "--format", "{{.Server.Version}}", check=False, timeout=20).returncode == 0
    except InfrastructureError:
        return False


def _gib(quantity: Optional[str]) -> Optional[float]:
    return None if quantity is None else float(quantity.rstrip("+"))


def host_gpus() -> list[str]:
    from skyvm.limits import gpus

    return gpus()


def host_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def check_satisfiable(spec: TaskSpec) -> None:
    """Fail fast, with what this machine has, when a request cannot be met here."""
    s = spec.settings
    cpus = _gib(s.cpus)
    have_cpus = os.cpu_count() or 1
    if cpus is not None and cpus > have_cpus:
        raise UnsatisfiableRequest(f"node {spec.node!r} asks for cpus={s.cpus} but this machine has {have_cpus} CPUs (local backend)")
    mem = _gib(s.memory)
    have_mem = host_memory_gib()
    if mem is not None and mem > have_mem:
        raise UnsatisfiableRequest(f"node {spec.node!r} asks for memory={s.memory} GiB but this machine has {have_mem:.1f} GiB (local backend)")
    request = s.accelerator_request()
    if request:
        name, count = request
        gpus = host_gpus()
        matching = [g for g in gpus if name.lower().replace("-", "") in g.lower().replace("-", "").replace(" ", "")]
        if len(matching) < count:
            have = ", ".join(gpus) if gpus else "no NVIDIA GPU"
            raise UnsatisfiableRequest(
                f"node {spec.node!r} asks for accelerators {name}:{count:g} but this machine has {have} (local backend); "
                "use backend: skypilot, or drop accelerators"
            )
    if s.instance_type:
        log.info("local backend: instance_type %s is not emulated; cpus/memory limits apply", s.instance_type)


def _state_dir(kind: str, home: Optional[Path] = None) -> Path:
    d = Path(home or Home.current().path) / kind
    d.mkdir(parents=True, exist_ok=True)
    return d


class _ClusterLock:
    """Whether a cluster is busy, across the processes of one install: an flock held while a node
    runs in it, under that install's home."""

    def __init__(self, name: str, home: Optional[Path] = None):
        self.path = _state_dir("locks", home) / f"{name}.lock"
        self.fd: Optional[int] = None

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def run_lease(run_id: str, home: Optional[Path] = None) -> Path:
    """A run is live while the process that owns it is: gc spares its clusters."""
    return _state_dir("runs", home) / f"{run_id}.json"


def _users_file(cluster: str, home: Optional[Path] = None) -> Path:
    return _state_dir("clusters", home) / f"{cluster}.runs"


def add_cluster_user(cluster: str, run_id: str) -> None:
    """Remember which runs used a cluster: a warm cluster reused by a live run is that run's too."""
    with open(_users_file(cluster), "a") as fh:
        fh.write(run_id + "\n")


def cluster_users(cluster: str, home: Optional[Path] = None) -> set[str]:
    try:
        return set(_users_file(cluster, home).read_text().split())
    except OSError:
        return set()


def _detached_marker(cluster: str, home: Optional[Path] = None) -> Path:
    return _state_dir("clusters", home) / f"{cluster}.detached"


def _busy_inside(cluster: str) -> bool:
    """Whether some attempt runs in the cluster, as the cluster itself says."""
    return docker("exec", cluster, "python3", "-m", "skyvm.node", "busy", check=False, timeout=60).returncode == 0


def _detached_busy(cluster: str, home: Optional[Path] = None) -> bool:
    """Whether a detached attempt still runs in the cluster. Asks inside only when one was ever started there."""
    marker = _detached_marker(cluster, home)
    if not marker.exists():
        return False
    busy = _busy_inside(cluster)
    if not busy:
        marker.unlink(missing_ok=True)
    return busy


def run_is_live(run_id: str, home: Optional[Path] = None) -> bool:
    try:
        pid = json.loads(run_lease(run_id, home).read_text())["pid"]
        os.kill(pid, 0)
        return True
    except (OSError, ValueError, KeyError):
        return False


def _run_options(args: list[str]) -> Optional[dict]:
    """``docker_run_args`` as Engine API host-config options, or None when one has no mapping here
    (the cluster is then created with the docker CLI, which takes any flag)."""
    out: dict = {}
    i = 0

    def value() -> str:
        nonlocal i
        arg = args[i]
        if "=" in arg and arg.startswith("--"):
            return arg.split("=", 1)[1]
        i += 1
        if i >= len(args):
            raise InfrastructureError(f"docker_run_args: {arg} needs a value")
        return args[i]

    while i < len(args):
        arg = args[i]
        flag = arg.split("=", 1)[0] if arg.startswith("--") else arg
        if flag == "--shm-size":
            out["shm_size"] = value()
        elif flag == "--gpus":
            import docker

            spec = value()
            count = -1 if spec == "all" else int(spec.removeprefix("count=")) if spec.removeprefix("count=").isdigit() else None
            if count is None:
                return None
            out.setdefault("device_requests", []).append(docker.types.DeviceRequest(count=count, capabilities=[["gpu"]]))
        elif flag in ("--network", "--net"):
            out["network_mode"] = value()
        elif flag == "--ipc":
            out["ipc_mode"] = value()
        elif flag == "--cap-add":
            out.setdefault("cap_add", []).append(value())
        elif flag == "--privileged":
            out["privileged"] = True
        elif flag in ("-v", "--volume"):
            out.setdefault("binds", []).append(value())
        elif flag in ("-e", "--env"):
            out.setdefault("_env", []).append(value())
        else:
            return None
        i += 1
    return out


class _EngineAPI:
    """The docker SDK's low-level client, whose waits are bounded (``SKYVM_DOCKER_CALL_TIMEOUT_S``) and whose
    timeouts and dropped connections become errors naming the call, not a bare ``ReadTimeout``."""

    def __init__(self, api):
        self._api = api

    def __getattr__(self, name: str):
        import requests

        attr = getattr(self._api, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            from skyvm.images import DOCKER_CALL_TIMEOUT_S

            try:
                return attr(*args, **kwargs)
            except requests.exceptions.Timeout:
                raise InfrastructureError(
                    f"the Docker engine did not answer {name} within {DOCKER_CALL_TIMEOUT_S:g}s "
                    "(SKYVM_DOCKER_CALL_TIMEOUT_S): is dockerd overloaded or stuck?"
                ) from None
            except requests.exceptions.ConnectionError as exc:
                raise InfrastructureError(f"the Docker engine dropped {name} ({exc}): is dockerd running? (restarted mid-node?)") from None

        return call


class DockerBackend(Backend):
    """Clusters are containers on this machine's Docker engine, driven through the docker SDK
    over one connection (no CLI process per call). A node's end comes from its exec's own stream."""

    name = "local"
    poll_s = 1.0

    def __init__(self):
        from skyvm.images import docker_client

        self.client = docker_client()
        self.api = _EngineAPI(self.client.api)
        self.pool = ClusterPool()
        self._lock = threading.Lock()
        self._locks: dict[str, _ClusterLock] = {}  # clusters this process has busy (flock held)
        self._streams: dict[str, tuple] = {}  # attempt -> (socket, exec id): launched, not yet watched
        self._exits: dict[str, JobStatus] = {}  # attempt -> how its exec ended (followed attempts)

    # -- clusters ----------------------------------------------------------

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

    def _claim_warm(self, spec: TaskSpec, known: set) -> Optional[str]:
        """A running cluster of the signature that another process of this install (or an earlier
        run) left warm. Never another install's: its busy locks are not ours to see, and it mounts
        that install's store."""
        mine = [f"{L_SIG}={spec.signature}", f"{L_HOME}={home_id()}"]
        for row in self.api.containers(filters={"label": mine, "status": "running"}):
            name = row["Names"][0].lstrip("/")
            if name in known:
                continue
            lock = _ClusterLock(name)
            if lock.try_acquire():
                if not _detached_busy(name):
                    self._hold(name, lock, spec.run_id)
                    return name
                lock.release()
        return None

    def _taken(self) -> set:
        return {row["Names"][0].lstrip("/") for row in self.api.containers(all=True)}

    def _hold(self, name: str, lock: "_ClusterLock", run_id: str) -> None:
        with self._lock:
            self._locks[name] = lock
        add_cluster_user(name, run_id)

    def _unhold(self, name: str) -> None:
        with self._lock:
            lock = self._locks.pop(name, None)
        if lock is not None:
            lock.release()

    def _start_cluster(self, spec: TaskSpec, name: str) -> None:
        import docker

        s = spec.settings
        self._pull(spec)
        labels = {
            L_MANAGED: "1", L_RUN: spec.run_id, L_NODE: spec.node, L_SIG: spec.signature, L_DOWN: str(s.down).lower(),
            L_OWNER: str(os.getpid()), L_HOME: home_id(), L_HOME_PATH: str(Home.current().path.resolve()), **{f"{LABEL}.user.{k}": v for k, v in s.labels.items()},
        }
        env = {"SKYVM_CLUSTER": name}
        if os.environ.get("SKYVM_IDLE_POLL_S"):
            env["SKYVM_IDLE_POLL_S"] = os.environ["SKYVM_IDLE_POLL_S"]
        minutes = s.autostop_minutes
        watch = ["python3", "-m", "skyvm.node", "idle-watch"] + (["--minutes", str(minutes)] if minutes is not None else [])
        binds = []
        store = s.payload_store or str(Home.current().path / "store")
        if "://" not in store or store.startswith("file://"):
            # The VM would reach a directory store through a mount; here the same path is bind-mounted.
            path = store.removeprefix("file://")
            Path(path).mkdir(parents=True, exist_ok=True)
            binds.append(f"{path}:{path}")
        options = _run_options(list(spec.docker_run_args))
        if options is None:
            self._start_with_cli(spec, name, labels, env, binds, watch)
        else:
            host: dict = {"network_mode": "host", "init": True, "auto_remove": True, "binds": binds}
            if s.cpus:
                host["nano_cpus"] = int(_gib(s.cpus) * 1e9)
            if s.memory:
                # No swap beyond the limit: a node sees the memory a VM of that size has.
                host["mem_limit"] = host["memswap_limit"] = f"{int(_gib(s.memory) * 1024)}m"
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

    def _start_ahead(self, spec: TaskSpec, name: str) -> None:
        """A pool's cluster, started before any node needs it; held (flock) while it starts, so no
        other process takes it half-made."""
        lock = _ClusterLock(name)
        if not lock.try_acquire():
            raise InfrastructureError(f"cluster {name} is held by another process")
        try:
            log.info("starting cluster %s ahead (pool of node %s)", name, spec.node)
            self._start_cluster(spec, name)
            add_cluster_user(name, spec.run_id)
        except BaseException:
            self._remove(name)
            raise
        finally:
            lock.release()

    def _start_with_cli(self, spec: TaskSpec, name: str, labels: dict, env: dict, binds: list, watch: list) -> None:
        s = spec.settings
        args = ["run", "--detach", "--rm", "--name", name, "--init"]
        for key, value in labels.items():
            args += ["--label", f"{key}={value}"]
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        for bind in binds:
            args += ["--volume", bind]
        user_args = list(spec.docker_run_args)
        if not any(a == "--network" or a.startswith(("--network=", "--net=")) for a in user_args):
            args += ["--network", "host"]
        if s.cpus:
            args += ["--cpus", str(_gib(s.cpus))]
        if s.memory:
            mem = f"{int(_gib(s.memory) * 1024)}m"
            args += ["--memory", mem, "--memory-swap", mem]
        docker(*args, *user_args, spec.image, *watch)

    def _exec_output(self, name: str, cmd: list[str], timeout: Optional[float] = None) -> tuple[int, str, str]:
        """A command in a cluster: (exit code, stdout, stderr) as text."""
        code, out, err = self._exec_bytes(name, cmd, timeout)
        return code, out.decode(errors="replace"), err.decode(errors="replace")

    def _exec_bytes(self, name: str, cmd: list[str], timeout: Optional[float] = None) -> tuple[int, bytes, bytes]:
        """A command in a cluster: (exit code, stdout, stderr). A gone cluster raises docker's NotFound.

        Read through the exec's socket with a timeout: the SDK's plain ``exec_start`` reads with
        none, so a stuck engine or command would hold the caller forever.
        """
        import select

        from skyvm.images import DOCKER_CALL_TIMEOUT_S
        from skyvm.watcher import split_frames

        timeout = timeout or DOCKER_CALL_TIMEOUT_S
        eid = self.api.exec_create(name, cmd)["Id"]
        sock = self.api.exec_start(eid, socket=True)
        raw = getattr(sock, "_sock", sock)
        data = b""
        try:
            while True:
                # The SDK's own readers poll with no timeout: wait here, with one.
                if not select.select([raw], [], [], timeout)[0]:
                    raise InfrastructureError(
                        f"{' '.join(cmd)[:120]!r} in cluster {name} gave no output for {timeout:g}s "
                        "(SKYVM_DOCKER_CALL_TIMEOUT_S): is dockerd or the container stuck?"
                    )
                chunk = raw.recv(65536)
                if not chunk:
                    break
                data += chunk
        finally:
            sock.close()
        frames, _rest = split_frames(data)
        out = b"".join(d for sid, d in frames if sid != 2)
        err = b"".join(d for sid, d in frames if sid == 2)
        return self.api.exec_inspect(eid)["ExitCode"], out, err

    def _remove(self, name: str) -> None:
        import docker

        try:
            self.api.remove_container(name, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if "already in progress" not in str(exc):
                log.warning("removing cluster %s: %s", name, exc)
        _users_file(name).unlink(missing_ok=True)
        _detached_marker(name).unlink(missing_ok=True)
        self.pool.forget(name)

    # -- the launch path ---------------------------------------------------------

    def launch(self, spec: TaskSpec, *, on_log: Optional[LogSink] = None, cancelled=None, follow: bool = True) -> NodeRef:
        import docker

        check_satisfiable(spec)
        name_for = functools.partial(local_cluster_name, spec)
        ahead = self.pool.start_ahead(spec, lambda name: self._start_ahead(spec, name), taken=self._taken, name_for=name_for)
        if ahead and on_log:
            on_log(f"skyvm: pool of {len(ahead)} warm cluster(s) started ahead for {spec.node}'s signature: {', '.join(ahead)}")
        while True:
            cluster, fresh = self.pool.acquire(spec, claim_warm=self._claim_warm, taken=self._taken, cancelled=cancelled, name_for=name_for)
            name = cluster.name
            if name in self._locks:
                break
            lock = _ClusterLock(name)
            if lock.try_acquire():
                self._hold(name, lock, spec.run_id)
                break
            # Another process took this warm cluster meanwhile: it is theirs now.
            self.pool.forget(name)
        try:
            if fresh:
                log.info("starting cluster %s for node %s", name, spec.node)
                self._start_cluster(spec, name)
            if cancelled is not None and cancelled():
                raise NodeCancelled(f"node {spec.node!r} was cancelled before it started")
            run = spec.run + " --detached"
            try:
                eid = self.api.exec_create(name, ["sh", "-c", run], environment={**spec.envs, **spec.secrets})["Id"]
            except docker.errors.NotFound:
                raise _ClusterGone(name) from None
            if follow:
                sock = self.api.exec_start(eid, socket=True)
                with self._lock:
                    self._streams[spec.attempt_id] = (sock, eid)
            else:
                _detached_marker(name).write_text(spec.attempt_id)
                self.api.exec_start(eid, detach=True)
        except _ClusterGone:
            # A warm cluster hit its autostop just now: forget it and take another.
            self._unhold(name)
            self.pool.forget(name)
            return self.launch(spec, on_log=on_log, cancelled=cancelled, follow=follow)
        except BaseException as exc:
            if fresh:
                self._remove(name)
                self._unhold(name)
            else:
                self._unhold(name)  # before free: see release()
                self.pool.free(name)
            if isinstance(exc, docker.errors.APIError):
                raise InfrastructureError(f"node {spec.node!r}: cannot run on cluster {name}: {redact.redact(str(exc))}") from None
            raise
        extra = {}
        if not follow:
            # Nobody here waits on it: the cluster leaves this process's pool (its marker says an attempt
            # may run there, which a later claim checks); its reference's release decides its end.
            extra["detached"] = True
            self._unhold(name)
            self.pool.forget(name)
        return NodeRef(backend=self.name, cluster=name, attempt_id=spec.attempt_id, node=spec.node, run_id=spec.run_id, fresh=fresh, extra=extra)

    def watch(self, ref: NodeRef, on_log: LogSink, on_exit) -> bool:
        with self._lock:
            stream = self._streams.pop(ref.attempt_id, None)
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
                self._exits[ref.attempt_id] = status
            on_exit(status)

        watcher().add_stream(raw, raw.recv, on_log, ended, docker_frames=True)
        return True

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
            _code, data, _err = self._exec_bytes(ref.cluster, ["python3", "-m", "skyvm.node", "log", "--attempt", ref.attempt_id, "--offset", str(offset)])
        except docker.errors.APIError:
            return "", offset
        return data.decode(errors="replace"), offset + len(data)  # the offset counts the log file's bytes

    def cancel(self, ref: NodeRef) -> None:
        import docker

        try:
            self._exec_output(ref.cluster, ["python3", "-m", "skyvm.node", "cancel", "--attempt", ref.attempt_id, "--grace", "10"])
        except docker.errors.APIError:
            pass  # the cluster is gone: so is the attempt

    def release(self, ref: NodeRef, down: bool, discard: bool = False) -> None:
        with self._lock:
            self._exits.pop(ref.attempt_id, None)
        if not ref.extra.get("detached") and self.pool.get(ref.cluster) is not None:
            if discard and down:
                # A cancelled run does not keep its cluster around.
                self.pool.forget(ref.cluster)
                self._remove(ref.cluster)
                self._unhold(ref.cluster)
            else:
                # The flock goes first: a node waiting for this cluster takes it the moment it is free,
                # and a flock still held then reads as another process's, which would lose the cluster.
                self._unhold(ref.cluster)
                self.pool.free(ref.cluster)
            return
        # Found again from its reference (a trigger): its cluster goes when down says so and nothing runs there.
        if down:
            self._remove_if_idle(ref.cluster)
        run_lease(ref.run_id).unlink(missing_ok=True)

    def end_run(self, run_id: str) -> None:
        for cluster in self.pool.end_run(run_id):
            self._remove_if_idle(cluster.name)
        run_lease(run_id).unlink(missing_ok=True)

    def _remove_if_idle(self, name: str) -> None:
        """Remove a cluster of this install when no node runs in it. Another install's is left
        alone, whatever a reference says: its busy locks are under its own home."""
        import docker

        try:
            labels = self.api.inspect_container(name)["Config"]["Labels"] or {}
        except docker.errors.NotFound:
            return
        if labels.get(L_HOME) != home_id():
            log.warning("cluster %s belongs to another skyvm install (home %s at %s): not removed", name, labels.get(L_HOME), labels.get(L_HOME_PATH, "?"))
            return
        lock = _ClusterLock(name)
        if lock.try_acquire():  # only when no node runs in it
            try:
                if not _detached_busy(name):
                    self._remove(name)
            finally:
                lock.release()


class _ClusterGone(Exception):
    pass


class ProcessBackend(Backend):
    """No Docker engine: run the node runtime as a plain host process, with the same contract.

    There is no isolation and no resource limit beyond what the OS gives; it warns once.
    """

    name = "local-process"
    needs_image = False
    poll_s = 0.5
    _warned = False

    def __init__(self):
        self._lock = threading.Lock()
        self._procs: dict[str, subprocess.Popen] = {}
        self._exits: dict[str, JobStatus] = {}
        self.state = Home.current().path / "node-state"
        if not ProcessBackend._warned:
            ProcessBackend._warned = True
            log.warning("no Docker engine reachable: the local backend runs nodes as plain processes (no container, no limits)")

    def launch(self, spec: TaskSpec, *, on_log: Optional[LogSink] = None, cancelled=None, follow: bool = True) -> NodeRef:
        import sys

        check_satisfiable(spec)
        if not follow:
            raise InfrastructureError("detached nodes (Airflow's deferrable mode) need a Docker engine; none is reachable")
        env = {**os.environ, **spec.envs, **spec.secrets, "PYTHONUNBUFFERED": "1", "SKYVM_NODE_STATE": str(self.state)}
        cmd = shlex.split(spec.run) + ["--detached"]
        cmd[0] = sys.executable
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        with self._lock:
            self._procs[spec.attempt_id] = proc
        return NodeRef(backend=self.name, cluster=f"process-{proc.pid}", attempt_id=spec.attempt_id, node=spec.node, run_id=spec.run_id, fresh=True)

    def watch(self, ref: NodeRef, on_log: LogSink, on_exit) -> bool:
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
            status = JobStatus(JobState.CANCELLED, 143) if code == -15 else JobStatus(state_of_exit(code), code)
            with self._lock:
                self._exits[ref.attempt_id] = status
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
        import signal

        with self._lock:
            proc = self._procs.get(ref.attempt_id)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)

    def release(self, ref: NodeRef, down: bool, discard: bool = False) -> None:
        with self._lock:
            self._exits.pop(ref.attempt_id, None)

    def end_run(self, run_id: str) -> None:
        run_lease(run_id).unlink(missing_ok=True)

def same_path_volumes(paths) -> list[str]:
    """``docker run`` options mounting each host directory at the same path in a local cluster (made
    when missing): how a whole-task node (an Airflow executor's, a Prefect worker's flow) sees the
    DAGs, flow sources, logs and results where the engine put them."""
    args: list[str] = []
    for path in dict.fromkeys(str(p) for p in paths):
        os.makedirs(path, exist_ok=True)
        args += ["--volume", f"{path}:{path}"]
    return args


def list_managed(all_states: bool = True, all_homes: bool = False) -> list[dict]:
    """The containers skyvm started on this engine, with their labels: this install's, or every
    install's (``all_homes``)."""
    if not docker_available():
        return []
    args = ["ps", "--filter", f"label={L_MANAGED}=1", "--format", "{{json .}}", "--no-trunc"]
    if not all_homes:
        args[1:1] = ["--filter", f"label={L_HOME}={home_id()}"]
    if all_states:
        args.insert(1, "-a")
    rows = []
    for line in docker(*args).stdout.splitlines():
        row = json.loads(line)
        labels = dict(item.split("=", 1) for item in row.get("Labels", "").split(",") if "=" in item)
        rows.append(
            {
                "name": row["Names"],
                "state": row["State"],
                "status": row["Status"],
                "run_id": labels.get(L_RUN, ""),
                "node": labels.get(L_NODE, ""),
                "signature": labels.get(L_SIG, "")[:12],
                "down": labels.get(L_DOWN, ""),
                "home": labels.get(L_HOME, ""),
                "home_path": labels.get(L_HOME_PATH, ""),
                "image": row["Image"],
            }
        )
    return rows


def _state_home(row: dict) -> Optional[Path]:
    """The home whose locks and leases say whether a cluster is in use: this install's, or another
    install's that is still on this machine; None when that install's state is gone."""
    if row["home"] == home_id():
        return Home.current().path
    path = row["home_path"]
    if path and Path(path).is_dir() and home_id(Path(path)) == row["home"]:
        return Path(path)
    return None


def _may_remove(row: dict, home: Optional[Path]) -> tuple[bool, Optional[_ClusterLock]]:
    """(whether no live run owns the cluster and no node runs in it, its busy lock: held when
    given, to release once the cluster is gone)."""
    running = row["state"] == "running"
    if home is not None:
        owners = {row["run_id"]} | cluster_users(row["name"], home)
        if running and any(run_is_live(r, home) for r in owners):
            return False, None
        try:
            lock = _ClusterLock(row["name"], home)
            if not lock.try_acquire():
                return False, None  # a node is running in it right now
        except OSError:
            pass  # another user's home, not writable here: the cluster says below
        else:
            if running and _detached_busy(row["name"], home):
                lock.release()
                return False, None  # a detached node (a deferred Airflow task) is running in it
            return True, lock
    # The install's state is gone (or not ours to lock): only the cluster can say whether a node runs.
    return not (running and _busy_inside(row["name"])), None


def gc_clusters(dry_run: bool = False, homes: str = "own") -> list[dict]:
    """Remove skyvm containers that no live run owns and no node is running in; the rows removed.

    ``homes``: "own" (this install's), "all" (every install's on this engine), or one install's id
    (a prefix of it will do). Another install's are judged by its own home's locks and leases when
    that home is still on this machine, else by asking the cluster whether a node runs in it.
    """
    removed = []
    for row in list_managed(all_homes=homes != "own"):
        if homes not in ("own", "all") and not row["home"].startswith(homes):
            continue
        home = _state_home(row)
        removable, lock = _may_remove(row, home)
        if not removable:
            continue
        try:
            if not dry_run:
                docker("rm", "--force", row["name"], check=False)
                if home is not None:
                    with contextlib.suppress(OSError):  # another user's home may not be writable here
                        _users_file(row["name"], home).unlink(missing_ok=True)
            removed.append(row)
        finally:
            if lock is not None:
                lock.release()
    return removed


def gc(dry_run: bool = False) -> list[str]:
    """Remove this install's skyvm containers that no live run owns and no node is running in: their names."""
    return [row["name"] for row in gc_clusters(dry_run)]


def gc_images(keep: int = 2, dry_run: bool = False) -> list[str]:
    """Remove old node images (every source or requirements change makes one), keeping the newest ``keep``."""
    if not docker_available():
        return []
    out = docker("images", "--filter", "label=dev.skyvm.image=node", "--format", "{{.ID}} {{.Repository}}:{{.Tag}} {{.CreatedAt}}")
    by_id: dict[str, list] = {}
    for line in out.stdout.splitlines():
        image_id, ref, created = line.split(" ", 2)
        by_id.setdefault(image_id, [created, []])[1].append(ref)
    in_use = set(docker("ps", "-a", "--format", "{{.Image}}").stdout.split())
    removed = []
    for image_id, (created, refs) in sorted(by_id.items(), key=lambda kv: kv[1][0], reverse=True)[keep:]:
        if in_use & set(refs):
            continue
        if not dry_run:
            docker("rmi", "--force", *refs, check=False)
        removed += refs
    return removed


_backend = None
_backend_lock = threading.Lock()


def local_backend():
    """The process's local backend: Docker when an engine answers, else plain processes."""
    global _backend
    with _backend_lock:
        if _backend is None:
            if docker_available():
                _backend = DockerBackend()
            elif os.environ.get("SKYVM_REQUIRE_DOCKER"):
                raise InfrastructureError("SKYVM_REQUIRE_DOCKER is set but no Docker engine is reachable")
            else:
                _backend = ProcessBackend()
        return _backend
