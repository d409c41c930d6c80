"""Installs sharing one Docker engine, and the cluster pool's lock: names that cannot collide, a
pool whose lock covers no engine call, and `skyvm gc`'s word on other installs.

The two installs running side by side with real processes are a fault trial
(tests/faults: ``test_two_installs_on_one_engine_never_share_a_cluster``)."""

from __future__ import annotations

import threading

import pytest

from skyvm import NodeCancelled, cli
from skyvm.backends import local
from skyvm.plan import MAX_NAME, plan_node
from skyvm.pool import ClusterPool
from skyvm.settings import NodeSettings

BOUND_S = 60  # how long a step that must not wait on the engine may take before the test calls it blocked


def spec(settings=None, run_id="run-1", node="n"):
    return plan_node(
        settings or NodeSettings(max_clusters=2),
        node=node, run_id=run_id, attempt_id=f"{node}-a1", payload_url="file:///p", result_url="file:///r", image="img:1",
    )


def test_a_release_and_a_free_cluster_are_not_held_up_while_a_claim_asks_the_engine():
    pool = ClusterPool()
    first, fresh = pool.acquire(spec())
    assert fresh and first.busy
    asking, answer = threading.Event(), threading.Event()

    def slow_claim(_spec, _known):
        asking.set()
        answer.wait()  # the engine is slow to answer (a listing, a `docker exec` in a cluster)
        return None

    claimed = {}
    claimer = threading.Thread(target=lambda: claimed.update(zip(("cluster", "fresh"), pool.acquire(spec(node="slow"), claim_warm=slow_claim))))
    claimer.start()
    try:
        assert asking.wait(BOUND_S)
        # While that claim waits on the engine: a node ends and frees its cluster, and the next node takes it.
        freed = threading.Thread(target=pool.free, args=(first.name,))
        freed.start()
        freed.join(BOUND_S)
        assert not freed.is_alive(), "free() waited for another node's engine call"
        taken = {}
        taker = threading.Thread(target=lambda: taken.update(zip(("cluster", "fresh"), pool.acquire(spec(node="next")))))
        taker.start()
        taker.join(BOUND_S)
        assert not taker.is_alive(), "a free cluster was not handed out while another node's engine call ran"
        assert (taken["cluster"].name, taken["fresh"]) == (first.name, False)
    finally:
        answer.set()
        claimer.join(BOUND_S)
    # The slow claim found nothing warm: it got the next free name, a fresh start, within max_clusters=2.
    assert claimed["fresh"] and claimed["cluster"].name == spec().cluster_name_for(1)


def test_the_limit_counts_nodes_whose_cluster_is_still_being_looked_for():
    pool = ClusterPool()
    asking, answer = threading.Event(), threading.Event()

    def slow_claim(_spec, _known):
        asking.set()
        answer.wait()
        return None

    one = NodeSettings(max_clusters=1)
    holder = threading.Thread(target=pool.acquire, args=(spec(one),), kwargs={"claim_warm": slow_claim})
    holder.start()
    assert asking.wait(BOUND_S)
    # The one slot is reserved by the node asking the engine: a second node waits, and a cancel ends its wait.
    cancel = threading.Event()
    with pytest.raises(NodeCancelled, match="node 'second' was cancelled while queued for a cluster"):
        threading.Timer(0.2, cancel.set).start()
        pool.acquire(spec(one, node="second"), cancelled=cancel.is_set, wake_s=0.05)
    answer.set()
    holder.join(BOUND_S)
    assert [pool.get(n).busy for n in pool.names()] == [True]  # one cluster: the limit held


def test_a_freed_cluster_goes_to_a_queued_node_past_one_cancelled_meanwhile():
    """A freed cluster wakes one queued node, not all of them (a map of hundreds queued on a few clusters
    woke every one at each release); one that finds itself cancelled passes the wake on, so the next
    node takes the cluster now, not at its next periodic look (wake_s, 10 minutes here)."""
    pool = ClusterPool()
    one = NodeSettings(max_clusters=1)
    held, _ = pool.acquire(spec(one, node="holder"))
    looked = {"b": threading.Semaphore(0), "c": threading.Semaphore(0)}
    cancel_b = threading.Event()
    got = {}

    def queue(name, cancel=None):
        def cancelled():  # asked under the pool's lock, just before the node waits
            looked[name].release()
            return cancel is not None and cancel.is_set()

        try:
            got[name] = pool.acquire(spec(one, node=name), cancelled=cancelled, wake_s=600)
        except NodeCancelled as exc:
            got[name] = exc

    b = threading.Thread(target=queue, args=("b", cancel_b), daemon=True)
    b.start()
    assert looked["b"].acquire(timeout=BOUND_S)
    c = threading.Thread(target=queue, args=("c",), daemon=True)  # daemon: a lost wake fails the test, not hangs it
    c.start()
    assert looked["c"].acquire(timeout=BOUND_S)
    cancel_b.set()  # no wake: b finds out when the freed cluster wakes it, the longest waiting
    pool.free(held.name)
    b.join(BOUND_S)
    c.join(BOUND_S)
    assert isinstance(got["b"], NodeCancelled)
    assert "c" in got, "the queued node was not woken when the node ahead of it gave up"
    assert (got["c"][0].name, got["c"][1]) == (held.name, False)


def test_a_local_cluster_name_carries_its_install_and_stays_valid(tmp_path, monkeypatch):
    s = spec(NodeSettings(), run_id="x" * 80)
    mine = local.local_cluster_name(s, 0)
    assert mine.endswith("-" + local.home_id()[:8]) and len(mine) <= MAX_NAME
    assert local.local_cluster_name(s, 12).endswith(local.home_id()[:8] + "-12") and len(local.local_cluster_name(s, 12)) <= MAX_NAME
    monkeypatch.setenv("SKYVM_HOME", str(tmp_path))  # another install: equal settings, another name
    assert local.local_cluster_name(s, 0) != mine


def test_gc_of_another_install_takes_a_well_formed_id(capsys):
    with pytest.raises(SystemExit):
        cli.main(["gc", "--home-id", "not-an-id"])
    assert "Invalid value for '--home-id': 'not-an-id' is not an install's id: 4 to 12 hex digits" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["gc", "--home-id", "abcd", "--all-homes"])  # one or the other
    assert "Invalid value for --all-homes: not allowed with --home-id" in capsys.readouterr().err
