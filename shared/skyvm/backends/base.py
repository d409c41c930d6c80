"""The backend interface: one launch path, as Dagster's step handlers (launch, check health, terminate).

Every attempt starts detached: the node runtime inside the container or VM
keeps the attempt's log and exit code, so anyone holding the attempt's
``NodeRef`` (a small JSON-able reference) can find it again: the process that
launched it, an Airflow trigger in another process, an executor. A backend
only starts, execs in, and removes clusters; which cluster a node gets is the
core ``ClusterPool``'s policy.

    ref = backend.launch(spec)          # as soon as the work is submitted
    backend.status(ref)                 # a typed state, GONE included
    backend.read_log(ref, offset)       # the log from offset on
    backend.cancel(ref)                 # stop the attempt
    backend.release(ref)                # the attempt is over: its cluster is free (or goes, per down)
    backend.end_run(run_id)             # the run is over: its down clusters go

A backend may also offer ``watch(ref, on_log, on_exit)``: push-based
following that the process's one watcher uses instead of polling.
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


class Backend(abc.ABC):
    """Runs TaskSpecs on clusters. Subclasses implement every abstract method (checked at import)."""

    name: str = ""
    needs_image: bool = True

    @abc.abstractmethod
    def launch(self, spec: TaskSpec, *, on_log: Optional[LogSink] = None, cancelled: Optional[Callable[[], bool]] = None) -> NodeRef:
        """Get a cluster of the spec's signature (the pool's choice) and submit the run, detached.

        May wait for a slot (``max_clusters``) or for provisioning; ``cancelled`` is asked while
        waiting, and a cancelled node never starts (NodeCancelled). ``on_log`` receives what
        happens before the run's own log (provisioning). Raises InfrastructureError (or
        UnsatisfiableRequest) when the node cannot run; whatever was half-made is removed.
        """

    @abc.abstractmethod
    def status(self, ref: NodeRef) -> JobStatus:
        """The attempt's state now (GONE when its cluster or record is gone)."""

    @abc.abstractmethod
    def read_log(self, ref: NodeRef, offset: int = 0) -> tuple[str, int]:
        """The attempt's log from ``offset`` on, and the new offset."""

    @abc.abstractmethod
    def cancel(self, ref: NodeRef) -> None:
        """Stop the attempt (SIGTERM to the node runtime, which stops its work). Safe to call twice."""

    @abc.abstractmethod
    def release(self, ref: NodeRef, down: bool, discard: bool = False) -> None:
        """The attempt is over: its cluster is free for the next node. A cluster found again from a
        reference (another process's) goes when ``down``; ``discard`` (a cancelled or timed-out
        attempt) with ``down`` makes it go now rather than at the run's end."""

    @abc.abstractmethod
    def end_run(self, run_id: str) -> None:
        """The run is over: tear down its ``down: true`` clusters; the others stay warm until autostop."""

    def watch(self, ref: NodeRef, on_log: LogSink, on_exit: Callable[[JobStatus], None]) -> bool:
        """Follow the attempt by push (a stream), calling ``on_exit`` once; False when only polling works."""
        return False
