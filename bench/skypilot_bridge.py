"""Benchmark: the cost of a SkyPilot call from an engine's environment that cannot import SkyPilot.

    ./dev run core -- python bench/skypilot_bridge.py [--calls 5] [--skypilot-python PATH]

Each call is an optimizer request (``optimize``: real SkyPilot, the repo's test catalogs, no
network) through ``SubprocessBridge``. Compares one long-lived SkyPilot-side process for all
calls (what skyvm does) with a fresh process per call (what a naive bridge does: SkyPilot's
import, several seconds of CPU, paid every time). Prints wall time per call.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from skyvm.skypilot.bridge import SubprocessBridge, skypilot_python

CATALOG = Path(__file__).resolve().parents[1] / "tests" / "skypilot" / "catalog"
TASK = {"name": "bench", "run": "true", "resources": {"infra": "aws", "cpus": "4+", "memory": "16+"}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=5)
    default_python = os.environ.get("SKYVM_TEST_SKYPILOT_PYTHON") or str(Path(__file__).resolve().parents[1] / ".dev" / "venv" / "skypilot" / "bin" / "python")
    parser.add_argument("--skypilot-python", default=default_python if Path(default_python).exists() else skypilot_python())
    args = parser.parse_args()
    if not args.skypilot_python:
        raise SystemExit("no SkyPilot environment: ./dev run skypilot -- true, or pass --skypilot-python")

    with tempfile.TemporaryDirectory() as runtime:
        shutil.copytree(CATALOG, Path(runtime) / ".sky" / "catalogs" / "v8")
        env = {**os.environ, "SKY_RUNTIME_DIR": runtime, "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}

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
