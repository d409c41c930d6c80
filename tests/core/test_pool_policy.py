"""The one cluster policy (skyvm.pool) over any backend that keeps the contract, across processes of an install.

Two ``BackendPool``s over one ``Home`` stand for two processes of one install (an Airflow worker that
let go of its attempt and the trigger that follows it): their claims are file locks, which two
pools of one process hold apart as two processes would. The backend here keeps the contract over
an in-memory "engine" both see, so each test says exactly which clusters exist and what runs.
"""

from __future__ import annotations

import threading
from typing import Optional

import pytest

from skyvm.backends.base import Backend, ClusterGone, JobState, JobStatus, NodeRef
from skyvm.home import Home
from skyvm.plan import plan_node
from skyvm.pool import BackendPool
from skyvm.settings import NodeSettings


class Engine:
    """What both "processes" see: the clusters that exist and the attempts in them."""

    def __init__(self):
        self.lock = threading.Lock()
        self.clusters: dict[str, str] = {}  # name -> signature
        self.attempts: dict[str, Optional[int]] = {}  # attempt id -> exit code (None: running)
        self.started: list[str] = []
        self.removed: list[str] = []


class EngineBackend(Backend):
    name = "engine"
    lists_warm = True

    def __init__(self, engine: Engine):
        self.engine = engine

    def start_cluster(self, spec, name, *, on_log=None):
        with self.engine.lock:
            self.engine.clusters[name] = spec.signature
            self.engine.started.append(name)

    def run_attempt(self, spec, cluster, *, fresh=False, on_log=None, cancelled=None):
        if fresh:
            self.start_cluster(spec, cluster)
        with self.engine.lock:
            if cluster not in self.engine.clusters:
                raise ClusterGone(cluster)
            self.engine.attempts[spec.attempt_id] = None
        return NodeRef(backend=self.name, cluster=cluster, attempt_id=spec.attempt_id, node=spec.node, run_id=spec.run_id, fresh=fresh)

    def clusters(self, signature=None, running=False):
        with self.engine.lock:
            return [{"name": n} for n, sig in self.engine.clusters.items() if signature in (None, sig)]

    def remove_cluster(self, name, *, shared=False):
        with self.engine.lock:
            self.engine.clusters.pop(name, None)
            self.engine.removed.append(name)

    def status(self, ref):
        with self.engine.lock:
            if ref.cluster not in self.engine.clusters:
                return JobStatus(JobState.GONE)
            code = self.engine.attempts.get(ref.attempt_id)
        return JobStatus(JobState.RUNNING) if code is None else JobStatus(JobState.SUCCEEDED, code)

    def read_log(self, ref, offset=0):
        return "", offset

    def cancel(self, ref):
        self.finish(ref, 143)

    def finish(self, ref, code=0):
        with self.engine.lock:
            self.engine.attempts[ref.attempt_id] = code


def spec(node, run_id="run-1", **settings):
    return plan_node(
        NodeSettings(**{"max_clusters": 4, **settings}), node=node, run_id=run_id, attempt_id=f"{node}-a1",
        payload_url="file:///p", result_url="file:///r", image="img:1",
    )


@pytest.fixture
def two_processes(tmp_path):
    engine, home = Engine(), Home(tmp_path / "home")
    leases = [home.hold_run(run) for run in ("run-1", "run-2")]  # both runs live, as their Runs would hold them
    one, other = EngineBackend(engine), EngineBackend(engine)
    yield engine, BackendPool(one, home), BackendPool(other, home)
    for lease in leases:
        lease.release()


def test_an_attempt_let_go_keeps_its_cluster_from_every_process_until_it_ends(two_processes):
    engine, worker, trigger = two_processes
    ref = worker.launch(spec("deferred"))
    worker.let_go(ref)
    # Another process of the install sees the cluster, warm and of its signature, but an attempt runs there.
    beside = trigger.launch(spec("beside", run_id="run-2"))
    assert beside.cluster != ref.cluster and beside.fresh
    # So does the launching process itself, once it let go of it.
    again = worker.launch(spec("again"))
    assert again.cluster not in (ref.cluster, beside.cluster)
    # The attempt ends; whoever holds its reference releases it: the cluster (down) goes, as nothing runs there.
    trigger.backend.finish(ref)
    trigger.release(ref, down=True, discard=True)
    assert ref.cluster in engine.removed and ref.cluster not in engine.clusters


def test_a_cluster_an_ended_attempt_left_is_taken_warm_by_another_process(two_processes):
    engine, first, second = two_processes
    ref = first.launch(spec("one"))
    first.backend.finish(ref)
    first.release(ref, down=False)
    warm = second.launch(spec("two", run_id="run-2"))
    assert (warm.cluster, warm.fresh) == (ref.cluster, False) and engine.started == [ref.cluster]
    # Taken there, it is not the first process's to hand out any more, though it freed it.
    third = first.launch(spec("three"))
    assert third.cluster != ref.cluster and third.fresh


def test_a_warm_cluster_gone_at_its_autostop_is_forgotten_and_another_started(two_processes):
    engine, pool, _ = two_processes
    ref = pool.launch(spec("one"))
    pool.backend.finish(ref)
    pool.release(ref, down=False)
    engine.clusters.pop(ref.cluster)  # autostop, just as the next node takes it
    nxt = pool.launch(spec("two"))
    assert nxt.fresh and nxt.cluster in engine.clusters


def test_a_runs_end_removes_its_down_clusters_and_keeps_the_others_warm(two_processes):
    engine, pool, _ = two_processes
    down = pool.launch(spec("gone", down=True))
    kept = pool.launch(spec("kept", down=False, cpus=1))
    for ref in (down, kept):
        pool.backend.finish(ref)
        pool.release(ref, down=ref is down)
    pool.end_run("run-1")
    assert down.cluster in engine.removed and kept.cluster in engine.clusters


def test_an_attempt_whose_launcher_died_with_its_run_holds_its_cluster_no_more(tmp_path):
    engine, home = Engine(), Home(tmp_path / "home")
    lease = home.hold_run("run-1")
    crashed, other = BackendPool(EngineBackend(engine), home), BackendPool(EngineBackend(engine), home)
    ref = crashed.launch(spec("orphan"))
    assert other.launch(spec("beside", run_id="run-2")).cluster != ref.cluster  # its run lives: the cluster is taken
    lease.release()  # the launching process is killed: its run's lease goes with it
    assert other.remove_if_idle(ref.cluster) and ref.cluster in engine.removed  # nobody's now: gc's, or the next node's
