"""The backend contract: what the core calls on a backend, and nothing else.

A backend starts, execs in, inspects and removes clusters, and reports them; which cluster a
node gets (reuse, limits, pools started ahead, release, a run's end) is the core pool's policy
(``skyvm.pool``), the same for every backend. Every attempt is launched the same way: the node
runtime inside the cluster keeps the attempt's log and exit code, so whoever holds its
``NodeRef`` (a small JSON-able reference) follows it: the launching process (by push, ``watch``),
an Airflow trigger or another process (by polling ``status`` and ``read_log``).

    cluster level                                   attempt level
    backend.check(spec)                             backend.status(ref)
    backend.cluster_kind(spec)                      backend.read_log(ref, offset)
    backend.cluster_name(spec, slot)                backend.cancel(ref)
    backend.start_cluster(spec, name)               backend.watch(ref, on_log, on_exit)
    backend.run_attempt(spec, cluster, fresh=...)   backend.let_go(ref)
                                                    backend.result_bytes(ref)
    backend.clusters(signature=None, running=False)
    backend.remove_cluster(name, shared=...)

Holds: JobState, JobStatus, NodeRef, ClusterGone, the ``Backend`` ABC.
May import: skyvm.plan, skyvm.errors (never the pool, a backend or the API).
"""

from __future__ import annotations

import abc
import enum
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from skyvm.plan import TaskSpec

LogSink = Callable[[str], None]


class JobState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the run command exited non-zero
    CANCELLED = "cancelled"
    GONE = "gone"  # the cluster (or the attempt in it) no longer exists

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.GONE)


@dataclass(frozen=True)
class JobStatus:
    state: JobState
    exit_code: Optional[int] = None
    detail: str = ""


@dataclass(frozen=True)
class NodeRef:
    """Where an attempt runs: everything needed to find it again, in any process."""

    backend: str
    cluster: str
    attempt_id: str
    node: str
    run_id: str
    job_id: Optional[int] = None  # SkyPilot's job id (or managed job id)
    managed: bool = False  # a SkyPilot managed job (its own cluster)
    fresh: bool = False  # the launch started the cluster
    hourly_price: Optional[float] = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NodeRef":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


# The node runtime's exit code for a cancelled attempt (SIGTERM), as every backend reports it.
EXIT_CANCELLED = 143


def state_of_exit(code: Optional[int]) -> JobState:
    if code is None:
        return JobState.RUNNING
    if code == EXIT_CANCELLED:
        return JobState.CANCELLED
    return JobState.SUCCEEDED if code == 0 else JobState.FAILED


def store_pending_payload(spec) -> None:
    """The payload where the node reads it (``payload_url``), when prepare left it out of the store for an
    inline hand-over (``TaskSpec.pending_store``) and the node is started some other way."""
    if spec.pending_store is not None and spec.payload is not None:
        spec.pending_store.put_payload(spec.payload)


class ClusterGone(Exception):
    """The cluster an attempt was to run on is gone (a warm one hit its autostop): the pool takes another."""


# How a backend places a node's attempts (``Backend.cluster_kind``).
OWN = "own"  # a cluster of the pool's choosing, one attempt at a time
SHARED = "shared"  # one cluster that runs many attempts at once (a SkyPilot pool), named by ``shared_name``
NONE = "none"  # the attempt brings its own (a managed job, a plain process)


class Backend(abc.ABC):
    """Runs TaskSpecs on clusters. Subclasses implement every abstract method (checked at import)."""

    name: str = ""
    needs_image: bool = True
    # Whether the pool may look in ``clusters()`` for warm clusters other processes of this install
    # left (cheap where the engine is local; a cloud's listing is not asked on every cold start).
    lists_warm: bool = False
    # How often a follower that cannot watch (another process's attempt, SkyPilot) polls status and log.
    poll_s: float = 1.0
    # Payloads up to this size may reach the node inline (a cluster's agent): ``prepare`` then leaves them
    # out of the store (``TaskSpec.pending_store``) and the backend puts one there only when its node must read it.
    inline_payload_max: int = 0

    def inline_limit(self, store) -> int:
        """How large a payload bound for ``store`` may stay out of it until its node must read it (0: stored first)."""
        return self.inline_payload_max

    # -- clusters ----------------------------------------------------------------

    def check(self, spec: TaskSpec) -> None:
        """Refuse, before anything is started, a node this backend cannot run (UnsatisfiableRequest/InfrastructureError)."""

    def cluster_kind(self, spec: TaskSpec) -> str:
        """OWN, SHARED or NONE: how the node's attempts are placed."""
        return OWN

    def shared_name(self, spec: TaskSpec) -> str:
        """The SHARED cluster of the spec."""
        raise NotImplementedError(f"backend {self.name} has no shared clusters")

    def cluster_name(self, spec: TaskSpec, slot: int) -> str:
        """The slot-th cluster of the spec's signature."""
        return spec.cluster_name_for(slot)

    @abc.abstractmethod
    def start_cluster(self, spec: TaskSpec, name: str, *, on_log: Optional[LogSink] = None) -> None:
        """Make a cluster of the spec's signature ready (a pool's started ahead; a SHARED one). What was
        half-made is removed when it fails."""

    @abc.abstractmethod
    def run_attempt(
        self, spec: TaskSpec, cluster: Optional[str], *, fresh: bool = False,
        on_log: Optional[LogSink] = None, cancelled: Optional[Callable[[], bool]] = None,
    ) -> NodeRef:
        """Submit the spec's run on ``cluster`` (None for NONE), detached, and return its reference.

        ``fresh``: the cluster is started first (in one call where the backend can). ``cancelled`` is
        asked while a cluster provisions: a cancelled node never starts (NodeCancelled). ``on_log``
        receives what happens before the run's own log. Raises ClusterGone when a warm cluster is
        gone, InfrastructureError when the node cannot run; a fresh cluster half-made is removed.
        """

    @abc.abstractmethod
    def clusters(self, signature: Optional[str] = None, running: bool = False) -> list[dict]:
        """This install's clusters (of ``signature``; only running ones): rows with at least ``name``."""

    @abc.abstractmethod
    def remove_cluster(self, name: str, *, shared: bool = False) -> None:
        """Remove a cluster (``shared``: a SHARED one, as a SkyPilot pool). Safe when it is gone already."""

    # -- attempts ----------------------------------------------------------------

    @abc.abstractmethod
    def status(self, ref: NodeRef) -> JobStatus:
        """The attempt's state now (GONE when its cluster or record is gone)."""

    @abc.abstractmethod
    def read_log(self, ref: NodeRef, offset: int = 0) -> tuple[str, int]:
        """The attempt's log from ``offset`` on, and the new offset."""

    @abc.abstractmethod
    def cancel(self, ref: NodeRef) -> None:
        """Stop the attempt (SIGTERM to the node runtime, which stops its work). Safe to call twice."""

    def watch(self, ref: NodeRef, on_log: LogSink, on_exit: Callable[[JobStatus], None]) -> bool:
        """Follow the attempt by push (a stream), calling ``on_exit`` once; False when only polling works
        (another process's attempt, or a backend without streams)."""
        return False

    def result_bytes(self, ref: NodeRef) -> Optional[bytes]:
        """The attempt's result when the backend brings it back itself (PayloadError when there is none);
        None: the node left it in the payload store, at the attempt's result URL."""
        return None

    def let_go(self, ref: NodeRef) -> None:
        """The launching process stops following the attempt, which runs on (Airflow's deferral):
        let go of what this process holds for it (a stream nobody reads would fill and stall the node)."""
