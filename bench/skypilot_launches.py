"""skypilot: how many SkyPilot calls and launches nodes cost on the SkyPilot backend.

SkyPilot is reached as from an engine's environment without it: through ``SubprocessBridge``
to the recording stand-in VM of the tests (``tests/skypilot/standin-python`` as
``SKYVM_SKYPILOT_PYTHON``, answered by ``tests/skypilot/standin_vm.py`` in SkyPilot's own
environment: each task parsed by SkyPilot, the node image pulled from a registry with the
task's own secrets, the job run in that container). Every call lands in ``calls.jsonl``; the
scenario counts them per arm. A registry (Debian's docker-registry) and moto's S3 server
(the payload store) run on loopback.

- warm: N nodes one after another in one ``Run`` with ``down: false``, K signatures (node i
  has signature i % K): must make exactly K launches; the N - K warm nodes go to each cluster's
  agent over its SSH connection (issue 20: the stand-in VM runs Debian's sshd), no SkyPilot job and,
  once the connection is open, no bridge call: the payload inline, the result read back over SSH
  (no payload store round trip);
- warm-exec: the same with agents off (``SKYVM_AGENT=0``): each warm node a ``sky exec``, as
  before issue 20 and as on a cluster without SSH; beside the channel in the same run;
- cold: N nodes, each in its own ``Run`` with ``down: true`` and a signature of its own:
  N launches and N downs (what the warm policy saves).

Each repetition's warm arm uses signatures of its own, so it launches afresh.

Targets: exactly K launches for the warm arm (issue 18); ``sky_jobs_per_warm_node`` = 0 and
``warm_dispatch_ms`` (a warm node's submit to result, median) <= 100 on the stand-in's loopback SSH
(issue 20). Each is a series in the results JSON, for both arms. Run from the core environment:
``./dev run core -- python -m bench skypilot`` (SkyPilot's environment must exist:
``./dev run skypilot -- true``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from bench import scenario
from bench.common import ROOT, Skip, need_docker, sh, start_moto, start_registry

STANDIN = ROOT / "tests" / "skypilot" / "standin-python"
NOT_BRIDGE_CALLS = {"docker_login"}  # recorded by the stand-in VM itself, not asked through the bridge


def _calls(state: Path) -> list[dict]:
    path = state / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@scenario(
    "skypilot",
    env="core",
    help="SkyPilot calls per node and launches per signature, against the recording stand-in VM",
    n=10,
    reps=2,
    smoke_n=2,
    options={"signatures": 2},
)
def skypilot_launches(b) -> None:
    import importlib.util

    need_docker()
    if importlib.util.find_spec("sky") is not None:
        raise Skip("run it from an environment without SkyPilot (./dev run core -- python -m bench skypilot): the point is the bridge")
    sky_python = os.environ.get("SKYVM_TEST_SKYPILOT_PYTHON") or str(ROOT / ".dev" / "venv" / "skypilot" / "bin" / "python")
    if not Path(sky_python).is_file():
        raise Skip(f"no SkyPilot environment at {sky_python} (./dev run skypilot -- true, or set SKYVM_TEST_SKYPILOT_PYTHON)")
    import skyvm

    from bench import nodefns

    k = max(1, min(b.opt("signatures", 2), b.n))
    if b.smoke and "signatures" not in b.explicit:
        k = 1
    b.params["signatures"] = k
    state = Path(tempfile.mkdtemp(prefix="skyvm-bench-standin-"))
    os.environ.update({"SKYVM_SKYPILOT_PYTHON": str(STANDIN), "SKYVM_TEST_SKYPILOT_PYTHON": sky_python, "SKYVM_STANDIN_DIR": str(state)})

    def remove_vms() -> None:
        left = sh("docker", "ps", "-aq", "--filter", f"label=dev.skyvm.standin={state}", check=False).stdout.split()
        if left:
            sh("docker", "rm", "-f", *left, check=False)
        shutil.rmtree(state, ignore_errors=True)

    b.on_exit(remove_vms)
    s3 = start_moto(b)
    registry = start_registry(b)
    os.environ["SKYVM_S3_ENDPOINT_URL"] = s3

    def settings(down: bool, **labels: str) -> dict:
        return {
            "defaults": {
                "backend": "skypilot",
                "cloud": "aws",
                "payload_store": f"s3://skyvm-bench/{b.session}-sky",
                "payload_store_endpoint": s3,
                "registry": registry,
                "down": down,
                "idle_minutes_to_autostop": 10,
                "labels": b.labels(**labels),
            }
        }

    # Warm-up, not counted: the node image built and pushed, SkyPilot imported on the other side.
    t0 = time.perf_counter()
    with skyvm.Run(settings(True, arm="warmup")) as run:
        b.check(run.submit(nodefns.noop, node="warmup").result(900) == 1, "the warm-up node failed")
    print(f"  node image pushed, stand-in VM up and down in {time.perf_counter() - t0:.1f} s (not counted)", flush=True)

    def count(arm: str, before: int) -> None:
        calls = _calls(state)[before:]
        kinds = [c["call"] for c in calls]
        bridge = [c for c in kinds if c not in NOT_BRIDGE_CALLS]
        b.add(f"{arm}: launches", kinds.count("launch"), "count")
        b.add(f"{arm}: execs", kinds.count("exec"), "count")
        b.add(f"{arm}: downs", kinds.count("down"), "count")
        b.add(f"{arm}: bridge calls per node", len(bridge) / b.n, "count")
        return kinds

    def warm_arm(arm: str, agents: bool):
        def warm(rep: int) -> None:
            os.environ["SKYVM_AGENT"] = "1" if agents else "0"
            before = len(_calls(state))
            sig = f"r{rep}-{uuid.uuid4().hex[:6]}"
            t0 = time.perf_counter()
            with skyvm.Run(settings(False, arm=arm, rep=sig)) as run:
                for i in range(b.n):
                    t1 = time.perf_counter()
                    value = run.submit(nodefns.square, i, node=f"{arm}-{i}", options={"labels": {"sig": str(i % k)}}).result(900)
                    took = time.perf_counter() - t1
                    b.add(f"{arm}: per node", took)
                    if i >= k:  # the first node of each signature launched its cluster; the rest are warm
                        b.add(f"{arm}: warm_dispatch_ms", took * 1000, "ms", note="a warm node's submit to result, median")
                    b.check(value == i * i, f"{arm} node {i} returned {value!r}")
            b.add(f"{arm}: {b.n} nodes", time.perf_counter() - t0)
            kinds = count(arm, before)
            if b.n > k:
                b.add(f"{arm}: sky_jobs_per_warm_node", kinds.count("exec") / (b.n - k), "count", note="SkyPilot jobs a warm node cost")
            b.check(kinds.count("launch") == k, f"{arm}: {kinds.count('launch')} launches for {k} signatures")
            b.check(kinds.count("exec") == (0 if agents else b.n - k), f"{arm}: {kinds.count('exec')} execs for {b.n - k} warm nodes")
            os.environ.pop("SKYVM_AGENT", None)

        return warm

    def cold(rep: int) -> None:
        before = len(_calls(state))
        t0 = time.perf_counter()
        for i in range(b.n):
            t1 = time.perf_counter()
            with skyvm.Run(settings(True, arm="cold", node=uuid.uuid4().hex[:8])) as run:
                value = run.submit(nodefns.square, i, node=f"cold-{i}").result(900)
            b.add("cold: per node (with its down)", time.perf_counter() - t1)
            b.check(value == i * i, f"cold node {i} returned {value!r}")
        b.add(f"cold: {b.n} nodes", time.perf_counter() - t0)
        kinds = count("cold", before)
        b.check(kinds.count("launch") == b.n and kinds.count("down") == b.n, f"cold: {kinds.count('launch')} launches, {kinds.count('down')} downs for {b.n} nodes")

    b.alternate({"warm": warm_arm("warm", True), "warm-exec": warm_arm("warm-exec", False), "cold": cold})
    b.ratio(f"warm / cold, {b.n} nodes", f"warm: {b.n} nodes", f"cold: {b.n} nodes")
    b.ratio("warm dispatch: agent over SSH / sky exec", "warm: warm_dispatch_ms", "warm-exec: warm_dispatch_ms")
    launches = b.series["warm: launches"].values
    worst = max(launches, key=lambda v: abs(v - k))
    b.target(
        f"warm: launches for {b.n} nodes of {k} signatures (worst repetition)",
        worst,
        "==",
        k,
        "count",
        "a node launched where a warm cluster of its signature was free",
    )
    if b.n > k:
        b.target("warm: sky_jobs_per_warm_node", b.med("warm: sky_jobs_per_warm_node"), "==", 0, "count", "a warm node was a SkyPilot job, not a message to its cluster's agent")
        b.target("warm: warm_dispatch_ms (median)", b.med("warm: warm_dispatch_ms"), "<=", 100, "ms", "a warm node over the SSH channel took longer than one loopback round trip and a fork should")
