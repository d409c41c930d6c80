"""scale: many nodes in flight from one launching process: its peak memory and threads.

Each measurement is a fresh child process (``python -m bench.scale --child MODE N``), since a
process's peak resident memory (VmHWM) only grows. The child imports skyvm, then submits N
nodes at once in one ``skyvm.Run`` and waits for every result, while a sampler thread reads
``threading.active_count()`` and /proc/self/status (Threads, VmRSS) every 10 ms:

- process: the local backend's process fallback (the child gets ``DOCKER_HOST`` pointing nowhere
  and no ``SKYVM_REQUIRE_DOCKER``): every node a plain process on this host; default 1,000 nodes.
  Every node waits until the launcher has submitted the last one (a file it then makes), so all
  N are in flight at once; ``--set sleep=S`` holds them S seconds more.
- docker: the local backend on Docker with skyvm's default ``max_clusters`` (``--set
  max_clusters=K`` to change): nodes queue for clusters; default 100 nodes (``--set docker_n=``).

Every result is checked (node i returns i*i). A node process of the fallback holds about 12 MiB
of its own: the child caps N to what 60% of the available memory holds, and cancels the nodes
if available memory falls under 1.5 GiB, saying so (this machine is shared).

Targets (issue): launching process at most 300 MiB peak RSS and at most 50 threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from bench import scenario
from bench.common import ROOT, BenchError, Sampler, docker_ok, peak_rss_mib, rss_mib

MARK = "BENCH-SCALE-RESULT "
NODE_MIB = 12  # a fallback node process's own memory, measured here (Pss ~11.6 MiB)


def _mem_available_mib() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def child(mode: str, n: int, sleep: float, session: str, max_clusters: int) -> dict:
    baseline_rss = rss_mib()
    import skyvm

    from bench import nodefns

    after_import = rss_mib()
    notes = []
    if mode == "process":
        room = int(_mem_available_mib() * 0.6 / NODE_MIB)
        if n > room:
            notes.append(f"capped {n} nodes to {room}: 60% of the available memory holds {room} node processes of ~{NODE_MIB} MiB")
            n = room
    defaults = {"labels": {"skyvm-bench": session}}
    if max_clusters:
        defaults["max_clusters"] = max_clusters
    aborted = False
    # Every node waits for this file, made once the last node is submitted: all N are in flight at once.
    # In the store directory, which the local backend mounts into its containers at the same path.
    from pathlib import Path

    barrier = Path(os.environ["SKYVM_HOME"]) / "store" / f"all-submitted-{session}-{mode}"
    barrier.parent.mkdir(parents=True, exist_ok=True)
    barrier.unlink(missing_ok=True)
    with Sampler() as sampler:
        t0 = time.perf_counter()
        with skyvm.Run({"defaults": defaults}) as run:
            handles = [run.submit(nodefns.after, str(barrier), i, node=f"n{i}") for i in range(n)]
            t_submit = time.perf_counter() - t0
            if sleep:
                time.sleep(sleep)
            barrier.touch()
            while not all(h.done() for h in handles):
                if mode == "process" and _mem_available_mib() < 1536:
                    aborted = True
                    notes.append("available memory fell under 1.5 GiB: nodes cancelled")
                    for h in handles:
                        h.cancel()
                    break
                time.sleep(0.05)
            right = sum(1 for i, h in enumerate(handles) if h.done() and not h.exception() and h.result() == i * i)
            clusters = sorted({h.cluster or "" for h in handles})
        wall = time.perf_counter() - t0
    barrier.unlink(missing_ok=True)
    return {
        "mode": mode,
        "n": n,
        "right": right,
        "aborted": aborted,
        "submit_s": t_submit,
        "wall_s": wall,
        "rss_start_mib": baseline_rss,
        "rss_after_import_mib": after_import,
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_sampled_mib": sampler.peak_rss,
        "peak_threads": sampler.peak_threads,
        "peak_python_threads": sampler.peak_py_threads,
        "process_fallback": bool(clusters) and all(c.startswith("process-") for c in clusters),
        "clusters": len(clusters),
        "notes": notes,
    }


def _spawn(b, mode: str, n: int) -> dict:
    env = dict(os.environ)
    if mode == "process":
        env["DOCKER_HOST"] = "unix:///nonexistent"
        env.pop("SKYVM_REQUIRE_DOCKER", None)
    cmd = [sys.executable, "-m", "bench.scale", "--child", mode, str(n), str(b.opt("sleep", 0.0)), b.session, str(b.opt("max_clusters", 0))]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in out.stdout.splitlines() if line.startswith(MARK)]
    if out.returncode != 0 or not lines:
        raise BenchError(f"scale child ({mode}, {n}) failed (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK) :])


@scenario(
    "scale",
    env="core",
    help="1,000 nodes in flight on the process fallback and 100 on Docker: the launcher's peak RSS and threads",
    n=1000,
    reps=1,
    smoke_n=20,
    options={"docker_n": 100, "sleep": 0.0, "max_clusters": 0},
)
def scale(b) -> None:
    from bench.common import build_node_image

    docker_n = b.opt("docker_n", 100) if (not b.smoke or "docker_n" in b.explicit) else 4
    b.params["docker_n"] = docker_n
    modes = {"process": b.n}
    if docker_ok() and docker_n > 0:
        build_node_image(b)  # the children find it built
        modes["docker"] = docker_n
    else:
        b.note("docker arm skipped: no Docker engine")

    def arm(mode: str, n: int):
        def go(rep: int) -> None:
            r = _spawn(b, mode, n)
            for note in r["notes"]:
                b.note(f"{mode}: {note}")
            b.check(r["right"] == r["n"], f"{mode}: {r['right']} of {r['n']} results right")
            b.check(r["process_fallback"] == (mode == "process"), f"{mode}: ran on the wrong backend ({r['clusters']} clusters)")
            b.params[f"{mode}_n_run"] = r["n"]
            b.add(f"{mode}: peak RSS", r["peak_rss_mib"], "MiB")
            b.add(f"{mode}: RSS after import", r["rss_after_import_mib"], "MiB")
            b.add(f"{mode}: peak threads", r["peak_threads"], "count")
            b.add(f"{mode}: peak threading.active_count", r["peak_python_threads"], "count")
            b.add(f"{mode}: submit all", r["submit_s"])
            b.add(f"{mode}: all results", r["wall_s"])

        return go

    b.alternate({mode: arm(mode, n) for mode, n in modes.items()})
    for mode, n in modes.items():
        s_rss, s_thr = b.series[f"{mode}: peak RSS"].values, b.series[f"{mode}: peak threads"].values
        b.target(f"{mode} ({b.params.get(f'{mode}_n_run', n)} nodes): launcher peak RSS", max(s_rss), "<=", 300, "MiB",
                 "every node keeps its payload, its handle, its log lines and its threads' stacks in the launcher")
        b.target(f"{mode} ({b.params.get(f'{mode}_n_run', n)} nodes): launcher peak threads", max(s_thr), "<=", 50, "count",
                 "a thread per node in flight (the handle's driver, polling its job; queued nodes too) "
                 "plus a log pump per running node")


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    mode, n, sleep, session, max_clusters = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], int(sys.argv[6])
    print(MARK + json.dumps(child(mode, n, sleep, session, max_clusters)), flush=True)
