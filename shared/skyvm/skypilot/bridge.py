"""The one narrow interface to SkyPilot. Nothing else in skyvm imports ``sky``.

Every call takes and returns JSON-serialisable values, so the same interface
works in-process (``InProcessBridge``, when ``sky`` is importable) and across
a process boundary (``SubprocessBridge``, running ``python -m
skyvm.skypilot.bridge`` in SkyPilot's own environment: SkyPilot cannot share
an environment with Airflow >= 3.1.3 or some Prefect releases).

Calls: launch, exec, job_status, tail_logs, cancel, down, autostop, status,
jobs_launch, jobs_status, jobs_cancel, jobs_logs, optimize.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from skyvm.errors import InfrastructureError

LogSink = Callable[[str], None]
CALLS = ("launch", "exec", "job_status", "tail_logs", "cancel", "down", "autostop", "status", "jobs_launch", "jobs_status", "jobs_cancel", "jobs_logs", "optimize")
# SkyPilot's exit code of a failed job in tail_logs.
FAILED_JOB_EXIT = 100


class SkyBridge(Protocol):
    def launch(self, task: dict, cluster_name: str, *, idle_minutes_to_autostop: Optional[int], down: bool, retry_until_up: bool, dryrun: bool = False) -> dict: ...
    def exec(self, task: dict, cluster_name: str) -> dict: ...
    def job_status(self, cluster_name: str, job_id: int) -> Optional[str]: ...
    def tail_logs(self, cluster_name: str, job_id: int, on_log: Optional[LogSink] = None) -> int: ...
    def cancel(self, cluster_name: str, job_id: int) -> None: ...
    def down(self, cluster_name: str) -> None: ...
    def autostop(self, cluster_name: str, idle_minutes: int, down: bool) -> None: ...
    def status(self, cluster_names: Optional[list[str]] = None) -> list[dict]: ...
    def jobs_launch(self, task: dict, name: str) -> dict: ...
    def jobs_status(self, job_id: int) -> dict: ...
    def jobs_cancel(self, job_id: int) -> None: ...
    def jobs_logs(self, job_id: int, on_log: Optional[LogSink] = None) -> int: ...
    def optimize(self, tasks: list[dict], clouds: Optional[list[str]] = None) -> list[dict]: ...


class _LineStream:
    """A text stream that hands each complete line to a callback (for tail_logs' output_stream)."""

    def __init__(self, on_log: Optional[LogSink]):
        self.on_log = on_log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.buf = ""

    def write(self, text: str) -> int:
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            self.on_log(line)
        return len(text)

    def flush(self) -> None:
        if self.buf:
            self.on_log(self.buf)
            self.buf = ""


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

    def launch(self, task, cluster_name, *, idle_minutes_to_autostop=None, down=False, retry_until_up=False, dryrun=False):
        rid = self.sky.launch(self._task(task), cluster_name=cluster_name, idle_minutes_to_autostop=idle_minutes_to_autostop, down=down, retry_until_up=retry_until_up, dryrun=dryrun)
        job_id, handle = self.sky.stream_and_get(rid)
        return {"job_id": job_id, "cluster": cluster_name, **placement(getattr(handle, "launched_resources", None))}

    def exec(self, task, cluster_name):
        job_id, _handle = self.sky.stream_and_get(self.sky.exec(self._task(task), cluster_name=cluster_name))
        return {"job_id": job_id, "cluster": cluster_name}

    def job_status(self, cluster_name, job_id):
        statuses = self.sky.get(self.sky.job_status(cluster_name, [job_id]))
        status = statuses.get(job_id) if statuses else None
        return None if status is None else status.value

    def tail_logs(self, cluster_name, job_id, on_log=None):
        stream = _LineStream(on_log)
        # The exit code says whether the job failed (100): never ignore it.
        code = self.sky.tail_logs(cluster_name, job_id, follow=True, output_stream=stream)
        stream.flush()
        return int(code)

    def cancel(self, cluster_name, job_id):
        self.sky.get(self.sky.cancel(cluster_name, job_ids=[job_id]))

    def down(self, cluster_name):
        self.sky.get(self.sky.down(cluster_name))

    def autostop(self, cluster_name, idle_minutes, down):
        self.sky.get(self.sky.autostop(cluster_name, idle_minutes, down=down))

    def status(self, cluster_names=None):
        records = self.sky.get(self.sky.status(cluster_names))
        out = []
        for r in records:
            r = r if isinstance(r, dict) else getattr(r, "model_dump", lambda: vars(r))()
            status = r.get("status")
            out.append({"name": r.get("name"), "status": getattr(status, "value", status), "labels": r.get("labels") or {}})
        return out

    def jobs_launch(self, task, name):
        job_ids, _handle = self.sky.stream_and_get(self.sky.jobs.launch(self._task(task), name=name))
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

    def jobs_logs(self, job_id, on_log=None):
        stream = _LineStream(on_log)
        code = self.sky.jobs.tail_logs(job_id=job_id, follow=True, output_stream=stream)
        stream.flush()
        return int(code or 0)

    def optimize(self, tasks, clouds=None):
        from skyvm.skypilot import offline

        return [offline.optimize(self.sky, task, clouds=clouds) for task in tasks]


class SubprocessBridge:
    """The same calls, answered by ``python -m skyvm.skypilot.bridge`` in SkyPilot's own environment."""

    def __init__(self, python: str, env: Optional[dict] = None):
        self.python = python
        self.env = env

    def _call(self, name: str, on_log: Optional[LogSink] = None, **kwargs) -> Any:
        proc = subprocess.Popen(
            [self.python, "-m", "skyvm.skypilot.bridge", name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )
        proc.stdin.write(json.dumps(kwargs))
        proc.stdin.close()
        # Logs stream on stderr, line by line; the answer is the last stdout line.
        for line in proc.stderr:
            if on_log:
                on_log(line.rstrip("\n"))
        out = proc.stdout.read()
        proc.wait()
        lines = [l for l in out.splitlines() if l.strip()]
        if not lines:
            raise InfrastructureError(f"SkyPilot bridge call {name} gave no answer (exit {proc.returncode})")
        answer = json.loads(lines[-1])
        if "error" in answer:
            raise InfrastructureError(f"SkyPilot {name} failed: {answer['error']}")
        return answer["result"]

    def __getattr__(self, name):
        if name not in CALLS:
            raise AttributeError(name)

        def call(*args, on_log=None, **kwargs):
            names = {"launch": ("task", "cluster_name"), "exec": ("task", "cluster_name"), "job_status": ("cluster_name", "job_id"), "tail_logs": ("cluster_name", "job_id"),
                     "cancel": ("cluster_name", "job_id"), "down": ("cluster_name",), "autostop": ("cluster_name", "idle_minutes", "down"), "status": ("cluster_names",),
                     "jobs_launch": ("task", "name"), "jobs_status": ("job_id",), "jobs_cancel": ("job_id",), "jobs_logs": ("job_id",), "optimize": ("tasks", "clouds")}[name]
            kwargs.update(zip(names, args))
            return self._call(name, on_log=on_log, **kwargs)

        return call


def skypilot_python() -> Optional[str]:
    """The Python of skyvm's own SkyPilot environment (made by `skyvm skypilot install`), if there is one."""
    from skyvm.payloads import DEFAULT_HOME

    candidate = Path(os.environ.get("SKYVM_SKYPILOT_PYTHON") or DEFAULT_HOME / "skypilot-venv" / "bin" / "python")
    return str(candidate) if candidate.exists() else None


def sky_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("sky") is not None


def get_bridge() -> SkyBridge:
    """In-process when ``sky`` imports here, else SkyPilot's own environment through a subprocess."""
    try:
        return InProcessBridge()
    except ImportError:
        python = skypilot_python()
        if python is None:
            raise InfrastructureError(
                "backend 'skypilot' needs SkyPilot: `pip install 'skyvm[skypilot]'` here, or `skyvm skypilot install` "
                "to make its own environment (SkyPilot cannot share one with Airflow >= 3.1.3)"
            ) from None
        return SubprocessBridge(python)


def main() -> int:
    """Serve one call: JSON kwargs on stdin, JSON answer as the last stdout line, logs on stderr."""
    name = sys.argv[1]
    if name not in CALLS:
        print(json.dumps({"error": f"unknown call {name!r}; known: {', '.join(CALLS)}"}))
        return 2
    kwargs = json.loads(sys.stdin.read() or "{}")
    try:
        bridge = InProcessBridge()
        fn = getattr(bridge, name)
        if name in ("tail_logs", "jobs_logs"):
            kwargs["on_log"] = lambda line: print(line, file=sys.stderr, flush=True)
        result = fn(**kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure goes back as an answer
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps({"result": result}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
