"""A Prefect flow on skyvm: every task runs in its own container, with its own resources.

    ./dev run prefect -- python dags/prefect_flow.py

- `count_words` fans out with `.map()` (settings: the file's defaults)
- `crunch` is heavier: `nodes.crunch` in skyvm.yaml gives it the `heavy` profile
- `report` gets both results downstream, with `skyvm_options` in code
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from prefect_skyvm import SkyVMTaskRunner, skyvm_options
from skyvm.limits import container_limits

SETTINGS = Path(__file__).with_name("skyvm.yaml")


@task
def count_words(text: str) -> dict:
    return {"words": len(text.split()), "limits": container_limits()}


@task
def crunch(n: int) -> dict:
    return {"sum_of_squares": sum(i * i for i in range(n)), "limits": container_limits()}


@task
def report(counts: list[dict], crunched: dict) -> dict:
    return {"total_words": sum(c["words"] for c in counts), "sum_of_squares": crunched["sum_of_squares"], "limits": container_limits()}


@flow(task_runner=SkyVMTaskRunner(SETTINGS), log_prints=True)
def word_pipeline(texts: list[str]) -> dict:
    counts = count_words.map(texts)
    crunched = crunch.submit(1_000_000)
    with skyvm_options(cpus=0.5, memory=0.25):
        summary = report.submit(counts, crunched)
    rows = [("count_words", c.result()["limits"]) for c in counts]
    rows += [("crunch", crunched.result()["limits"]), ("report", summary.result()["limits"])]
    for name, limits in rows:
        print(f"{name:<12} container={limits['cluster']:<38} cpus={limits['cpus']:g} memory={limits['memory_gib']:g} GiB shm={limits['shm_gib']:g} GiB")
    return {k: v for k, v in summary.result().items() if k != "limits"}


if __name__ == "__main__":
    result = word_pipeline(["the quick brown fox", "jumps over the lazy dog", "skyvm runs every task in a container"])
    print("result:", result)
