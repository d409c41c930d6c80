"""Planning's one stand-in for cloud access: SkyPilot's optimizer told which clouds count as enabled.

Holds the clouds a plan may place a node on (``PLANNING_CLOUDS``), which clouds a task's resources
are pinned to, and the context that patches ``sky.check`` for the length of one plan.

May import: the standard library and skyvm.clouds; ``sky`` is passed in (only the SDK adapter imports SkyPilot).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Optional

from skyvm.clouds import INFRA_NAMES, PLANNING_CLOUDS  # PLANNING_CLOUDS: where a plan may place a node that names no cloud

_ENABLED_LOCK = threading.Lock()


def _clouds_named(resources: dict) -> Optional[list[str]]:
    """The clouds a task's resources (each candidate over the rest) are pinned to; None when any is free."""
    candidates = resources.get("any_of") or resources.get("ordered") or [{}]
    named = set()
    for cand in candidates:
        infra = cand["infra"] if "infra" in cand else resources.get("infra")
        if not infra:
            return None
        cloud = infra.split("/")[0].lower()
        named.add(INFRA_NAMES.get(cloud, cloud))
    return sorted(named)


@contextlib.contextmanager
def _clouds_assumed_enabled(sky, clouds):
    """The one stand-in for cloud access in skyvm's production code, and why it is needed:
    planning must work with no credentials (a laptop, CI, a plan before an account exists), yet
    SkyPilot's optimizer asks ``sky.check`` which clouds this user may use, and that check calls
    each cloud's API. For a plan, the clouds it may place on count as enabled: the same two
    functions SkyPilot's own tests replace (their ``enable_all_clouds`` fixture). Everything else
    (catalogs, feasibility, prices, the pick) is SkyPilot's. The originals are back when the plan is
    made; the lock keeps concurrent plans in this process from restoring each other's.
    tests/skypilot/test_plan.py::test_what_planning_relies_on_in_skypilot fails loudly when a
    SkyPilot upgrade moves these."""
    import sky.check as sky_check

    registry = {"aws": sky.AWS, "gcp": sky.GCP, "azure": sky.Azure, "lambda": sky.Lambda, "kubernetes": sky.Kubernetes}
    unknown = [c for c in clouds if c not in registry]
    if unknown:
        raise ValueError(f"cannot plan for cloud(s) {unknown}; skyvm plans for {', '.join(registry)}")
    enabled = [registry[c]() for c in clouds]
    with _ENABLED_LOCK:
        saved = sky_check.get_cached_enabled_clouds_or_refresh, sky_check.check_capability
        sky_check.get_cached_enabled_clouds_or_refresh = lambda *_a, **_k: list(enabled)
        sky_check.check_capability = lambda *_a, **_k: None
        try:
            yield
        finally:
            sky_check.get_cached_enabled_clouds_or_refresh, sky_check.check_capability = saved

