"""An engine-neutral example on skyvm.submit: three nodes, each in its own container with its own limits.

Run it with `./dev demo` (or `./dev run core -- python dags/submit_example.py`).
Resources come from dags/skyvm.yaml, the same settings file the Prefect and
Airflow examples read.
"""

from __future__ import annotations

import time
from pathlib import Path

import skyvm
from skyvm.limits import container_limits

SETTINGS = Path(__file__).with_name("skyvm.yaml")


def count_words(text: str) -> dict:
    """A light node: counts words."""
    return {"words": len(text.split()), "limits": container_limits()}


def crunch(n: int) -> dict:
    """A heavier node with its own profile: sums squares."""
    total = sum(i * i for i in range(n))
    return {"sum_of_squares": total, "limits": container_limits()}


def describe(limits: dict) -> str:
    cpus = "unlimited" if limits["cpus"] is None else f"{limits['cpus']:g}"
    mem = "unlimited" if limits["memory_gib"] is None else f"{limits['memory_gib']:g} GiB"
    return f"cpus={cpus} memory={mem} shm={limits['shm_gib']:g} GiB gpus={len(limits['gpus'])}"


def main() -> None:
    t0 = time.time()
    with skyvm.Run(SETTINGS) as run:
        handles = [
            run.submit(count_words, "the quick brown fox jumps over the lazy dog", node="count_words"),
            run.submit(count_words, "skyvm runs every node in its own container", node="count_words"),
            run.submit(crunch, 2_000_000, node="crunch"),
            # The warm-pool profile (pool: {workers: 2}): its two clusters start ahead, so even the
            # first of these nodes finds its cluster up; on a cloud that skips a VM's minutes-long start.
            *(run.submit(count_words, text, node="pooled", options={"profile": "warm-pool"}) for text in ("warm one", "warm two", "warm three")),
        ]
        rows = []
        for h in handles:
            out = h.result()
            limits = out.pop("limits")
            requested = {k: v for k, v in h.settings.public_dump().items() if k in ("cpus", "memory", "accelerators", "docker_run_args") and v}
            rows.append((h.node, requested, h.cluster, describe(limits), f"{h.duration_s:.2f}s", out))
    print()
    print(f"{'node':<12} {'requested':<50} {'container':<36} {'limits seen inside':<46} {'time':<7} result")
    for node, requested, cluster, seen, duration, result in rows:
        req = ", ".join(f"{k}={v}" for k, v in requested.items())
        print(f"{node:<12} {req:<50} {cluster:<36} {seen:<46} {duration:<7} {result}")
    pooled = [h for h in handles if h.node == "pooled"]
    print(f"\npool warm-pool: {len(pooled)} nodes on {len({h.cluster for h in pooled})} clusters started ahead; "
          f"cold starts among them: {sum(1 for h in pooled if h.ref.fresh)}")
    print(f"all nodes done in {time.time() - t0:.1f}s; clusters torn down with the run (down: true)")


if __name__ == "__main__":
    main()
