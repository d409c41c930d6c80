"""executor-soak: SkyVMExecutor's memory over N trivial tasks, through the executor's own paths.

A scheduler keeps one SkyVMExecutor (and its skyvm Run) for its whole life, so whatever the
executor keeps per task grows without bound unless it is dropped when the task finishes. This
drives the executor object as the scheduler's loop does: ``queue_workload`` (Airflow's own
``ExecuteTask`` workload, with a token) -> ``heartbeat()`` (trigger_tasks -> a node; sync ->
finished) -> ``get_event_buffer()``, keeping ``parallelism`` tasks in flight, then ``end()``.

Each node runs a trivial command (it checks that the workload reached it) instead of the Task
SDK's ``execute_workload``: 2,000 real Airflow tasks would need a scheduler and an API server
and take far longer, and what is measured here is the executor's side, which is the same.
Settings are the executor's own (its envs, mounts, requirements, the workload as a secret);
clusters are warm (``down: false``), so each task is a ``docker exec`` on one of them.

The soak runs in a process of its own (a fresh Airflow configuration, and an RSS that holds
nothing of the scenarios before it). Its RSS (``/proc/self/status`` VmRSS, after ``gc.collect()``) every
``sample_every`` tasks: after the warm-up (the first ``warmup`` tasks, a tenth by default),
half-way and at the end; the growth per 1,000 tasks from the warm-up to the end, and over the
second half alone (bounded caches still filling early on: the growth that never stops is what
the second half shows). Also sampled: the executor's own handles, the Run's unfinished ones,
and the redaction registry's size (a running task's workload is a secret, let go when it ends).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import scenario
from bench.common import ROOT, SESSION_KEY, TESTS, BenchError, Skip, need_docker, rss_mib

# The node's check that the workload (the secret the executor gives it) arrived: nothing else.
SOAK_COMMAND = 'test -n "$SKYVM_AIRFLOW_WORKLOAD" && echo ok'
# What each sample records, besides RSS: (series, unit).
COUNTS = ("executor handles", "run handles", "redaction registry")


@scenario(
    "executor-soak",
    env="airflow",
    help="SkyVMExecutor over N trivial tasks (queue -> node -> finished): RSS after warm-up vs at the end, growth per 1,000 tasks",
    n=2000,
    reps=1,
    smoke_n=20,
    n_means="tasks",
    options={"parallelism": 4, "sample_every": 100, "warmup": 0},
)
def executor_soak(b) -> None:
    import importlib.util

    if importlib.util.find_spec("airflow") is None:
        raise Skip("needs Airflow: ./dev run airflow -- python -m bench executor-soak")
    need_docker()
    n = b.n
    every = max(1, min(b.opt("sample_every", 100), n // 4 or 1))
    warmup = min(b.opt("warmup", 0) or max(every, n // 10), n)
    params = {"n": n, "parallelism": b.opt("parallelism", 4), "sample_every": every, "warmup": warmup, "labels": b.labels(keep=True)}
    b.params.update({k: v for k, v in params.items() if k != "labels"})
    home = Path(tempfile.mkdtemp(prefix="skyvm-bench-soak-"))
    b.on_exit(lambda: __import__("shutil").rmtree(home, ignore_errors=True))
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING"),
        "AIRFLOW__SKYVM__SETTINGS_FILE": str(home / "skyvm.yaml"),
    }
    out = home / "result.json"
    proc = subprocess.run([sys.executable, "-m", "bench.executor_soak", json.dumps(params), str(out)], env=env, cwd=ROOT, timeout=4 * 3600)
    if proc.returncode != 0 or not out.exists():
        raise BenchError(f"executor-soak: the soak process exited with code {proc.returncode} (its output is above)")
    result = json.loads(out.read_text())
    for rss in result["rss"]:
        b.add("rss", rss, unit="MiB")
    for name in COUNTS:
        for value in result[name]:
            b.add(name, value, unit="count")
    b.add("wall", result["wall_s"])
    b.add("per task", result["wall_s"] / n)
    b.check(result["failed"] == [], f"failed tasks: {result['failed'][:3]}")
    b.check(result["handles_after_end"] == 0, f"the executor still holds {result['handles_after_end']} handle(s) after end()")
    rss_warm, rss_end = result["rss_after_warmup"], result["rss"][-1]
    rss_half = result.get("rss_half", rss_warm)  # n // 2 is the warm-up itself when n is small
    growth = round((rss_end - rss_warm) / (n - warmup) * 1000, 2) if n > warmup else None
    # The second half alone: caches that fill up to their own bound (re's 512 compiled patterns,
    # the allocator's arenas) still grow for a while after the warm-up; what a task keeps does not stop.
    growth_late = round((rss_end - rss_half) / (n - n // 2) * 1000, 2) if n > 1 else None
    b.params.update(rss_after_warmup_mib=round(rss_warm, 1), rss_half_mib=round(rss_half, 1), rss_end_mib=round(rss_end, 1))
    b.params.update(rss_growth_per_1000_tasks_mib=growth, rss_growth_per_1000_tasks_second_half_mib=growth_late)
    b.comparisons.append({"name": "RSS after warm-up", "kind": "figure", "value": round(rss_warm, 1), "unit": "MiB"})
    b.comparisons.append({"name": "RSS at the end", "kind": "figure", "value": round(rss_end, 1), "unit": "MiB"})
    b.comparisons.append({"name": "RSS growth per 1,000 tasks after warm-up", "kind": "figure", "value": growth, "unit": "MiB/1k tasks"})
    b.comparisons.append({"name": "RSS growth per 1,000 tasks, second half", "kind": "figure", "value": growth_late, "unit": "MiB/1k tasks"})
    if not b.smoke:
        why = "memory kept per finished task (handles, logs, secrets)"
        b.target("RSS growth per 1,000 tasks after warm-up", growth, "<=", 5.0, "MiB/1k tasks", why=why)
        b.target("RSS growth per 1,000 tasks, second half", growth_late, "<=", 1.0, "MiB/1k tasks", why=why)


def soak(params: dict, out: Path) -> None:
    """The soak itself, in its own process: Airflow is configured by the environment the scenario gave it."""
    import yaml

    home = Path(os.environ["AIRFLOW_HOME"])
    for folder in ("dags", "logs"):
        (home / folder).mkdir(exist_ok=True)
    n, parallelism, every, warmup, labels = params["n"], params["parallelism"], params["sample_every"], params["warmup"], params["labels"]
    # Warm clusters with this run's labels (the bench finds and removes them by those).
    settings = {"cpus": 0.5, "memory": 0.5, "down": False, "idle_minutes_to_autostop": 10, "max_clusters": parallelism, "labels": labels}
    Path(os.environ["AIRFLOW__SKYVM__SETTINGS_FILE"]).write_text(yaml.safe_dump({"defaults": settings}))
    sys.path.insert(0, str(TESTS / "airflow"))
    from workloads import execute_task

    from airflow_skyvm.executors.skyvm_executor import SkyVMExecutor
    from skyvm import redact

    class SoakExecutor(SkyVMExecutor):
        command = SOAK_COMMAND

    executor = SoakExecutor(parallelism=parallelism, end_timeout=120)
    executor.start()
    result: dict = {"rss": [], **{name: [] for name in COUNTS}, "failed": []}
    queued = done = 0
    t0 = time.perf_counter()

    def sample(label: str) -> float:
        gc.collect()
        rss = rss_mib()
        counts = (len(executor._handles), len(executor._run.handles), len(redact.known()))
        result["rss"].append(rss)
        for name, value in zip(COUNTS, counts):
            result[name].append(value)
        print(f"  {label}: {done} tasks done, RSS {rss:.1f} MiB, handles {counts[0]} (executor) {counts[1]} (run), {counts[2]} secrets registered ({time.perf_counter() - t0:.0f} s)", flush=True)
        return rss

    try:
        while done < n:
            # As the scheduler: queue what the open slots take, then one loop of the executor.
            while queued < n and len(executor.queued_tasks) + len(executor.running) < parallelism:
                workload = execute_task("skyvm_soak", f"t{queued}", f"soak-{labels[SESSION_KEY]}")
                executor.queue_workload(workload, session=None)
                queued += 1
            executor.heartbeat()
            for key, (state, info) in executor.get_event_buffer().items():
                done += 1
                if str(getattr(state, "value", state)) != "success":
                    result["failed"].append(f"{key.task_id}: {state} {info}")
                if done == warmup:
                    result["rss_after_warmup"] = sample("after warm-up")
                elif done == n // 2:
                    result["rss_half"] = sample("half-way")
                elif done % every == 0 and done != n:
                    sample("soak")
            if result["failed"]:
                break
            time.sleep(0.02)
        sample("end")
        result["wall_s"] = time.perf_counter() - t0
    finally:
        executor.end()
    result["handles_after_end"] = len(executor._handles)
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    soak(json.loads(sys.argv[1]), Path(sys.argv[2]))
