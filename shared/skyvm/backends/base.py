"""The backend interface: launch, check, terminate (as Dagster's step handlers), plus release.

A backend takes a TaskSpec and runs its ``run`` command inside the node's
container on a cluster of the spec's signature. Everything engine-specific
stays in the adapters; everything about clusters stays in the backend.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

from skyvm.plan import TaskSpec

LogSink = Callable[[str], None]


class JobState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the run command exited non-zero
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class JobStatus:
    state: JobState
    exit_code: Optional[int] = None
    detail: str = ""


@dataclass
class Job:
    """A launched node attempt, as the backend tracks it."""

    spec: TaskSpec
    cluster: str
    backend_data: dict = field(default_factory=dict)


class Backend(Protocol):
    name: str

    def launch(self, spec: TaskSpec, on_log: LogSink) -> Job:
        """Get a cluster of the spec's signature (reuse a free warm one, else start one) and start the run.

        May block while the per-signature limit is reached. Raises
        InfrastructureError (or UnsatisfiableRequest) when the node cannot run.
        """

    def check(self, job: Job) -> JobStatus:
        """The job's state now, without blocking."""

    def terminate(self, job: Job) -> None:
        """Cancel a running job and free its cluster. Safe to call twice or on a finished job."""

    def release(self, run_id: str) -> None:
        """The run is over: tear down its clusters that have ``down: true``; the others stay warm until autostop."""
