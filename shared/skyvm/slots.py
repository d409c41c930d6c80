"""The in-process book of clusters per signature: which are busy, which are free, and the limit.

Per signature (the VM and image a node needs): a free warm cluster is reused; else a new one is
named in the next free slot (``<name>``, ``<name>-1``, ...) while fewer than the node's own
``max_clusters`` of that signature are busy; else the node waits, and a cancelled node stops
waiting and never starts. Clusters are remembered per run, so a run's end releases exactly its
own. The engine is asked (through callbacks) outside the book's lock only.

Holds: ``Cluster``, ``ClusterPool`` (the book), ``slots``, ``wake_all``. ``skyvm.pool`` builds the
cluster policy on it, with the install's claims across processes.
May import: skyvm.errors, skyvm.plan only.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

from skyvm.errors import NodeCancelled
from skyvm.plan import TaskSpec


@dataclass
class Cluster:
    name: str
    signature: str
    down: bool
    busy: bool = False
    runs: set = field(default_factory=set)
    placement: dict = field(default_factory=dict)


log = logging.getLogger("skyvm.pool")

_pools: "weakref.WeakSet[ClusterPool]" = weakref.WeakSet()


def slots(spec: TaskSpec) -> int:
    """Clusters of the node's signature that may be busy at once: a pool's workers (one node each
    at a time), else the node's own ``max_clusters``."""
    pool = spec.settings.pool
    return pool.workers if pool is not None else spec.settings.max_clusters


def wake_all() -> None:
    """Every pool's waiting nodes look at their cancel flags now."""
    for pool in list(_pools):
        pool.wake()


class ClusterPool:
    def __init__(self):
        self._lock = threading.RLock()
        # Nodes wait per signature, and a freed cluster or slot wakes one of them, the longest waiting: a map
        # of hundreds of nodes queued on a few clusters woke them all at every release, to find one winner.
        self._queues: dict[str, threading.Condition] = {}
        self._clusters: dict[str, Cluster] = {}
        self._warmed: set[tuple[str, str]] = set()  # (run, signature) whose pool was started ahead
        self._reserved: dict[str, int] = {}  # signature -> slots whose cluster is being found outside the lock
        _pools.add(self)

    def acquire(
        self,
        spec: TaskSpec,
        *,
        claim_warm: Optional[Callable[[TaskSpec, set], Optional[str]]] = None,
        taken: Optional[Callable[[], set]] = None,
        cancelled: Optional[Callable[[], bool]] = None,
        name_for: Optional[Callable[[int], str]] = None,
        wake_s: float = 0.5,
    ) -> tuple[Cluster, bool]:
        """(a cluster now marked busy, whether it must be started). Blocks at the node's limit.

        ``claim_warm(spec, known)`` may offer a warm cluster this process does not know (another
        process's, locally); ``taken()`` names clusters that exist but are not in the pool;
        ``name_for(slot)`` names the slot-th cluster (default: the spec's own names).

        Both callbacks ask the engine (a listing, an exec into a container): they run outside the
        pool's lock, on a slot reserved under it, so a slow engine call never holds up a release
        or another node taking a free cluster; what they found is committed under the lock again.
        """
        limit = slots(spec)
        name_for = name_for or spec.cluster_name_for
        sig = spec.signature
        while True:
            with self._lock:
                free, known = self._reserve(spec, limit, cancelled, wake_s)
                if free is not None:
                    return free, False
            try:
                name = claim_warm(spec, known) if claim_warm else None
                exists = taken() if taken and name is None else set()
            except BaseException:
                with self._lock:
                    self._unreserve(sig)
                raise
            with self._lock:
                self._unreserve(sig)
                if name is not None:
                    cluster = self._clusters.get(name)
                    if cluster is None:
                        return self._add(name, spec), False
                    if not cluster.busy:
                        # Known here meanwhile (a pool started ahead): one cluster, taken once.
                        return self._take(cluster, spec), False
                    # Another node of this process took it meanwhile: it is theirs; start a new one.
                if cancelled is not None and cancelled():
                    raise NodeCancelled(f"node {spec.node!r} was cancelled while queued for a cluster (max_clusters={limit})")
                for cluster in self._clusters.values():
                    if cluster.signature == sig and not cluster.busy:
                        return self._take(cluster, spec), False  # freed while the engine answered: no start
                exists |= set(self._clusters)
                slot = 0
                while name_for(slot) in exists:
                    slot += 1
                return self._add(name_for(slot), spec), True

    def _reserve(self, spec: TaskSpec, limit: int, cancelled, wake_s: float) -> tuple[Optional[Cluster], set]:
        """Under the lock: (a free cluster of the signature, now taken; no names), or (None, the
        names known here) once a slot under the limit is reserved for this node, whose cluster is then
        looked for outside the lock. Waits meanwhile; stops waiting when the node is cancelled."""
        sig = spec.signature
        while True:
            if cancelled is not None and cancelled():
                self._wake_one(sig)  # a wake it may have taken is passed on to the next node
                raise NodeCancelled(f"node {spec.node!r} was cancelled while queued for a cluster (max_clusters={limit})")
            mine = [c for c in self._clusters.values() if c.signature == sig]
            for cluster in mine:
                if not cluster.busy:
                    return self._take(cluster, spec), set()
            # The limit is the asking node's own: a later run with a lower one is held to it.
            # Reserved slots count as busy: their clusters are being found or named outside the lock.
            if sum(1 for c in mine if c.busy) + self._reserved.get(sig, 0) < limit:
                self._reserved[sig] = self._reserved.get(sig, 0) + 1
                return None, set(self._clusters)
            self._queue(sig).wait(timeout=wake_s)

    def _queue(self, sig: str) -> threading.Condition:
        """Under the lock: where the signature's nodes wait (on the book's lock)."""
        queue = self._queues.get(sig)
        if queue is None:
            queue = self._queues[sig] = threading.Condition(self._lock)
        return queue

    def _wake_one(self, sig: str) -> None:
        """Under the lock: a cluster or slot of ``sig`` is free; the longest-waiting node of it looks."""
        queue = self._queues.get(sig)
        if queue is not None:
            queue.notify()

    def _unreserve(self, sig: str) -> None:
        self._reserved[sig] -= 1
        if not self._reserved[sig]:
            del self._reserved[sig]
        self._wake_one(sig)

    @staticmethod
    def _take(cluster: Cluster, spec: TaskSpec) -> Cluster:
        cluster.busy = True
        cluster.runs.add(spec.run_id)
        return cluster

    def start_ahead(
        self,
        spec: TaskSpec,
        start: Callable[[str], None],
        *,
        taken: Optional[Callable[[], set]] = None,
        name_for: Optional[Callable[[int], str]] = None,
    ) -> list[str]:
        """``pool: {workers: N}``: the signature's N clusters started now, in parallel, before its
        first node takes one, so no node of the run waits for a cold start. Once per run and
        signature; nodes asking meanwhile wait for these rather than start their own. The names
        started (a failed start is forgotten: a node then starts its cluster itself, and says why)."""
        pool = spec.settings.pool
        if pool is None:
            return []
        key = (spec.run_id, spec.signature)
        with self._lock:
            if key in self._warmed:
                return []
        name_for = name_for or spec.cluster_name_for
        exists = taken() if taken else set()  # the engine is asked outside the lock
        with self._lock:
            if key in self._warmed:
                return []
            self._warmed.add(key)
            mine = sum(1 for c in self._clusters.values() if c.signature == spec.signature)
            exists |= set(self._clusters)
            names, slot = [], 0
            while len(names) < pool.workers - mine:
                name = name_for(slot)
                slot += 1
                if name not in exists:
                    names.append(name)
                    self._add(name, spec)  # busy while it starts
        started: list[str] = []

        def one(name: str) -> None:
            try:
                start(name)
            except Exception as exc:  # noqa: BLE001 - the node that needs it starts one itself
                log.warning("pool of %s: starting %s ahead failed: %s", spec.node, name, exc)
                self.forget(name)
                return
            started.append(name)
            self.free(name)

        threads = [threading.Thread(target=one, args=(n,), daemon=True, name=f"skyvm-ahead-{n}") for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sorted(started)

    def _add(self, name: str, spec: TaskSpec) -> Cluster:
        cluster = Cluster(name, spec.signature, spec.settings.down, busy=True, runs={spec.run_id})
        self._clusters[name] = cluster
        return cluster

    def get(self, name: str) -> Optional[Cluster]:
        with self._lock:
            return self._clusters.get(name)

    def free(self, name: str) -> None:
        with self._lock:
            cluster = self._clusters.get(name)
            if cluster is not None:
                cluster.busy = False
                self._wake_one(cluster.signature)

    def forget(self, name: str) -> None:
        """The cluster is gone (removed, or its start failed): never reuse it."""
        with self._lock:
            cluster = self._clusters.pop(name, None)
            if cluster is not None:
                self._wake_one(cluster.signature)  # its slot is free

    def wake(self) -> None:
        """Let waiting nodes look at their cancel flags now."""
        with self._lock:
            for queue in self._queues.values():
                queue.notify_all()

    def end_run(self, run_id: str) -> list[Cluster]:
        """The run is over: the ``down`` clusters no run holds any more, forgotten and returned for removal."""
        with self._lock:
            gone = []
            for cluster in list(self._clusters.values()):
                if run_id not in cluster.runs:
                    continue
                cluster.runs.discard(run_id)
                if cluster.down and not cluster.runs and not cluster.busy:
                    self._clusters.pop(cluster.name)
                    gone.append(cluster)
                    self._wake_one(cluster.signature)  # its slot is free
            return gone

    def names(self) -> set:
        with self._lock:
            return set(self._clusters)

