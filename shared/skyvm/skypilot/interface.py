"""The bridge's interface: the calls skyvm makes of SkyPilot, and how long each may take.

Holds ``SkyBridge`` (the protocol every bridge answers: the SDK adapter in
``sdk``, the RPC client in ``rpc_client``, the tests' stand-ins), the list of
calls the RPC carries, their time bounds and SkyPilot's exit code of a failed
job. Every call takes and returns JSON-serialisable values, so the same
interface works in-process and across a process boundary.

May import: the standard library only (everything else in ``skyvm.skypilot``
imports this).
"""

from __future__ import annotations

import os
import re
from typing import Callable, Optional, Protocol

LogSink = Callable[[str], None]
CALLS = (
    "launch", "exec", "job_status", "tail_logs", "read_log", "cancel", "down", "autostop", "status", "jobs_launch", "jobs_status",
    "jobs_cancel", "jobs_logs", "optimize", "check", "api_stop", "pool_apply", "pool_status", "pool_down", "ssh_info",
)
# Calls that stream a log (to stderr across the process boundary).
LOGGING_CALLS = ("launch", "exec", "tail_logs", "jobs_launch", "jobs_logs", "pool_apply")
# Every call is bounded: a SkyPilot API server that hangs must not hang a flow. Provisioning may take
# long (and retry_until_up as long as it takes); everything else answers in minutes at most.
BOUND_ENV = "SKYVM_SKYPILOT_CALL_TIMEOUT_S"
_PROVISIONING = ("launch", "exec", "jobs_launch", "pool_apply")

# SkyPilot's colour codes: dropped from what skyvm passes on (engines' task logs, error texts).
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

# SkyPilot's exit code of a failed job in tail_logs.
FAILED_JOB_EXIT = 100


def call_bound(name: str, kwargs: dict) -> Optional[float]:
    """Seconds a bridge call may take (None: unbounded, only for a launch told to retry until up,
    or a log followed to its end)."""
    if os.environ.get(BOUND_ENV):
        return float(os.environ[BOUND_ENV])
    if name in _PROVISIONING:
        return None if kwargs.get("retry_until_up") else 3600.0
    if kwargs.get("follow", False) and name in ("tail_logs", "jobs_logs"):
        return None
    return 600.0


class SkyBridge(Protocol):
    def launch(self, task: dict, cluster_name: str, *, idle_minutes_to_autostop: Optional[int], down: bool, retry_until_up: bool, dryrun: bool = False, on_log: Optional[LogSink] = None, options: Optional[dict] = None) -> dict: ...
    def exec(self, task: dict, cluster_name: str, on_log: Optional[LogSink] = None) -> dict: ...
    def job_status(self, cluster_name: str, job_id: int) -> Optional[str]: ...
    def tail_logs(self, cluster_name: str, job_id: int, on_log: Optional[LogSink] = None, follow: bool = True) -> int: ...
    # A job's log from ``offset`` (characters) on, and the offset after it: only what is new (see logs.py);
    # ``final``: the job is over, the answer holds the rest of its log.
    def read_log(self, cluster_name: Optional[str], job_id: int, offset: int = 0, managed: bool = False, final: bool = False) -> list: ...
    def cancel(self, cluster_name: str, job_id: int) -> None: ...
    def down(self, cluster_name: str) -> None: ...
    def autostop(self, cluster_name: str, idle_minutes: int, down: bool) -> None: ...
    def status(self, cluster_names: Optional[list[str]] = None) -> list[dict]: ...
    def jobs_launch(self, task: dict, name: str, on_log: Optional[LogSink] = None, pool: Optional[str] = None) -> dict: ...
    def jobs_status(self, job_id: int) -> dict: ...
    def jobs_cancel(self, job_id: int) -> None: ...
    def jobs_logs(self, job_id: int, on_log: Optional[LogSink] = None, follow: bool = True) -> int: ...
    def optimize(self, tasks: list[dict], clouds: Optional[list[str]] = None) -> list[dict]: ...
    def check(self, clouds: Optional[list[str]] = None) -> dict: ...
    def api_stop(self) -> None: ...
    def pool_apply(self, task: dict, pool_name: str, on_log: Optional[LogSink] = None) -> None: ...
    def pool_status(self, pool_names: Optional[list[str]] = None) -> list[dict]: ...
    def pool_down(self, pool_name: str) -> None: ...
    # How to reach an UP cluster's head over SSH, from its handle as SkyPilot keeps it: ``host``, ``port``,
    # ``user``, ``private_key`` (the key's text), ``host_key`` (None: SkyPilot checks none), ``proxy_command``
    # and ``docker`` (``{host, port, user}``: the node's container, reached through the head). None: no SSH.
    def ssh_info(self, cluster_name: str) -> Optional[dict]: ...
