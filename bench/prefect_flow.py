"""prefect: one flow mapping N trivial tasks, on SkyVMTaskRunner and on Prefect's own runners.

Against a real Prefect API (``prefect_test_harness``: a temporary server, as the Prefect test
suite uses), the same flow (``square.map(range(N))``, results checked) runs with:

- SkyVMTaskRunner cold: ``down: true``: each flow run starts its clusters (up to skyvm's
  default ``max_clusters`` = 4 for the one signature) and removes them at its end;
- SkyVMTaskRunner warm: ``down: false``: the clusters a first (uncounted) flow run left are
  reused by every later flow run;
- ThreadPoolTaskRunner and ProcessPoolTaskRunner (Prefect's defaults for each).

- SkyVMTaskRunner warm, body mode: ``prefect_engine: false`` (Prefect's engine in the flow's
  process, the function body on the node).

Wall time of the flow call, alternately. Target (issue 19): SkyVMTaskRunner warm (engine mode,
``prefect_engine: true``) at most 1.3x ThreadPoolTaskRunner, with 20 and with 200 tasks (``--n 200``; the cluster per
task arm is left out above 50 tasks). Run it in the Prefect environment:
``./dev run prefect -- python -m bench prefect``.
"""

from __future__ import annotations

import time

from bench import scenario
from bench.common import CpuMeter, Skip, build_node_image, need_docker, package_version

# What a process per task costs before it does anything: an interpreter that imported Prefect's engine (as a
# cluster's agent has) forks a child that exits at once, parent's and child's CPU together, per fork.
FORK_FLOOR = """
import gc, os, sys
import prefect, prefect.task_engine, prefect.flow_engine
gc.collect(); gc.freeze()
n = int(sys.argv[1]); t0 = os.times()
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
t1 = os.times()
print((t1.user + t1.system + t1.children_user + t1.children_system - t0.user - t0.system - t0.children_user - t0.children_system) / n)
"""


def fork_floor_ms(n: int) -> float:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FORK_FLOOR, str(n)], check=True, capture_output=True, text=True).stdout
    return 1000 * float(out.split()[-1])


# Seconds of quiet before each measured flow (see run_flow).
SETTLE_S = 3.0
# The arms whose CPU per task the bench reports (a cold arm's containers are gone before it is read).
CPU_ARMS = ("SkyVMTaskRunner warm", "ThreadPoolTaskRunner")


@scenario(
    "prefect",
    env="prefect",
    help="a flow mapping N trivial tasks: SkyVMTaskRunner cold and warm vs ThreadPool and ProcessPool",
    n=20,
    reps=3,
    smoke_n=2,
)
def prefect_bench(b) -> None:
    import os

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # task-run lines for every node drown the table
    try:
        from prefect import flow, task
        from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
        from prefect.testing.utilities import prefect_test_harness

        from prefect_skyvm import SkyVMTaskRunner
    except ImportError as exc:
        raise Skip(f"needs Prefect and prefect_skyvm (./dev run prefect -- python -m bench prefect): {exc}") from None
    need_docker()
    from bench import nodefns

    b.params["prefect"] = package_version("prefect")
    build_node_image(b)
    square = task(nodefns.square, name="square")

    @flow(name="bench-fan-out", log_prints=False)
    def fan_out(n: int) -> list:
        return [f.result() for f in square.map(range(n))]

    runners = {
        "SkyVMTaskRunner cold": lambda: SkyVMTaskRunner({"defaults": {"labels": b.labels(kind="cold"), "down": True, "prefect_engine": True}}),
        "SkyVMTaskRunner warm": lambda: SkyVMTaskRunner({"defaults": {"labels": b.labels(keep=True, kind="warm"), "down": False, "idle_minutes_to_autostop": 10, "prefect_engine": True}}),
        # The same with a warm cluster per task (max_clusters: N): no task queues for a cluster.
        "SkyVMTaskRunner warm, N clusters": lambda: SkyVMTaskRunner(
            {"defaults": {"labels": b.labels(keep=True, kind="warm-n"), "down": False, "idle_minutes_to_autostop": 10, "max_clusters": b.n, "prefect_engine": True}}
        ),
        # Prefect's engine in the flow's process, only the function body on the node (prefect_engine: false).
        "SkyVMTaskRunner warm, body mode": lambda: SkyVMTaskRunner(
            {"defaults": {"labels": b.labels(keep=True, kind="warm-body"), "down": False, "idle_minutes_to_autostop": 10, "prefect_engine": False}}
        ),
        "ThreadPoolTaskRunner": ThreadPoolTaskRunner,
        "ProcessPoolTaskRunner": ProcessPoolTaskRunner,
    }
    if b.n > 50:
        # A cluster per task is for small maps: 200 clusters on one machine measure the machine, not skyvm.
        runners.pop("SkyVMTaskRunner warm, N clusters")

    meter = CpuMeter(b)
    b.add("CPU per fork and exit, an interpreter with Prefect imported", fork_floor_ms(20 if b.smoke else 200), unit="ms/task")

    def run_flow(name: str, counted: bool = False) -> float:
        # Every flow starts against a server done with the one before: the temporary server's SQLite answers a
        # flow run's creation with "database is locked" (a 503, which Prefect's client retries after 2 s) while it
        # still writes the previous flow's last task runs, whichever runner ran that flow.
        time.sleep(SETTLE_S if not b.smoke else 0)
        before = meter.read()
        t0 = time.perf_counter()
        result = fan_out.with_options(task_runner=runners[name]())(b.n)
        elapsed = time.perf_counter() - t0
        b.check(result == [i * i for i in range(b.n)], f"{name}: the flow returned {result!r}")
        if counted and name in CPU_ARMS:
            # Where the flow's time went, per task: the three parts share the machine's cores.
            for part, seconds in meter.spent(before, meter.read()).items():
                if seconds is not None:
                    b.add(f"CPU per task, {name}: {part}", 1000 * seconds / b.n, unit="ms/task")
            # And the server's whole work on the flow: a runner whose flow ends first leaves part of it for later.
            server = meter.spent(before, meter.after_quiet())[CpuMeter.CHILDREN]
            if server is not None:
                b.add(f"CPU per task, {name}: API server, during the flow and after it until idle", 1000 * server / b.n, unit="ms/task")
        return elapsed

    with prefect_test_harness(server_startup_timeout=180):
        # Uncounted: the API's first flow run, and the warm clusters started.
        for name in ("ThreadPoolTaskRunner", "SkyVMTaskRunner warm", "SkyVMTaskRunner warm, N clusters", "SkyVMTaskRunner warm, body mode"):
            if name not in runners:
                continue
            print(f"  warm-up {name}: {run_flow(name):.2f} s (not counted)", flush=True)

        def arm(name: str):
            return lambda rep: b.add(name, run_flow(name, counted=True))

        b.alternate({name: arm(name) for name in runners})

    b.ratio("SkyVM warm / ThreadPool", "SkyVMTaskRunner warm", "ThreadPoolTaskRunner")
    if "SkyVMTaskRunner warm, N clusters" in runners:
        b.ratio("SkyVM warm, N clusters / ThreadPool", "SkyVMTaskRunner warm, N clusters", "ThreadPoolTaskRunner")
    b.ratio("SkyVM warm, body mode / ThreadPool", "SkyVMTaskRunner warm, body mode", "ThreadPoolTaskRunner")
    b.ratio("SkyVM cold / ThreadPool", "SkyVMTaskRunner cold", "ThreadPoolTaskRunner")
    b.ratio("SkyVM warm / ProcessPool", "SkyVMTaskRunner warm", "ProcessPoolTaskRunner")
    b.target(
        "SkyVMTaskRunner warm (default max_clusters 4) / ThreadPoolTaskRunner",
        b.med("SkyVMTaskRunner warm") / b.med("ThreadPoolTaskRunner"),
        "<=",
        1.3,
        "x",
        "each task runs Prefect's own engine in a child of a warm cluster's agent (no exec, no import), on one of 4 "
        "warm clusters: one of the agent's spares, forked while the cluster was idle with the pages nodes write "
        "already faulted in (skyvm.spares), for the first 6 tasks a cluster takes after idle, a child forked then "
        "for the rest; its events and API logs go through the flow's process (relayed over the agent's channel, "
        "as ProcessPoolTaskRunner relays its subprocesses'), its settings are validated once per cluster; what is "
        "left is a process per task: the payload pickled and unpickled, the engine's own work in a new interpreter "
        "state, and nodes one at a time per cluster, on 2 cores shared with the API server. The CPU per task rows "
        "say where it goes: ThreadPoolTaskRunner's flow process runs each task's engine in a few ms and leaves most "
        "of the server's work on its events for after the flow's end; skyvm's flow process, nodes and server each "
        "spend more than that, and the server takes one of the 2 cores meanwhile; 1.3x of threads then leaves the "
        "other core about 7 ms a task for the flow's process and the node together, less than a fork and exit "
        "(its row) plus the engine's own work (what threads spend)",
    )
