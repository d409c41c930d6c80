"""skypilot: how many SkyPilot calls and launches nodes cost on the SkyPilot backend.

SkyPilot is reached as from an engine's environment without it: through ``SubprocessBridge``
to the recording stand-in VM of the tests (``tests/skypilot/standin-python`` as
``SKYVM_SKYPILOT_PYTHON``, answered by ``tests/skypilot/standin_vm.py`` in SkyPilot's own
environment: each task parsed by SkyPilot, the node image pulled from a registry with the
task's own secrets, the job run in that container). Every call lands in ``calls.jsonl``; the
scenario counts them per arm. A registry (Debian's docker-registry) and moto's S3 server
(the payload store) run on loopback.

- warm: N nodes one after another in one ``Run`` with ``down: false``, K signatures (node i
  has signature i % K): must make exactly K launches (and N - K execs);
- cold: N nodes, each in its own ``Run`` with ``down: true`` and a signature of its own:
  N launches and N downs (what the warm policy saves).

Each repetition's warm arm uses signatures of its own, so it launches afresh.

Target (issue): exactly K launches for the warm arm. Run from the core environment:
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

    def warm(rep: int) -> None:
        before = len(_calls(state))
        sig = f"r{rep}-{uuid.uuid4().hex[:6]}"
        t0 = time.perf_counter()
        with skyvm.Run(settings(False, arm="warm", rep=sig)) as run:
            for i in range(b.n):
                t1 = time.perf_counter()
                value = run.submit(nodefns.square, i, node=f"warm-{i}", options={"labels": {"sig": str(i % k)}}).result(900)
                b.add("warm: per node", time.perf_counter() - t1)
                b.check(value == i * i, f"warm node {i} returned {value!r}")
        b.add(f"warm: {b.n} nodes", time.perf_counter() - t0)
        kinds = count("warm", before)
        b.check(kinds.count("launch") + kinds.count("exec") == b.n, f"warm: {kinds.count('launch')} launches + {kinds.count('exec')} execs for {b.n} nodes")

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

    b.alternate({"warm": warm, "cold": cold})
    b.ratio(f"warm / cold, {b.n} nodes", f"warm: {b.n} nodes", f"cold: {b.n} nodes")
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
