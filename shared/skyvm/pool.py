"""The cluster policy both backends share: which cluster a node gets.

Per signature (the VM and image a node needs): a free warm cluster is reused;
else a new one is started in the next free slot (``<name>``, ``<name>-1``, ...)
while fewer than the node's own ``max_clusters`` of that signature are busy;
else the node waits, and a cancelled node stops waiting and never starts.
Clusters are remembered per run, so a run's end releases exactly its own.
A backend only starts, execs in and removes clusters.
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
        self._cond = threading.Condition()
        self._clusters: dict[str, Cluster] = {}
        self._warmed: set[tuple[str, str]] = set()  # (run, signature) whose pool was started ahead
        _pools.add(self)

    def acquire(
        self,
        spec: TaskSpec,
        *,
        claim_warm: Optional[Callable[[TaskSpec, set], Optional[str]]] = None,
        taken: Optional[Callable[[], set]] = None,
        cancelled: Optional[Callable[[], bool]] = None,
        wake_s: float = 0.5,
    ) -> tuple[Cluster, bool]:
        """(a cluster now marked busy, whether it must be started). Blocks at the node's limit.

        ``claim_warm(spec, known)`` may offer a warm cluster this process does not know (another
        process's, locally); ``taken()`` names clusters that exist but are not in the pool.
        """
        limit = slots(spec)
        with self._cond:
            while True:
                if cancelled is not None and cancelled():
                    raise NodeCancelled(f"node {spec.node!r} was cancelled while queued for a cluster (max_clusters={limit})")
                mine = [c for c in self._clusters.values() if c.signature == spec.signature]
                for cluster in mine:
                    if not cluster.busy:
                        cluster.busy = True
                        cluster.runs.add(spec.run_id)
                        return cluster, False
                # The limit is the asking node's own: a later run with a lower one is held to it.
                if sum(1 for c in mine if c.busy) < limit:
                    name = claim_warm(spec, set(self._clusters)) if claim_warm else None
                    if name is not None:
                        return self._add(name, spec), False
                    exists = set(self._clusters) | (taken() if taken else set())
                    slot = 0
                    while spec.cluster_name_for(slot) in exists:
                        slot += 1
                    return self._add(spec.cluster_name_for(slot), spec), True
                self._cond.wait(timeout=wake_s)

    def start_ahead(self, spec: TaskSpec, start: Callable[[str], None], *, taken: Optional[Callable[[], set]] = None) -> list[str]:
        """``pool: {workers: N}``: the signature's N clusters started now, in parallel, before its
        first node takes one, so no node of the run waits for a cold start. Once per run and
        signature; nodes asking meanwhile wait for these rather than start their own. The names
        started (a failed start is forgotten: a node then starts its cluster itself, and says why)."""
        pool = spec.settings.pool
        if pool is None:
            return []
        with self._cond:
            if (spec.run_id, spec.signature) in self._warmed:
                return []
            self._warmed.add((spec.run_id, spec.signature))
            mine = sum(1 for c in self._clusters.values() if c.signature == spec.signature)
            exists = set(self._clusters) | (taken() if taken else set())
            names, slot = [], 0
            while len(names) < pool.workers - mine:
                name = spec.cluster_name_for(slot)
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
        with self._cond:
            return self._clusters.get(name)

    def free(self, name: str) -> None:
        with self._cond:
            cluster = self._clusters.get(name)
            if cluster is not None:
                cluster.busy = False
            self._cond.notify_all()

    def forget(self, name: str) -> None:
        """The cluster is gone (removed, or its start failed): never reuse it."""
        with self._cond:
            self._clusters.pop(name, None)
            self._cond.notify_all()

    def wake(self) -> None:
        """Let waiting nodes look at their cancel flags now."""
        with self._cond:
            self._cond.notify_all()

    def end_run(self, run_id: str) -> list[Cluster]:
        """The run is over: the ``down`` clusters no run holds any more, forgotten and returned for removal."""
        with self._cond:
            gone = []
            for cluster in list(self._clusters.values()):
                if run_id not in cluster.runs:
                    continue
                cluster.runs.discard(run_id)
                if cluster.down and not cluster.runs and not cluster.busy:
                    self._clusters.pop(cluster.name)
                    gone.append(cluster)
            self._cond.notify_all()
            return gone

    def names(self) -> set:
        with self._cond:
            return set(self._clusters)
