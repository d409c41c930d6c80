"""This machine's capacity, and whether a node's request fits in it (the local backends).

Holds: ``quantity`` (a settings quantity as a number), ``host_gpus``, ``host_memory_gib`` and
``check_satisfiable`` (fail fast, naming what this machine has).

May import: skyvm.errors, skyvm.limits, skyvm.plan (types).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from skyvm.errors import UnsatisfiableRequest
from skyvm.plan import TaskSpec

log = logging.getLogger("skyvm.local")


def quantity(value: Optional[str]) -> Optional[float]:
    """``"4"`` or ``"4+"`` (cpus, memory in GiB) as 4.0; None stays None."""
    return None if value is None else float(value.rstrip("+"))


def host_gpus() -> list[str]:
    from skyvm.limits import gpus

    return gpus()


def host_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def check_satisfiable(spec: TaskSpec) -> None:
    """Fail fast, with what this machine has, when a request cannot be met here."""
    s = spec.settings
    cpus = quantity(s.cpus)
    have_cpus = os.cpu_count() or 1
    if cpus is not None and cpus > have_cpus:
        raise UnsatisfiableRequest(f"node {spec.node!r} asks for cpus={s.cpus} but this machine has {have_cpus} CPUs (local backend)")
    mem = quantity(s.memory)
    have_mem = host_memory_gib()
    if mem is not None and mem > have_mem:
        raise UnsatisfiableRequest(f"node {spec.node!r} asks for memory={s.memory} GiB but this machine has {have_mem:.1f} GiB (local backend)")
    request = s.accelerator_request()
    if request:
        name, count = request
        gpus = host_gpus()
        matching = [g for g in gpus if name.lower().replace("-", "") in g.lower().replace("-", "").replace(" ", "")]
        if len(matching) < count:
            have = ", ".join(gpus) if gpus else "no NVIDIA GPU"
            raise UnsatisfiableRequest(
                f"node {spec.node!r} asks for accelerators {name}:{count:g} but this machine has {have} (local backend); "
                "use backend: skypilot, or drop accelerators"
            )
    if s.instance_type:
        log.info("local backend: instance_type %s is not emulated; cpus/memory limits apply", s.instance_type)
