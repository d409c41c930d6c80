"""The resource limits a process actually has, read from the kernel (cgroup v1 or v2).

The node runtime reports these, and tests assert them: what a node sees from
inside its container, not what it asked for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

CG = Path("/sys/fs/cgroup")


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cpu_limit() -> Optional[float]:
    """CPUs this cgroup may use (quota / period), or None when unlimited."""
    v2 = _read(CG / "cpu.max")
    if v2:
        quota, _, period = v2.partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100000)
    quota, period = _read(CG / "cpu" / "cpu.cfs_quota_us"), _read(CG / "cpu" / "cpu.cfs_period_us")
    if quota is None or period is None or int(quota) < 0:
        return None
    return int(quota) / int(period)


def memory_limit() -> Optional[int]:
    """Bytes of memory this cgroup may use, or None when unlimited."""
    v2 = _read(CG / "memory.max")
    if v2:
        return None if v2 == "max" else int(v2)
    v1 = _read(CG / "memory" / "memory.limit_in_bytes")
    if v1 is None:
        return None
    value = int(v1)
    # cgroup v1 writes "unlimited" as a huge page-aligned number.
    return None if value >= 1 << 60 else value


def shm_size() -> Optional[int]:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_frsize * st.f_blocks


def gpus() -> list[str]:
    """Names of the NVIDIA GPUs visible here."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def container_limits() -> dict:
    """What a node sees: CPUs, memory, /dev/shm size, GPUs, hostname."""
    mem = memory_limit()
    return {
        "cpus": cpu_limit(),
        "memory_gib": None if mem is None else round(mem / 2**30, 3),
        "shm_gib": None if shm_size() is None else round(shm_size() / 2**30, 3),
        "gpus": gpus(),
        "hostname": os.uname().nodename,
        # Set by the backend on the cluster's container: which cluster this is.
        "cluster": os.environ.get("SKYVM_CLUSTER"),
    }
