"""The one narrow interface to SkyPilot. Nothing else in skyvm imports ``sky``.

Every call takes and returns JSON-serialisable values, so the same interface
works in-process (``InProcessBridge``, when ``sky`` is importable) and across
a process boundary (``SubprocessBridge``, running ``python -m
skyvm.skypilot.bridge`` in SkyPilot's own environment: SkyPilot cannot share
an environment with Airflow >= 3.1.3 or some Prefect releases).

``optimize`` is planning (``skyvm plan``, the cost cap before a launch): SkyPilot's optimizer on
its catalogs with no cloud access; the one stand-in it needs is ``_clouds_assumed_enabled``.

Calls: launch, exec, job_status, tail_logs, cancel, down, autostop, status,
jobs_launch (on a pool too), jobs_status, jobs_cancel, jobs_logs, pool_apply,
pool_status, pool_down, optimize.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from skyvm.errors import InfrastructureError

log = logging.getLogger("skyvm.skypilot")

LogSink = Callable[[str], None]
CALLS = ("launch", "exec", "job_status", "tail_logs", "cancel", "down", "autostop", "status", "jobs_launch", "jobs_status", "jobs_cancel", "jobs_logs", "optimize", "check", "api_stop", "pool_apply", "pool_status", "pool_down")
# Calls that stream a log (to stderr across the process boundary).
LOGGING_CALLS = ("launch", "exec", "tail_logs", "jobs_launch", "jobs_logs", "pool_apply")
# Every call is bounded: a SkyPilot API server that hangs must not hang a flow. Provisioning may take
# long (and retry_until_up as long as it takes); everything else answers in minutes at most.
BOUND_ENV = "SKYVM_SKYPILOT_CALL_TIMEOUT_S"
_PROVISIONING = ("launch", "exec", "jobs_launch", "pool_apply")


def call_bound(name: str, kwargs: dict) -> Optional[float]:
    """Seconds a bridge call may take (None: unbounded, only for a launch told to retry until up,
    or a log followed to its end)."""
    if os.environ.get(BOUND_ENV):
        return float(os.environ[BOUND_ENV])
    if name in _PROVISIONING:
        return None if kwargs.get("retry_until_up") else 3600.0
    if kwargs.get("follow", False) and name in ("tail_logs", "jobs_logs"):
        return None
    return 600.0


# SkyPilot's exit code of a failed job in tail_logs.
FAILED_JOB_EXIT = 100


class SkyBridge(Protocol):
    def launch(self, task: dict, cluster_name: str, *, idle_minutes_to_autostop: Optional[int], down: bool, retry_until_up: bool, dryrun: bool = False, on_log: Optional[LogSink] = None, options: Optional[dict] = None) -> dict: ...
    def exec(self, task: dict, cluster_name: str, on_log: Optional[LogSink] = None) -> dict: ...
    def job_status(self, cluster_name: str, job_id: int) -> Optional[str]: ...
    def tail_logs(self, cluster_name: str, job_id: int, on_log: Optional[LogSink] = None, follow: bool = True) -> int: ...
    def cancel(self, cluster_name: str, job_id: int) -> None: ...
    def down(self, cluster_name: str) -> None: ...
    def autostop(self, cluster_name: str, idle_minutes: int, down: bool) -> None: ...
    def status(self, cluster_names: Optional[list[str]] = None) -> list[dict]: ...
    def jobs_launch(self, task: dict, name: str, on_log: Optional[LogSink] = None, pool: Optional[str] = None) -> dict: ...
    def jobs_status(self, job_id: int) -> dict: ...
    def jobs_cancel(self, job_id: int) -> None: ...
    def jobs_logs(self, job_id: int, on_log: Optional[LogSink] = None, follow: bool = True) -> int: ...
    def optimize(self, tasks: list[dict], clouds: Optional[list[str]] = None) -> list[dict]: ...
    def check(self, clouds: Optional[list[str]] = None) -> dict: ...
    def api_stop(self) -> None: ...
    def pool_apply(self, task: dict, pool_name: str, on_log: Optional[LogSink] = None) -> None: ...
    def pool_status(self, pool_names: Optional[list[str]] = None) -> list[dict]: ...
    def pool_down(self, pool_name: str) -> None: ...


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _LineStream:
    """A text stream that hands each complete line to a callback (SkyPilot's ``output_stream``).

    Colour codes are dropped: the lines end up in Prefect's and Airflow's task logs.
    """

    def __init__(self, on_log: Optional[LogSink]):
        self.on_log = on_log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.buf = ""

    def write(self, text: str) -> int:
        self.buf += text.replace("\r", "\n")
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            line = _ANSI.sub("", line).rstrip()
            if line:
                self.on_log(line)
        return len(text)

    def isatty(self) -> bool:
        return False

    def flush(self) -> None:
        line = _ANSI.sub("", self.buf).rstrip()
        self.buf = ""
        if line:
            self.on_log(line)


def placement(resources) -> dict:
    """Where a cluster landed and its price, from SkyPilot's launched resources."""
    if resources is None:
        return {}
    try:
        return {
            "cloud": str(resources.cloud).lower(),
            "region": resources.region,
            "zone": resources.zone,
            "instance_type": resources.instance_type,
            "use_spot": bool(resources.use_spot),
            "hourly_price": round(float(resources.get_cost(3600)), 4),
        }
    except Exception:  # noqa: BLE001 - a price we cannot read is left out, not fatal
        return {}


class InProcessBridge:
    """SkyPilot's SDK in this process (requests go through its API server, local or remote)."""

    def __init__(self):
        import sky  # the only place skyvm imports SkyPilot

        self.sky = sky

    def _task(self, task: dict):
        return self.sky.Task.from_yaml_config(dict(task))

    def _stream_and_get(self, request_id, on_log):
        # The request's own log (optimizer table, provisioning) goes to the engine's log, line by line.
        stream = _LineStream(on_log)
        try:
            return self.sky.stream_and_get(request_id, output_stream=stream)
        finally:
            stream.flush()

    def launch(self, task, cluster_name, *, idle_minutes_to_autostop=None, down=False, retry_until_up=False, dryrun=False, on_log=None, options=None):
        # options: the settings' skypilot.launch pass-through, sky.launch arguments skyvm does not model.
        rid = self.sky.launch(
            self._task(task), cluster_name=cluster_name, idle_minutes_to_autostop=idle_minutes_to_autostop, down=down,
            retry_until_up=retry_until_up, dryrun=dryrun, **(options or {}),
        )
        job_id, handle = self._stream_and_get(rid, on_log)
        return {"job_id": job_id, "cluster": cluster_name, "dryrun": bool(dryrun), **placement(getattr(handle, "launched_resources", None))}

    def exec(self, task, cluster_name, on_log=None):
        job_id, _handle = self._stream_and_get(self.sky.exec(self._task(task), cluster_name=cluster_name), on_log)
        return {"job_id": job_id, "cluster": cluster_name}

    def job_status(self, cluster_name, job_id):
        statuses = self.sky.get(self.sky.job_status(cluster_name, [job_id]))
        status = statuses.get(job_id) if statuses else None
        return None if status is None else status.value

    def tail_logs(self, cluster_name, job_id, on_log=None, follow=True):
        stream = _LineStream(on_log)
        # The exit code says whether the job failed (100): never ignore it.
        code = self.sky.tail_logs(cluster_name, job_id, follow=follow, output_stream=stream)
        stream.flush()
        return int(code)

    def cancel(self, cluster_name, job_id):
        self.sky.get(self.sky.cancel(cluster_name, job_ids=[job_id]))

    def down(self, cluster_name):
        try:
            self.sky.get(self.sky.down(cluster_name))
        except self.sky.exceptions.ClusterDoesNotExist:
            pass  # already gone (or a launch that never got as far as a VM): nothing is left to pay for

    def autostop(self, cluster_name, idle_minutes, down):
        self.sky.get(self.sky.autostop(cluster_name, idle_minutes, down=down))

    def status(self, cluster_names=None):
        records = self.sky.get(self.sky.status(cluster_names))
        out = []
        for r in records:
            status = r.get("status") if isinstance(r, dict) else getattr(r, "status", None)
            get = r.get if isinstance(r, dict) else (lambda k, r=r: getattr(r, k, None))
            out.append({
                "name": get("name"),
                "status": getattr(status, "value", status),
                "labels": get("labels") or {},
                "resources": get("resources_str"),
                "autostop": get("autostop"),
                "to_down": get("to_down"),
                "launched_at": get("launched_at"),
            })
        return out

    def jobs_launch(self, task, name, on_log=None, pool=None):
        job_ids, _handle = self._stream_and_get(self.sky.jobs.launch(self._task(task), name=name, pool=pool), on_log)
        job_id = job_ids[0] if isinstance(job_ids, list) else job_ids
        return {"job_id": job_id}

    def jobs_status(self, job_id):
        result = self.sky.get(self.sky.jobs.queue_v2(refresh=False, job_ids=[job_id]))
        jobs = result[0] if isinstance(result, tuple) else result
        for job in jobs:
            job = job if isinstance(job, dict) else getattr(job, "model_dump", lambda: vars(job))()
            if job.get("job_id") == job_id:
                status = job.get("status")
                return {"status": getattr(status, "value", status), "recovery_count": job.get("recovery_count", 0)}
        return {"status": None, "recovery_count": 0}

    def jobs_cancel(self, job_id):
        self.sky.get(self.sky.jobs.cancel(job_ids=[job_id]))

    def jobs_logs(self, job_id, on_log=None, follow=True):
        stream = _LineStream(on_log)
        code = self.sky.jobs.tail_logs(job_id=job_id, follow=follow, output_stream=stream)
        stream.flush()
        return int(code or 0)

    def check(self, clouds=None):
        """SkyPilot's own credential check: {cloud: [capabilities]} of the enabled clouds."""
        result = self.sky.get(self.sky.check(tuple(clouds) if clouds else None, verbose=False))
        merged: dict = {}
        for per_cloud in (result or {}).values():
            for cloud, caps in (per_cloud or {}).items():
                merged[str(cloud).lower()] = list(caps or [])
        return merged

    def api_stop(self):
        self.sky.api_stop()

    def pool_apply(self, task, pool_name, on_log=None):
        """Make the pool (or apply the same config to it again: a rolling update changes nothing)."""
        from sky.serve import UpdateMode

        self._stream_and_get(self.sky.jobs.pool_apply(self._task(task), pool_name, mode=UpdateMode.ROLLING), on_log)

    def pool_status(self, pool_names=None):
        import yaml

        try:
            records = self.sky.get(self.sky.jobs.pool_status(pool_names)) or []
        except self.sky.exceptions.ClusterNotUpError:
            return []  # no jobs controller yet, so no pool (the first pool_apply starts one)
        out = []
        for r in records:
            # The pool's labels live in its task (the workers' resources): read them from its YAML.
            config = yaml.safe_load(r.get("pool_yaml") or "") or {}
            resources = config.get("resources") or {}
            status = r.get("status")
            out.append({
                "name": r.get("name"),
                "status": getattr(status, "value", status),
                "labels": dict(resources.get("labels") or {}) if isinstance(resources, dict) else {},
                "workers": len(r.get("replica_info") or []),
                "target_workers": r.get("target_num_replicas"),
                "resources": r.get("requested_resources_str") or "",
            })
        return out

    def pool_down(self, pool_name):
        try:
            self.sky.get(self.sky.jobs.pool_down(pool_name))
        except self.sky.exceptions.ClusterNotUpError:
            pass  # no jobs controller: no pool is left to pay for
        except ValueError as exc:
            if "not found" not in str(exc).lower() and "does not exist" not in str(exc).lower():
                raise  # a pool already gone leaves nothing to pay for

    def optimize(self, tasks, clouds=None):
        """Where SkyPilot's optimizer would put each task and its $/h (or SkyPilot's reason), from
        the catalogs of this process's SkyPilot, with no cloud access. Equal tasks are optimized once:
        a plan of 1,000 nodes of 5 signatures asks SkyPilot 5 times."""
        answers: dict[str, dict] = {}
        out = []
        for task in tasks:
            key = json.dumps(task, sort_keys=True, default=str)
            if key not in answers:
                answers[key] = self._optimize_one(task, clouds)
            out.append(answers[key])
        return out

    def _optimize_one(self, task, clouds):
        named = _clouds_named(task.get("resources") or {})
        with _clouds_assumed_enabled(self.sky, clouds or named or list(PLANNING_CLOUDS)):
            t = self._task(task)
            with self.sky.Dag() as dag:
                dag.add(t)
            try:
                self.sky.optimizer.Optimizer.optimize(dag, quiet=True)
            except Exception as exc:  # noqa: BLE001 - SkyPilot's reason is the answer
                reason = _ANSI.sub("", " ".join(str(exc).split()))
                return {"error": reason[:600] or type(exc).__name__}
            best = t.best_resources
            return {**placement(best), "accelerators": dict(best.accelerators or {})}


# The clouds a plan may place a node on when it names none (Kubernetes only when named: it has no catalog prices).
PLANNING_CLOUDS = ("aws", "gcp", "azure", "lambda")
_INFRA_CLOUD = {"k8s": "kubernetes"}
_ENABLED_LOCK = threading.Lock()


def _clouds_named(resources: dict) -> Optional[list[str]]:
    """The clouds a task's resources (each candidate over the rest) are pinned to; None when any is free."""
    candidates = resources.get("any_of") or resources.get("ordered") or [{}]
    named = set()
    for cand in candidates:
        infra = cand["infra"] if "infra" in cand else resources.get("infra")
        if not infra:
            return None
        cloud = infra.split("/")[0].lower()
        named.add(_INFRA_CLOUD.get(cloud, cloud))
    return sorted(named)


@contextlib.contextmanager
def _clouds_assumed_enabled(sky, clouds):
    """The one stand-in for cloud access in skyvm's production code, and why it is needed:
    planning must work with no credentials (a laptop, CI, a plan before an account exists), yet
    SkyPilot's optimizer asks ``sky.check`` which clouds this user may use, and that check calls
    each cloud's API. For a plan, the clouds it may place on count as enabled: the same two
    functions SkyPilot's own tests replace (their ``enable_all_clouds`` fixture). Everything else
    (catalogs, feasibility, prices, the pick) is SkyPilot's. The originals are back when the plan is
    made; the lock keeps concurrent plans in this process from restoring each other's.
    tests/skypilot/test_plan.py::test_what_planning_relies_on_in_skypilot fails loudly when a
    SkyPilot upgrade moves these."""
    import sky.check as sky_check

    registry = {"aws": sky.AWS, "gcp": sky.GCP, "azure": sky.Azure, "lambda": sky.Lambda, "kubernetes": sky.Kubernetes}
    unknown = [c for c in clouds if c not in registry]
    if unknown:
        raise ValueError(f"cannot plan for cloud(s) {unknown}; skyvm plans for {', '.join(registry)}")
    enabled = [registry[c]() for c in clouds]
    with _ENABLED_LOCK:
        saved = sky_check.get_cached_enabled_clouds_or_refresh, sky_check.check_capability
        sky_check.get_cached_enabled_clouds_or_refresh = lambda *_a, **_k: list(enabled)
        sky_check.check_capability = lambda *_a, **_k: None
        try:
            yield
        finally:
            sky_check.get_cached_enabled_clouds_or_refresh, sky_check.check_capability = saved


class _Pending:
    def __init__(self, on_log: Optional[LogSink]):
        self.on_log = on_log
        self.answer: Optional[dict] = None
        self.done = threading.Event()


class SubprocessBridge:
    """The same calls, answered in SkyPilot's own environment by one long-lived
    ``python -m skyvm.skypilot.bridge --serve`` process.

    Importing SkyPilot costs seconds of CPU; one process per bridge pays it once, not once a
    call. Calls run concurrently (a ``tail_logs`` may stream for hours while others come and
    go): each request carries an id, and the answer and log lines come back tagged with it.
    If the process dies, the calls in flight fail with its last words and the next call starts
    a new one.
    """

    def __init__(self, python: str, env: Optional[dict] = None):
        self.python = python
        self.env = env
        self._lock = threading.Lock()
        self._proc: Optional[subprocess.Popen] = None
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._stderr_tail: collections.deque = collections.deque(maxlen=20)

    def _ensure(self) -> subprocess.Popen:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = subprocess.Popen(
                    [self.python, "-m", "skyvm.skypilot.bridge", "--serve"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    bufsize=1,
                    env=self.env,
                )
                threading.Thread(target=self._read_answers, args=(self._proc,), daemon=True, name="skyvm-bridge-answers").start()
                threading.Thread(target=self._read_stderr, args=(self._proc,), daemon=True, name="skyvm-bridge-stderr").start()
            return self._proc

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            line = line.rstrip("\n")
            self._stderr_tail.append(line)
            log.debug("skypilot bridge: %s", line)

    def _read_answers(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                pending = self._pending.get(msg.get("id"))
            if pending is None:
                continue
            if "log" in msg:
                if pending.on_log:
                    pending.on_log(msg["log"])
                continue
            pending.answer = msg
            pending.done.set()
        # The process is gone: whatever it still owed fails, with its last words.
        code = proc.wait()
        with self._lock:
            orphans = [p for p in self._pending.values() if not p.done.is_set()]
        last = "\n".join(self._stderr_tail)
        for pending in orphans:
            pending.answer = {"error": f"the SkyPilot bridge process ({self.python}) exited with code {code}:\n{last}"}
            pending.done.set()

    def _call(self, name: str, /, on_log: Optional[LogSink] = None, **kwargs) -> Any:  # positional-only: jobs_launch has a name= of its own
        proc = self._ensure()
        call_id = next(self._ids)
        pending = _Pending(on_log)
        with self._lock:
            self._pending[call_id] = pending
        try:
            try:
                with self._lock:
                    proc.stdin.write(json.dumps({"id": call_id, "call": name, "kwargs": kwargs}) + "\n")
                    proc.stdin.flush()
            except (BrokenPipeError, OSError) as exc:
                raise InfrastructureError(f"the SkyPilot bridge process ({self.python}) is gone: {exc}\n" + "\n".join(self._stderr_tail)) from None
            bound = call_bound(name, kwargs)
            if not pending.done.wait(bound):
                raise InfrastructureError(
                    f"SkyPilot {name} did not answer within {bound:g}s (the bridge process {self.python}); "
                    f"set {BOUND_ENV} to wait longer. Its last words:\n" + "\n".join(self._stderr_tail)
                )
        finally:
            with self._lock:
                self._pending.pop(call_id, None)
        answer = pending.answer or {}
        if "error" in answer:
            raise InfrastructureError(f"SkyPilot {name} failed: {answer['error']}")
        return answer.get("result")

    def close(self) -> None:
        """End the bridge process (it also ends by itself when this process goes)."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __getattr__(self, name):
        if name not in CALLS:
            raise AttributeError(name)

        # Positional arguments get their names from the interface itself (SkyBridge).
        names = [p for p in inspect.signature(getattr(SkyBridge, name)).parameters if p not in ("self", "on_log")]

        def call(*args, on_log=None, **kwargs):
            kwargs.update(zip(names, args))
            return self._call(name, on_log=on_log, **kwargs)

        return call


def skypilot_python() -> Optional[str]:
    """The Python of skyvm's own SkyPilot environment (made by `skyvm skypilot install`), if there is one."""
    from skyvm.home import Home

    candidate = Path(os.environ.get("SKYVM_SKYPILOT_PYTHON") or Home.current().skypilot_venv / "bin" / "python")
    return str(candidate) if candidate.exists() else None


def sky_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("sky") is not None


def _merged(env: dict) -> dict:
    """This process's environment with a credential set's on top; a None value removes a variable."""
    return {k: v for k, v in {**os.environ, **env}.items() if v is not None}


def get_bridge(env: Optional[dict] = None) -> SkyBridge:
    """In-process when ``sky`` imports here, else SkyPilot's own environment through a subprocess.

    ``env`` (a connector set's credentials and server state) always means a subprocess: SkyPilot
    reads credentials from its process's environment, which must not be the engine's own.
    """
    try:
        if env is None:
            return InProcessBridge()
        if sky_importable() and not os.environ.get("SKYVM_SKYPILOT_PYTHON"):
            return SubprocessBridge(sys.executable, env=_merged(env))
        raise ImportError
    except ImportError:
        python = skypilot_python()
        if python is None:
            raise InfrastructureError(
                "backend 'skypilot' needs SkyPilot: `pip install 'skyvm[skypilot]'` here, or `skyvm skypilot install` "
                "to make its own environment (SkyPilot cannot share one with Airflow >= 3.1.3)"
            ) from None
        return SubprocessBridge(python, env=None if env is None else _merged(env))


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


def serve(make_bridge: Callable[[], Any]) -> int:
    """Answer calls until stdin closes: one JSON request per line in (``id``, ``call``,
    ``kwargs``), JSON lines out tagged with the request's id (``log``, then ``result`` or
    ``error``). Each call runs in its own thread, so a long ``tail_logs`` blocks nothing.

    Whatever SkyPilot (or a process it starts) prints goes to stderr: the real stdout is kept
    for the protocol alone, so a chatty call can never corrupt an answer.
    """
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out_lock = threading.Lock()

    def send(obj: dict) -> None:
        with out_lock:
            out.write(json.dumps(obj, default=str) + "\n")
            out.flush()

    try:
        bridge, broken = make_bridge(), None
    except Exception as exc:  # noqa: BLE001 - e.g. SkyPilot not importable: every call says so
        bridge, broken = None, f"{type(exc).__name__}: {exc}"
    guard = local_server_guard()
    guard_lock = threading.Lock()

    def handle(msg: dict) -> None:
        call_id, name, kwargs = msg.get("id"), msg.get("call"), dict(msg.get("kwargs") or {})
        if broken is not None:
            return send({"id": call_id, "error": broken})
        if name not in CALLS:
            return send({"id": call_id, "error": f"unknown call {name!r}; known: {', '.join(CALLS)}"})
        if name in LOGGING_CALLS:
            kwargs["on_log"] = lambda line: send({"id": call_id, "log": line})
        try:
            if guard is not None and name != "optimize":  # planning asks no server
                with guard_lock:
                    guard.check()
            result = getattr(bridge, name)(**kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure goes back as an answer
            return send({"id": call_id, "error": _ANSI.sub("", f"{type(exc).__name__}: {exc}").strip()})
        send({"id": call_id, "result": result})

    for line in sys.stdin:
        if line.strip():
            threading.Thread(target=handle, args=(json.loads(line),), daemon=True).start()
    # stdin closed: the engine's process is done with SkyPilot (or gone). Calls still in flight
    # have nobody to answer; SkyPilot's API server keeps any request it already accepted.
    out.flush()
    os._exit(0)


def main() -> int:
    if sys.argv[1:] != ["--serve"]:
        print("usage: python -m skyvm.skypilot.bridge --serve   (skyvm's SubprocessBridge runs this)", file=sys.stderr)
        return 2
    return serve(InProcessBridge)


if __name__ == "__main__":
    sys.exit(main())
