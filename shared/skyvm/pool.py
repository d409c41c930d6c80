"""The one cluster policy, for every backend: which cluster a node gets, reuse, limits, pools, release.

``pool_of(backend)`` is the process's one ``BackendPool`` for a backend:

    ref = pool_of(backend).launch(spec, on_log=..., cancelled=...)   # a cluster chosen, the attempt submitted
    pool_of(backend).release(ref, down, discard)                     # the attempt is over
    pool_of(backend).end_run(run_id)                                 # the run is over: its down clusters go

Per signature, in this process, the book in ``skyvm.slots``: a free warm cluster is reused, else one
is started in the next free slot while fewer than ``max_clusters`` are busy, else the node waits.
``pool: {workers: N}`` starts the signature's N clusters ahead (or, where the backend's clusters
are shared, as SkyPilot pools are, makes the one pool once per run and counts the runs on it).
Across the processes of one install (an Airflow trigger, a Prefect worker, another run) the
install's ``Home`` says who may take a cluster: a claim is a file lock held while the cluster is
taken and its attempt submitted, and the cluster's record names the attempt launched there and not
yet released. That attempt holds the cluster while it runs and its run lives (the run's lease) or
its launcher let go of it for whoever holds its reference (a deferred Airflow task); its backend
is asked whether it runs only then. An attempt whose launcher died with its run holds nothing. A warm cluster that hit its autostop just as it was taken is
forgotten and the node takes another. A backend only starts, execs in, inspects and removes.

Holds: ``BackendPool``, ``pool_of``, ``reset_pools``; re-exports ``ClusterPool`` and ``wake_all``.
May import: skyvm.slots, skyvm.home, skyvm.backends.base, skyvm.errors, skyvm.plan, skyvm.progress (never a backend module, the API).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import weakref
from typing import Callable, Optional

from filelock import Timeout

from skyvm import progress
from skyvm.backends.base import NONE, SHARED, Backend, ClusterGone, LogSink, NodeRef
from skyvm.home import Home
from skyvm.plan import TaskSpec
from skyvm.slots import Cluster, ClusterPool, slots, wake_all

__all__ = ["BackendPool", "Cluster", "ClusterPool", "pool_of", "reset_pools", "slots", "wake_all"]

log = logging.getLogger("skyvm.pool")

# How long a release waits for another process's claim of the same cluster (a claim is brief).
RECORD_WAIT_S = 60.0


class BackendPool:
    """The cluster policy over one backend, for this process (see the module's docstring)."""

    def __init__(self, backend: Backend, home: Optional[Home] = None):
        self.backend = backend
        self.slots = ClusterPool()
        self._home = home
        self._lock = threading.Lock()
        # cluster -> (its claim lock, held until the attempt is recorded; the record as the claim left it)
        self._claims: dict[str, tuple[object, dict]] = {}
        # Shared clusters (SkyPilot pools) this process made or found: the runs using them, and whether
        # the last run's end takes them down (a per-run pool with down: true; never a team's shared one).
        self._shared: dict[str, dict] = {}
        self._shared_locks: dict[str, threading.Lock] = {}
        self._let_go: set[str] = set()  # attempts on shared clusters whose launcher let go of them

    @property
    def home(self) -> Home:
        return self._home or Home.current()

    def names(self) -> set:
        """The clusters this process knows (own ones; shared ones apart)."""
        return self.slots.names()

    # -- launch ------------------------------------------------------------------

    def launch(self, spec: TaskSpec, *, on_log: Optional[LogSink] = None, cancelled: Optional[Callable[[], bool]] = None) -> NodeRef:
        """Get a cluster of the spec's signature and submit its run there, detached; the attempt's reference."""
        backend = self.backend
        backend.check(spec)
        kind = backend.cluster_kind(spec)
        if kind == NONE:
            ref = backend.run_attempt(spec, None, on_log=on_log, cancelled=cancelled)
        elif kind == SHARED:
            name = backend.shared_name(spec)
            own = self._ensure_shared(spec, name, on_log)
            ref = backend.run_attempt(spec, name, on_log=on_log, cancelled=cancelled)
            ref = dataclasses.replace(ref, extra={**ref.extra, "own_pool": own})
        else:
            ref = self._launch_own(spec, on_log, cancelled)
        return dataclasses.replace(ref, extra={**ref.extra, "kind": kind})

    def _launch_own(self, spec: TaskSpec, on_log: Optional[LogSink], cancelled) -> NodeRef:
        backend = self.backend
        name_for = lambda slot: backend.cluster_name(spec, slot)  # noqa: E731
        claim_warm = self._claim_warm if backend.lists_warm else None
        taken = self._taken if backend.lists_warm else None
        if spec.settings.pool is not None:
            ahead = self.slots.start_ahead(spec, lambda name: self._start_ahead(spec, name), taken=taken, name_for=name_for)
            if ahead and on_log:
                on_log(f"skyvm: pool of {len(ahead)} warm cluster(s) started ahead for {spec.node}'s signature: {', '.join(ahead)}")
        while True:
            cluster, fresh = self.slots.acquire(spec, claim_warm=claim_warm, taken=taken, cancelled=cancelled, name_for=name_for)
            name = cluster.name
            if self._claim(name, spec, fresh):
                break
            # Another process took this warm cluster meanwhile: it is theirs now.
            self.slots.forget(name)
        try:
            # A fresh cluster may take minutes on a cloud: its start says so while it runs (skyvm.progress).
            with progress.step(f"starting cluster {name} for node {spec.node}", logger=log) if fresh else contextlib.nullcontext():
                ref = backend.run_attempt(spec, name, fresh=fresh, on_log=on_log, cancelled=cancelled)
        except ClusterGone:
            # A warm cluster hit its autostop just now: forget it and take another.
            self._unclaim(name, gone=True)
            self.slots.forget(name)
            return self._launch_own(spec, on_log, cancelled)
        except BaseException:
            self._unclaim(name, gone=fresh)
            if fresh:  # removed by the backend (or never made): not a warm cluster a later node may take
                self.slots.forget(name)
            else:
                self.slots.free(name)
            raise
        self._record_attempt(name, ref)
        return ref

    def _start_ahead(self, spec: TaskSpec, name: str) -> None:
        """A pool's cluster, started before any node needs it; claimed while it starts, so no other
        process takes it half-made."""
        if not self._claim(name, spec, fresh=True):
            raise RuntimeError(f"cluster {name} is held by another process")
        log.info("starting cluster %s ahead (pool of node %s)", name, spec.node)
        try:
            with progress.step(f"starting cluster {name} ahead (pool of node {spec.node})", logger=log):
                self.backend.start_cluster(spec, name)
        except BaseException:
            self._unclaim(name, gone=True)
            raise
        self._unclaim(name)

    def _ensure_shared(self, spec: TaskSpec, name: str, on_log: Optional[LogSink]) -> bool:
        """The shared cluster made once per name (or found), the run counted on it; whether it is the run's own."""
        pool = spec.settings.pool
        with self._lock:
            lock = self._shared_locks.setdefault(name, threading.Lock())
        with lock:  # nodes of one signature start in parallel: one start among them
            known = self._shared.get(name)
            if known is None:
                with progress.step(f"starting pool {name} for node {spec.node}", logger=log):
                    self.backend.start_cluster(spec, name, on_log=on_log)
                known = self._shared[name] = {"runs": set(), "down": spec.settings.down and not (pool and pool.shared)}
            known["runs"].add(spec.run_id)
        return not (pool and pool.shared)

    # -- claims across processes ---------------------------------------------------

    def _claim(self, name: str, spec: TaskSpec, fresh: bool) -> bool:
        """Take the cluster for the spec's run: False when another process has it (claiming it now,
        or an attempt of its still runs there). The claim stays held until the attempt is recorded."""
        with self._lock:
            if name in self._claims:
                return True  # claimed by this process (a warm cluster found above)
        home = self.home
        lock = home.cluster_lock(name)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        record = home.cluster_record(name)
        if not fresh and self._taken_by(record):
            lock.release()
            return False
        runs = [] if fresh else record["runs"]
        claimed = {"runs": sorted({*runs, spec.run_id}), "attempt": None, "let_go": False}
        if claimed != record:  # the run's next node on its warm cluster: the record says so already
            home.write_cluster_record(name, claimed)
        with self._lock:
            self._claims[name] = (lock, claimed)
        return True

    def _unclaim(self, name: str, gone: bool = False) -> None:
        with self._lock:
            held = self._claims.pop(name, None)
        if gone:
            self.home.forget_cluster(name)
        if held is not None:
            held[0].release()

    def _record_attempt(self, name: str, ref: NodeRef) -> None:
        """The attempt on the cluster this process claimed for it (``_claim``), and the claim let go of."""
        with self._lock:
            _, claimed = self._claims[name]
        # The record is as the claim left it (no process writes it while the claim is held): not read again.
        self.home.write_cluster_record(name, {**claimed, "attempt": ref.to_dict()})
        self._unclaim(name)

    def _taken_by(self, record: dict) -> bool:
        """Whether the attempt a cluster's record names holds the cluster: it runs, and its run still
        lives or its launcher let go of it (a deferred Airflow task's, which the reference's holder
        releases). An attempt whose launcher died with its run is nobody's: gc, or the next node, takes it."""
        attempt = record["attempt"]
        if attempt is None:
            return False
        if not record["let_go"] and not self.home.run_is_live(attempt.get("run_id", "")):
            return False
        return not self._finished(attempt)

    def _finished(self, attempt: dict) -> bool:
        """Whether an attempt recorded on a cluster is over, as its backend says (another process's)."""
        try:
            return self.backend.status(NodeRef.from_dict(attempt)).state.finished
        except Exception as exc:  # noqa: BLE001 - unknown: the cluster is left to its owner
            log.warning("cannot ask for the state of attempt %s on %s: %s", attempt.get("attempt_id"), attempt.get("cluster"), exc)
            return False

    def _claim_warm(self, spec: TaskSpec, known: set) -> Optional[str]:
        """A running cluster of the signature that another process of this install (or an earlier
        run) left warm; claimed. Never another install's: the backend lists this install's only."""
        for row in self.backend.clusters(signature=spec.signature, running=True):
            name = row["name"]
            if name not in known and self._claim(name, spec, fresh=False):
                return name
        return None

    def _taken(self) -> set:
        return {row["name"] for row in self.backend.clusters()}

    # -- release -------------------------------------------------------------------

    def let_go(self, ref: NodeRef) -> None:
        """The launching process stops following the attempt (Airflow's deferral): it runs on, and its
        cluster leaves this process's book, its record saying it is taken; whoever releases the
        reference (a trigger, in any process) decides the cluster's end, as for one found again."""
        self.backend.let_go(ref)
        kind = ref.extra.get("kind")
        if kind == SHARED:
            with self._lock:
                self._let_go.add(ref.attempt_id)
        elif kind != NONE:
            self.slots.forget(ref.cluster)
            self._update_record(ref, let_go=True)

    def release(self, ref: NodeRef, down: bool, discard: bool = False) -> None:
        """The attempt is over: its cluster is free for the next node. A cluster this process does not
        know (the attempt was found again from its reference) goes when ``down`` and nothing runs
        there; ``discard`` (a cancelled or timed-out attempt) with ``down`` makes a known one go now."""
        kind = ref.extra.get("kind")
        if kind == NONE:
            return  # the attempt's cluster (a managed job's, a process) went with it
        if kind == SHARED:
            with self._lock:
                found_again = ref.attempt_id in self._let_go or ref.cluster not in self._shared
                self._let_go.discard(ref.attempt_id)
                gone = found_again and down and bool(ref.extra.get("own_pool"))
                if gone:
                    self._shared.pop(ref.cluster, None)
            if gone:
                # Nobody here ends the run (an Airflow task deferred): the run's own pool goes now.
                self._remove_quietly(ref.cluster, shared=True)
            return
        self._update_record(ref, let_go=False, clear=True)
        if self.slots.get(ref.cluster) is not None:
            if discard and down:
                # A cancelled run does not keep its cluster around.
                self.slots.forget(ref.cluster)
                self.remove_if_idle(ref.cluster)
            else:
                self.slots.free(ref.cluster)
            return
        if down:
            self.remove_if_idle(ref.cluster)

    def _update_record(self, ref: NodeRef, let_go: bool, clear: bool = False) -> None:
        """The cluster's record of the attempt: let go of by its launcher, or (``clear``) released."""
        home = self.home
        lock = home.cluster_lock(ref.cluster)
        try:
            lock.acquire(timeout=RECORD_WAIT_S)
        except Timeout:
            log.warning("cluster %s: its record is held by another process; attempt %s stays on it until that ends", ref.cluster, ref.attempt_id)
            return
        try:
            record = home.cluster_record(ref.cluster)
            if (record["attempt"] or {}).get("attempt_id") == ref.attempt_id:
                record["let_go"] = let_go
                if clear:
                    record["attempt"] = None
                home.write_cluster_record(ref.cluster, record)
        finally:
            lock.release()

    def end_run(self, run_id: str) -> None:
        """The run is over: its ``down`` clusters no run of this process holds go, in parallel; the others
        stay warm until their autostop."""
        names = [c.name for c in self.slots.end_run(run_id)]
        with self._lock:
            shared = []
            for name, known in list(self._shared.items()):
                if run_id in known["runs"]:
                    known["runs"].discard(run_id)
                    if known["down"] and not known["runs"]:
                        shared.append(name)
                        del self._shared[name]
        threads = [threading.Thread(target=self.remove_if_idle, args=(n,), daemon=True) for n in names]
        threads += [threading.Thread(target=self._remove_quietly, args=(n, True), daemon=True) for n in shared]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def remove_if_idle(self, name: str) -> bool:
        """Remove a cluster when no process claims it and no attempt runs there; whether it went."""
        home = self.home
        lock = home.cluster_lock(name)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False  # a process is taking it right now
        try:
            if self._taken_by(home.cluster_record(name)):
                return False
            self._remove_quietly(name)
            home.forget_cluster(name)
            self.slots.forget(name)
            return True
        finally:
            lock.release()

    def _remove_quietly(self, name: str, shared: bool = False) -> None:
        try:
            self.backend.remove_cluster(name, shared=shared)
        except Exception as exc:  # noqa: BLE001 - report, do not hide the original error
            log.error("could not remove cluster %s of backend %s: %s", name, self.backend.name, exc)


_by_backend: "weakref.WeakKeyDictionary[Backend, BackendPool]" = weakref.WeakKeyDictionary()
_by_backend_lock = threading.Lock()


def pool_of(backend: Backend) -> BackendPool:
    """The process's one pool for ``backend``: every launch, release and run's end goes through it."""
    with _by_backend_lock:
        pool = _by_backend.get(backend)
        if pool is None:
            pool = _by_backend[backend] = BackendPool(backend)
        return pool


def reset_pools() -> None:
    """Forget every pool (tests; a process that made new backends): the next ``pool_of`` makes a new one."""
    with _by_backend_lock:
        _by_backend.clear()
