"""Benchmark: the cost of a SkyPilot call from an engine's environment that cannot import SkyPilot.

    ./dev run core -- python -m bench bridge [--reps 4]
    ./dev run core -- python bench/skypilot_bridge.py [--calls 5] [--skypilot-python PATH]   (the original script)

Each call is an optimizer request (``optimize``: real SkyPilot, the repo's test catalogs, no
network) through ``SubprocessBridge``. Compares one long-lived SkyPilot-side process for all
calls (what skyvm does) with a fresh process per call (what a naive bridge does: SkyPilot's
import, several seconds of CPU, paid every time). The scenario alternates the two, a call each
per repetition, after a first (uncounted in the comparison) call that starts the long-lived one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the bench package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import scenario  # noqa: E402
from bench.common import Skip  # noqa: E402

CATALOG = Path(__file__).resolve().parents[1] / "tests" / "skypilot" / "catalog"
TASK = {"name": "bench", "run": "true", "resources": {"infra": "aws", "cpus": "4+", "memory": "16+"}}


def default_python():
    from skyvm.skypilot.bridge import skypilot_python

    candidate = os.environ.get("SKYVM_TEST_SKYPILOT_PYTHON") or str(Path(__file__).resolve().parents[1] / ".dev" / "venv" / "skypilot" / "bin" / "python")
    return candidate if Path(candidate).exists() else skypilot_python()


def catalog_env(runtime: str) -> dict:
    shutil.copytree(CATALOG, Path(runtime) / ".sky" / "catalogs" / "v8")
    return {**os.environ, "SKY_RUNTIME_DIR": runtime, "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}


@scenario(
    "bridge",
    env="core",
    help="a SkyPilot call through one long-lived SkyPilot process vs a process per call",
    n=1,
    reps=4,
    smoke_n=1,
    n_means="calls per arm and repetition",
)
def bridge_scenario(b) -> None:
    from skyvm.skypilot.bridge import SubprocessBridge

    python = default_python()
    if not python:
        raise Skip("no SkyPilot environment: ./dev run skypilot -- true, or set SKYVM_TEST_SKYPILOT_PYTHON")
    runtime = tempfile.mkdtemp(prefix="skyvm-bench-bridge-")
    b.on_exit(lambda: shutil.rmtree(runtime, ignore_errors=True))
    env = catalog_env(runtime)
    persistent = SubprocessBridge(python, env=env)
    b.on_exit(persistent.close)
    with b.timed("long-lived process: first call (starts it, imports SkyPilot)"):
        (answer,) = persistent.optimize([TASK])
    b.check(bool(answer.get("instance_type")), f"the optimizer placed nothing: {answer}")
    b.params["picked"] = f"{answer.get('instance_type')} in {answer.get('region')} at ${answer.get('hourly_price')}/h"

    def long_lived(rep: int) -> None:
        for _ in range(b.n):
            with b.timed("long-lived process: a call"):
                (got,) = persistent.optimize([TASK])
            b.check(got == answer, "the long-lived process answered differently")

    def per_call(rep: int) -> None:
        for _ in range(b.n):
            one_off = SubprocessBridge(python, env=env)
            t0 = time.perf_counter()
            try:
                (got,) = one_off.optimize([TASK])
            finally:
                one_off.close()
            b.add("a process per call: a call", time.perf_counter() - t0)
            b.check(got == answer, "a fresh process answered differently")

    b.alternate({"long-lived": long_lived, "per call": per_call})
    b.ratio("a process per call / long-lived", "a process per call: a call", "long-lived process: a call")


def main() -> None:
    from skyvm.skypilot.bridge import SubprocessBridge

    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--skypilot-python", default=default_python())
    args = parser.parse_args()
    if not args.skypilot_python:
        raise SystemExit("no SkyPilot environment: ./dev run skypilot -- true, or pass --skypilot-python")

    with tempfile.TemporaryDirectory() as runtime:
        env = catalog_env(runtime)

        persistent = []
        bridge = SubprocessBridge(args.skypilot_python, env=env)
        try:
            for _ in range(args.calls):
                t0 = time.perf_counter()
                (answer,) = bridge.optimize([TASK])
                persistent.append(time.perf_counter() - t0)
        finally:
            bridge.close()

        fresh = []
        for _ in range(args.calls):
            one_off = SubprocessBridge(args.skypilot_python, env=env)
            t0 = time.perf_counter()
            try:
                one_off.optimize([TASK])
            finally:
                one_off.close()
            fresh.append(time.perf_counter() - t0)

    print(f"picked: {answer.get('instance_type')} in {answer.get('region')} at ${answer.get('hourly_price')}/h")
    print(f"one long-lived process: first call {persistent[0]:.2f} s, then median {statistics.median(persistent[1:] or persistent):.2f} s per call")
    print(f"a process per call:     median {statistics.median(fresh):.2f} s per call")
    print(f"{args.calls} calls: {sum(persistent):.1f} s vs {sum(fresh):.1f} s")


if __name__ == "__main__":
    main()
