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

import fcntl
import json
import logging
import os
import shlex
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from skyvm.backends.base import Job, JobState, JobStatus, LogSink
from skyvm import redact
from skyvm.errors import InfrastructureError, UnsatisfiableRequest
from skyvm.payloads import DEFAULT_HOME
from skyvm.plan import TaskSpec

log = logging.getLogger("skyvm.local")

LABEL = "dev.skyvm"
L_MANAGED = f"{LABEL}.managed"
L_RUN = f"{LABEL}.run-id"
L_NODE = f"{LABEL}.node"
L_SIG = f"{LABEL}.signature"
L_DOWN = f"{LABEL}.down"
L_OWNER = f"{LABEL}.owner-pid"
# Which skyvm home (state directory: locks, run leases) started a container: gc only
# judges containers whose locks and leases it can see.
L_HOME = f"{LABEL}.home"


def home_id() -> str:
    import hashlib

    return hashlib.sha256(str(DEFAULT_HOME.resolve()).encode()).hexdigest()[:12]


def _docker_env(config: Optional[str] = None) -> dict:
    # skyvm's own docker config dir: registry logins never touch the user's ~/.docker.
    env = dict(os.environ)
    env["DOCKER_CONFIG"] = config or str(DEFAULT_HOME / "docker")
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


def _process_status(job: Job) -> JobStatus:
    """A job driven by a local process (docker exec, or the runtime itself): done once it exited and its log is drained."""
    rc = job.backend_data["proc"].poll()
    if rc is None or job.backend_data["pump"].is_alive():
        return JobStatus(JobState.RUNNING)
    if job.backend_data["cancelled"]:
        return JobStatus(JobState.CANCELLED, rc)
    return JobStatus(JobState.SUCCEEDED if rc == 0 else JobState.FAILED, rc)


@dataclass
class _Cluster:
    name: str
    signature: str
    down: bool
    runs: set = field(default_factory=set)


class _ClusterLock:
    """Whether a cluster is busy, across processes: an flock held while a node runs in it."""

    def __init__(self, name: str):
        d = DEFAULT_HOME / "locks"
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / f"{name}.lock"
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


def run_lease(run_id: str) -> Path:
    """A run is live while the process that owns it is: gc spares its clusters."""
    d = DEFAULT_HOME / "runs"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{run_id}.json"


def _users_file(cluster: str) -> Path:
    d = DEFAULT_HOME / "clusters"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{cluster}.runs"


def add_cluster_user(cluster: str, run_id: str) -> None:
    """Remember which runs used a cluster: a warm cluster reused by a live run is that run's too."""
    with open(_users_file(cluster), "a") as fh:
        fh.write(run_id + "\n")


def cluster_users(cluster: str) -> set[str]:
    try:
        return set(_users_file(cluster).read_text().split())
    except OSError:
        return set()


def _detached_marker(cluster: str) -> Path:
    d = DEFAULT_HOME / "clusters"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{cluster}.detached"


def _detached_busy(cluster: str) -> bool:
    """Whether a detached attempt still runs in the cluster. Asks inside only when one was ever started there."""
    marker = _detached_marker(cluster)
    if not marker.exists():
        return False
    busy = docker("exec", cluster, "python3", "-m", "skyvm.node", "busy", check=False, timeout=60).returncode == 0
    if not busy:
        marker.unlink(missing_ok=True)
    return busy


def run_is_live(run_id: str) -> bool:
    try:
        pid = json.loads(run_lease(run_id).read_text())["pid"]
        os.kill(pid, 0)
        return True
    except (OSError, ValueError, KeyError):
        return False


class DockerBackend:
    """Clusters are containers on this machine's Docker engine."""

    name = "local"

    def __init__(self):
        self._lock = threading.Lock()
        self._sems: dict[str, threading.BoundedSemaphore] = {}
        self._clusters: dict[str, _Cluster] = {}

    # -- clusters ----------------------------------------------------------

    def _login_and_pull(self, spec: TaskSpec) -> None:
        """Fresh registry login before every cluster start and every exec (tokens expire), then pull."""
        reg = spec.registry
        if reg is None or not spec.image.startswith(reg.server.rstrip("/") + "/"):
            return
        from skyvm.connectors.files import private_dir, remove

        # The login lives in a private config directory for this pull only: no password stays on disk.
        config = private_dir("skyvm-docker-")
        try:
            if spec.registry_auth:
                user, password = spec.registry_auth
                try:
                    docker("login", "--username", user, "--password-stdin", reg.server, input=password, config=str(config))
                except InfrastructureError as exc:
                    raise InfrastructureError(
                        f"node {spec.node!r}: registry {reg.server} refused the login of {user} ({redact.redact(str(exc))}); "
                        "fix registry.password (or the registry's connector)"
                    ) from None
            docker("pull", "--quiet", spec.image, config=str(config))
        finally:
            remove(config)

    def _live_containers(self, signature: str) -> list[str]:
        out = docker("ps", "--filter", f"label={L_SIG}={signature}", "--filter", "status=running", "--format", "{{.Names}}")
        return [n for n in out.stdout.split() if n]

    def _start_cluster(self, spec: TaskSpec, name: str) -> None:
        s = spec.settings
        args = ["run", "--detach", "--rm", "--name", name, "--init", "--env", f"SKYVM_CLUSTER={name}"]
        labels = {
            L_MANAGED: "1",
            L_RUN: spec.run_id,
            L_NODE: spec.node,
            L_SIG: spec.signature,
            L_DOWN: str(s.down).lower(),
            L_OWNER: str(os.getpid()),
            L_HOME: home_id(),
            **{f"{LABEL}.user.{k}": v for k, v in s.labels.items()},
        }
        for key, value in labels.items():
            args += ["--label", f"{key}={value}"]
        user_args = list(spec.docker_run_args)
        if not any(a == "--network" or a.startswith(("--network=", "--net=")) for a in user_args):
            # A node reaches loopback services as it would reach them from its VM.
            args += ["--network", "host"]
        if s.cpus:
            args += ["--cpus", str(_gib(s.cpus))]
        if s.memory:
            mem = f"{int(_gib(s.memory) * 1024)}m"
            # No swap beyond the limit: a node sees the memory a VM of that size has.
            args += ["--memory", mem, "--memory-swap", mem]
        store = s.payload_store or str(DEFAULT_HOME / "store")
        if "://" not in store or store.startswith("file://"):
            # The VM would reach a directory store through a mount; here the same path is bind-mounted.
            path = store.removeprefix("file://")
            Path(path).mkdir(parents=True, exist_ok=True)
            args += ["--volume", f"{path}:{path}"]
        minutes = s.idle_minutes_to_autostop
        watch = ["python3", "-m", "skyvm.node", "idle-watch"] + (["--minutes", str(minutes)] if minutes is not None else [])
        idle_poll = os.environ.get("SKYVM_IDLE_POLL_S")
        if idle_poll:
            args += ["--env", f"SKYVM_IDLE_POLL_S={idle_poll}"]
        docker(*args, *user_args, spec.image, *watch)
        setup = docker("exec", name, "sh", "-c", spec.setup, check=False)
        if setup.returncode != 0:
            docker("rm", "--force", name, check=False)
            raise InfrastructureError(f"setup failed on cluster {name} (exit {setup.returncode}): {(setup.stderr or setup.stdout).strip()[-2000:]}")

    def _acquire(self, spec: TaskSpec) -> tuple[str, _ClusterLock]:
        """A free warm cluster of the spec's signature, else a new one. Blocks at the per-signature limit."""
        with self._lock:
            sem = self._sems.setdefault(spec.signature, threading.BoundedSemaphore(spec.settings.max_clusters))
        sem.acquire()
        try:
            with self._lock:
                live = self._live_containers(spec.signature)
                for name in live:
                    lock = _ClusterLock(name)
                    if lock.try_acquire():
                        # The container may have just hit autostop, or run a detached attempt nobody holds a lock for.
                        if docker("inspect", "--format", "{{.State.Running}}", name, check=False).stdout.strip() == "true" and not _detached_busy(name):
                            self._track(spec, name)
                            return name, lock
                        lock.release()
                # Names being started by this process count as taken too.
                taken = set(docker("ps", "-a", "--format", "{{.Names}}").stdout.split()) | set(self._clusters)
                slot = 0
                while spec.cluster_name_for(slot) in taken:
                    slot += 1
                name = spec.cluster_name_for(slot)
                lock = _ClusterLock(name)
                lock.try_acquire()
                # Reserve the name before the slow start, so parallel launches pick other slots.
                self._track(spec, name)
            try:
                log.info("starting cluster %s for node %s", name, spec.node)
                self._start_cluster(spec, name)
            except BaseException:
                lock.release()
                with self._lock:
                    self._clusters.pop(name, None)
                raise
            return name, lock
        except BaseException:
            sem.release()
            raise

    def _track(self, spec: TaskSpec, name: str) -> None:
        cluster = self._clusters.setdefault(name, _Cluster(name, spec.signature, spec.settings.down))
        cluster.runs.add(spec.run_id)
        add_cluster_user(name, spec.run_id)

    # -- the three methods -------------------------------------------------

    def launch(self, spec: TaskSpec, on_log: LogSink) -> Job:
        check_satisfiable(spec)
        self._login_and_pull(spec)
        name, lock = self._acquire(spec)
        try:
            self._login_and_pull(spec)  # exec on a warm cluster re-logs in too (tokens expire)
            env = {**os.environ, **spec.envs, **spec.secrets}
            exec_args = ["docker", "exec", "-i"]
            for key in [*spec.envs, *spec.secrets]:
                exec_args += ["-e", key]  # names only: values travel in the environment, never on a command line
            exec_args += [name, "sh", "-c", spec.run]
            proc = subprocess.Popen(exec_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**_docker_env(), **env}, text=True, bufsize=1)
        except BaseException:
            self._free(spec, name, lock)
            raise
        job = Job(spec=spec, cluster=name, backend_data={"proc": proc, "lock": lock, "cancelled": False, "freed": False})
        pump = threading.Thread(target=self._pump, args=(job, on_log), daemon=True, name=f"skyvm-log-{spec.node}")
        job.backend_data["pump"] = pump
        pump.start()
        return job

    # -- detached attempts (nobody waits on the process: Airflow's deferrable mode) --

    def launch_detached(self, spec: TaskSpec) -> dict:
        """Start the run with ``docker exec --detach``; its log and exit code stay in the container. Returns where it runs."""
        check_satisfiable(spec)
        self._login_and_pull(spec)
        name, lock = self._acquire(spec)
        try:
            self._login_and_pull(spec)
            _detached_marker(name).write_text(spec.attempt_id)
            exec_args = ["exec", "--detach"]
            for key in [*spec.envs, *spec.secrets]:
                exec_args += ["-e", key]
            subprocess.run(
                ["docker", *exec_args, name, "sh", "-c", spec.run + " --detached"],
                env={**_docker_env(), **spec.envs, **spec.secrets},
                check=True,
                capture_output=True,
            )
            # Hold the cluster's lock until the attempt shows up inside, so no other node takes the cluster meanwhile.
            deadline = time.time() + 30
            while time.time() < deadline and not self.detached_status({"cluster": name, "attempt_id": spec.attempt_id}).detail.startswith("known"):
                time.sleep(0.1)
        except subprocess.CalledProcessError as exc:
            raise InfrastructureError(f"docker exec failed on {name}: {exc.stderr.decode(errors='replace')[-2000:]}") from None
        finally:
            self._free(spec, name, lock)
        return {"cluster": name}

    def detached_status(self, ref: dict) -> JobStatus:
        cluster, attempt_id = ref["cluster"], ref["attempt_id"]
        out = docker("exec", cluster, "python3", "-m", "skyvm.node", "status", "--attempt", attempt_id, check=False, timeout=60)
        if out.returncode != 0:
            return JobStatus(JobState.FAILED, None, f"cluster {cluster} is gone or unreachable: {(out.stderr or out.stdout).strip()[-500:]}")
        state = json.loads(out.stdout)
        if state["running"]:
            return JobStatus(JobState.RUNNING, None, "known")
        if state["rc"] is None:
            return JobStatus(JobState.PENDING, None, "known" if state["known"] else "not started")
        rc = state["rc"]
        if rc == 143:
            return JobStatus(JobState.CANCELLED, rc, "known")
        return JobStatus(JobState.SUCCEEDED if rc == 0 else JobState.FAILED, rc, "known")

    def detached_log(self, ref: dict, offset: int = 0) -> tuple[str, int]:
        cluster, attempt_id = ref["cluster"], ref["attempt_id"]
        out = subprocess.run(
            ["docker", "exec", cluster, "python3", "-m", "skyvm.node", "log", "--attempt", attempt_id, "--offset", str(offset)],
            capture_output=True,
            env=_docker_env(),
        )
        data = out.stdout if out.returncode == 0 else b""
        return data.decode(errors="replace"), offset + len(data)

    def detached_cancel(self, ref: dict) -> None:
        docker("exec", ref["cluster"], "python3", "-m", "skyvm.node", "cancel", "--attempt", ref["attempt_id"], check=False, timeout=60)

    def detached_release(self, ref: dict, down: bool) -> None:
        """The attempt is over: a ``down`` cluster goes unless another node runs in it."""
        cluster, run_id = ref["cluster"], ref["run_id"]
        if not down:
            return
        lock = _ClusterLock(cluster)
        if lock.try_acquire():
            try:
                if not _detached_busy(cluster):
                    self._remove(cluster)
            finally:
                lock.release()
        run_lease(run_id).unlink(missing_ok=True)

    def _pump(self, job: Job, on_log: LogSink) -> None:
        proc = job.backend_data["proc"]
        for line in proc.stdout:
            try:
                on_log(line.rstrip("\n"))
            except Exception:  # noqa: BLE001 - a broken log sink must not stop the node
                log.exception("log sink failed")
        proc.wait()
        self._free(job.spec, job.cluster, job.backend_data["lock"], job)

    def _free(self, spec: TaskSpec, name: str, lock: _ClusterLock, job: Optional[Job] = None) -> None:
        if job is not None:
            with self._lock:
                if job.backend_data["freed"]:
                    return
                job.backend_data["freed"] = True
        lock.release()
        self._sems[spec.signature].release()

    def check(self, job: Job) -> JobStatus:
        return _process_status(job)

    def terminate(self, job: Job) -> None:
        job.backend_data["cancelled"] = True
        proc = job.backend_data["proc"]
        if proc.poll() is None:
            # Killing the docker CLI would leave the process running in the container: stop it there.
            docker("exec", job.cluster, "python3", "-m", "skyvm.node", "cancel", "--attempt", job.spec.attempt_id, check=False, timeout=60)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        job.backend_data["pump"].join(timeout=15)
        if job.spec.settings.down:
            # A cancelled run does not keep its cluster around.
            self._remove(job.cluster)

    def release(self, run_id: str) -> None:
        with self._lock:
            mine = [c for c in self._clusters.values() if run_id in c.runs]
        for cluster in mine:
            cluster.runs.discard(run_id)
            if cluster.down and not cluster.runs:
                lock = _ClusterLock(cluster.name)
                if lock.try_acquire():  # only when no node runs in it
                    try:
                        self._remove(cluster.name)
                    finally:
                        lock.release()
        run_lease(run_id).unlink(missing_ok=True)

    def _remove(self, name: str) -> None:
        docker("rm", "--force", name, check=False)
        _users_file(name).unlink(missing_ok=True)
        _detached_marker(name).unlink(missing_ok=True)
        with self._lock:
            self._clusters.pop(name, None)


class ProcessBackend:
    """No Docker engine: run the node runtime as a plain host process, with the same contract.

    There is no isolation and no resource limit beyond what the OS gives; it
    warns once.
    """

    name = "local-process"
    needs_image = False
    _warned = False

    def __init__(self):
        if not ProcessBackend._warned:
            ProcessBackend._warned = True
            log.warning("no Docker engine reachable: the local backend runs nodes as plain processes (no container, no limits)")

    def launch(self, spec: TaskSpec, on_log: LogSink) -> Job:
        import sys

        check_satisfiable(spec)
        env = {**os.environ, **spec.envs, **spec.secrets, "PYTHONUNBUFFERED": "1", "SKYVM_NODE_STATE": str(DEFAULT_HOME / "node-state")}
        cmd = shlex.split(spec.run)
        cmd[0] = sys.executable
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, text=True, bufsize=1, start_new_session=True)
        job = Job(spec=spec, cluster=f"process-{proc.pid}", backend_data={"proc": proc, "cancelled": False})

        def pump():
            for line in proc.stdout:
                on_log(line.rstrip("\n"))
            proc.wait()

        thread = threading.Thread(target=pump, daemon=True)
        job.backend_data["pump"] = thread
        thread.start()
        return job

    def check(self, job: Job) -> JobStatus:
        return _process_status(job)

    def terminate(self, job: Job) -> None:
        import signal

        job.backend_data["cancelled"] = True
        proc = job.backend_data["proc"]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        job.backend_data["pump"].join(timeout=10)

    def release(self, run_id: str) -> None:
        run_lease(run_id).unlink(missing_ok=True)

    def launch_detached(self, spec: TaskSpec) -> dict:
        raise InfrastructureError("detached nodes (Airflow's deferrable mode) need a Docker engine; none is reachable")


def list_managed(all_states: bool = True) -> list[dict]:
    """Every container skyvm started on this engine, with its labels."""
    if not docker_available():
        return []
    args = ["ps", "--filter", f"label={L_MANAGED}=1", "--format", "{{json .}}", "--no-trunc"]
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
                "image": row["Image"],
            }
        )
    return rows


def gc(dry_run: bool = False) -> list[str]:
    """Remove skyvm containers (of this skyvm home) that no live run owns and no node is running in."""
    removed = []
    mine = home_id()
    for row in list_managed():
        if row["home"] != mine:
            continue  # another skyvm home's: its locks and leases are not ours to read
        owners = {row["run_id"]} | cluster_users(row["name"])
        if row["state"] == "running" and any(run_is_live(r) for r in owners):
            continue
        lock = _ClusterLock(row["name"])
        if not lock.try_acquire():
            continue  # a node is running in it right now
        if row["state"] == "running" and _detached_busy(row["name"]):
            lock.release()
            continue  # a detached node (a deferred Airflow task) is running in it
        try:
            if not dry_run:
                docker("rm", "--force", row["name"], check=False)
                _users_file(row["name"]).unlink(missing_ok=True)
            removed.append(row["name"])
        finally:
            lock.release()
    return removed


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
