"""Benchmark: how long a node takes on the local backend, cold (new cluster) and warm (exec on a free cluster).

    ./dev run core -- python bench/local_latency.py [--repeat 10]

Prints the median and spread of wall time from submit to result for a trivial
node. The image is built first (once per content hash) and not counted.
``python -m bench floor`` measures the same against docker itself, with a JSON record.
"""

from __future__ import annotations

import argparse
import statistics
import time

import skyvm


def noop():
    return 1


def timed(run: skyvm.Run, node: str, options: dict) -> float:
    t0 = time.perf_counter()
    run.submit(noop, node=node, options=options).result()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    with skyvm.Run() as run:  # the node image built (once per content hash) outside the timings
        run.submit(noop, node="image").result()
    cold, warm = [], []
    for i in range(args.repeat):
        with skyvm.Run() as run:
            # A fresh signature each round forces a new cluster.
            options = {"cpus": 1, "labels": {"round": str(i)}}
            cold.append(timed(run, "cold", options))
            warm.append(timed(run, "warm", options))
    for name, xs in (("cold (start cluster + setup + run)", cold), ("warm (exec on a free cluster)", warm)):
        print(f"{name:<38} median {statistics.median(xs):.3f}s  min {min(xs):.3f}s  max {max(xs):.3f}s  (n={len(xs)})")


if __name__ == "__main__":
    main()
