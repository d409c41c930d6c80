"""floor: what a trivial node costs on the local backend, against docker itself on the same image.

- skyvm cold: each node in its own ``skyvm.Run`` with ``down: true`` and a signature of its own
  (a fresh cluster: container start, ``setup``, the node's exec, payload and result through the
  store), timed from ``submit`` to ``result()``; the run's close (the container's removal) is
  timed apart ("+ teardown").
- docker run --rm: ``docker run --rm --network host IMAGE python3 -c pass`` (start, run, remove).
- skyvm warm: nodes one after another in one long-lived ``Run`` whose warm cluster (one per
  parallel lane, ``max_clusters``) is reused: each node a child forked by the cluster's agent.
- skyvm warm, exec path: the same with ``SKYVM_AGENT=0`` when its clusters start (every node a
  ``docker exec`` of the node runtime, as before the agent).
- docker exec: ``docker exec CONTAINER python3 -c pass`` into a running container of the image.

Same image (skyvm's node image, built through skyvm first, not timed), same parallelism
(``--set parallel=P``, default 1: nodes one after another). Two more rows explain the floor:
skyvm's cold steps done by hand with the docker CLI, and the node runtime's import in a warm
container.

Targets (issue 19): cold at most +50 ms median over docker run --rm; warm at most 0.5x docker exec.
"""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from bench import scenario
from bench.common import build_node_image, need_docker, sh


def _lanes(parallel: int, n: int, fn) -> None:
    """fn(i) for i in range(n), `parallel` at a time."""
    if parallel <= 1:
        for i in range(n):
            fn(i)
        return
    with ThreadPoolExecutor(parallel) as pool:
        for _ in pool.map(fn, range(n)):
            pass


@scenario(
    "floor",
    env="core",
    help="trivial nodes cold and warm vs docker run --rm / docker exec on the same image",
    n=20,
    reps=3,
    smoke_n=2,
    options={"parallel": 1},
)
def floor(b) -> None:
    need_docker()
    import skyvm

    from bench import nodefns

    parallel = max(1, b.opt("parallel", 1))
    b.params["skyvm"] = skyvm.__version__
    image = build_node_image(b)
    docker_run = ["docker", "run", "--rm", "--network", "host", *b.baseline_labels(), image]

    # The exec baseline's containers: one per lane, as the warm arm has one cluster per lane.
    execs = []
    for lane in range(parallel):
        cid = sh("docker", "run", "--detach", "--rm", "--init", "--network", "host", *b.baseline_labels(), image, "sleep", "infinity").stdout.strip()
        execs.append(cid)
    b.on_exit(lambda: sh("docker", "rm", "-f", *execs, check=False))

    warm = skyvm.Run({"defaults": {"labels": b.labels(kind="warm"), "max_clusters": parallel}})
    b.on_exit(warm.close)
    warm_exec = skyvm.Run({"defaults": {"labels": b.labels(kind="warm-exec"), "max_clusters": parallel}})
    b.on_exit(warm_exec.close)

    def warm_node(i: int) -> None:
        t0 = time.perf_counter()
        value = warm.submit(nodefns.square, i, node="warm").result(600)
        b.add("skyvm warm", time.perf_counter() - t0)
        b.check(value == i * i, f"warm node {i} returned {value!r}")

    def warm_exec_node(i: int) -> None:
        t0 = time.perf_counter()
        value = warm_exec.submit(nodefns.square, i, node="warm").result(600)
        b.add("skyvm warm, exec path", time.perf_counter() - t0)
        b.check(value == i * i, f"warm exec-path node {i} returned {value!r}")

    def cold_node(i: int) -> None:
        # Its own run and its own signature: nothing warm can serve it.
        config = {"defaults": {"labels": b.labels(kind="cold", node=uuid.uuid4().hex[:12])}}
        t0 = time.perf_counter()
        run = skyvm.Run(config)
        try:
            value = run.submit(nodefns.square, i, node="cold").result(600)
            t1 = time.perf_counter()
        finally:
            run.close()
        t2 = time.perf_counter()
        b.add("skyvm cold", t1 - t0)
        b.add("skyvm cold + teardown", t2 - t0)
        b.check(value == i * i, f"cold node {i} returned {value!r}")

    def run_rm(i: int) -> None:
        with b.timed("docker run --rm"):
            sh(*docker_run, "python3", "-c", "pass")

    def exec_pass(i: int) -> None:
        with b.timed("docker exec"):
            sh("docker", "exec", execs[i % parallel], "python3", "-c", "pass")

    def by_hand(i: int) -> None:
        # What skyvm's cold path does, with the docker CLI alone: start, setup, exec, remove.
        t0 = time.perf_counter()
        cid = sh("docker", "run", "--detach", "--rm", "--init", "--network", "host", *b.baseline_labels(), image, "sleep", "infinity").stdout.strip()
        try:
            sh("docker", "exec", cid, "python3", "-m", "skyvm.node", "check")
            sh("docker", "exec", cid, "python3", "-c", "pass")
            b.add("docker by hand: run -d + setup exec + exec", time.perf_counter() - t0)
        finally:
            sh("docker", "rm", "-f", cid, check=False)

    def runtime_import(i: int) -> None:
        with b.timed("docker exec: import skyvm.node"):
            sh("docker", "exec", execs[i % parallel], "python3", "-c", "import skyvm.node")

    # Warm-up, not counted: the warm clusters, the docker CLI's and the page cache's first runs.
    _lanes(parallel, parallel, lambda i: warm.submit(nodefns.noop, node="warm").result(600))
    # The exec path's clusters start without an agent (the setting is read when a cluster starts).
    os.environ["SKYVM_AGENT"] = "0"
    try:
        _lanes(parallel, parallel, lambda i: warm_exec.submit(nodefns.noop, node="warm").result(600))
    finally:
        del os.environ["SKYVM_AGENT"]
    _lanes(parallel, parallel, lambda i: sh("docker", "exec", execs[i], "python3", "-c", "pass"))
    sh(*docker_run, "python3", "-c", "pass")

    def arm(fn):
        return lambda rep: _lanes(parallel, b.n, fn)

    b.alternate(
        {
            "skyvm cold": arm(cold_node),
            "docker run --rm": arm(run_rm),
            "skyvm warm": arm(warm_node),
            "docker exec": arm(exec_pass),
            "skyvm warm, exec path": arm(warm_exec_node),
        }
    )
    # The explaining rows: fewer samples suffice.
    explain_n = max(1, min(b.n, 5))
    b.alternate({"by hand": lambda rep: _lanes(parallel, explain_n, by_hand), "import": lambda rep: _lanes(parallel, explain_n, runtime_import)})

    cold = b.delta_ms("skyvm cold - docker run --rm", "skyvm cold", "docker run --rm")
    b.delta_ms("skyvm cold + teardown - docker run --rm", "skyvm cold + teardown", "docker run --rm")
    warm_ratio = b.ratio("skyvm warm / docker exec", "skyvm warm", "docker exec")
    b.ratio("docker exec: import skyvm.node / docker exec", "docker exec: import skyvm.node", "docker exec")
    b.ratio("skyvm warm, exec path / docker exec", "skyvm warm, exec path", "docker exec")
    b.ratio("skyvm warm / skyvm warm, exec path", "skyvm warm", "skyvm warm, exec path")
    b.target(
        "cold over docker run --rm",
        cold,
        "<=",
        50,
        "ms",
        "skyvm's cold path is docker create + start with the agent as the container's first process, the agent's "
        "interpreter start and the node runtime's import, one fork, and the result through the store; "
        "docker run --rm is one container start running python3 -c pass",
    )
    b.target(
        "warm / docker exec",
        warm_ratio,
        "<=",
        0.5,
        "x",
        "a warm node is a message over the cluster's agent channel and a fork of its warm interpreter: no exec, "
        "no interpreter start, no import ('skyvm warm, exec path' is the same node through a docker exec)",
    )
