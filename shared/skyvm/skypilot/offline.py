"""SkyPilot's optimizer with no network and no cloud credentials, for ``skyvm plan``.

It reads SkyPilot's catalog CSVs from its runtime directory (``skyvm plan
--catalog-dir`` runs it in a process whose ``SKY_RUNTIME_DIR`` points there:
SkyPilot binds catalog paths when its modules load) and treats the clouds a plan names as enabled, as
SkyPilot's own tests do (their ``enable_all_clouds`` fixture). Only the
bridge calls this, passing the ``sky`` module in.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional
from unittest import mock

ALL_CLOUDS = ("aws", "gcp", "azure", "lambda")


def _cloud_objects(sky, names) -> list:
    registry = {"aws": sky.AWS, "gcp": sky.GCP, "azure": sky.Azure, "lambda": sky.Lambda, "kubernetes": sky.Kubernetes}
    return [registry[n]() for n in names]


@contextlib.contextmanager
def offline(sky, clouds) -> Any:
    import sky.check as sky_check

    enabled = _cloud_objects(sky, clouds)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(sky_check, "get_cached_enabled_clouds_or_refresh", lambda *a, **k: enabled))
        stack.enter_context(mock.patch.object(sky_check, "check_capability", lambda *a, **k: None))
        yield


def optimize(sky, task: dict, *, clouds: Optional[list[str]] = None) -> dict:
    """The cheapest placement for one task: cloud, region, zone, instance, spot, $/h, or SkyPilot's reason."""
    resources = task.get("resources", {})
    infra = resources.get("infra") or ""
    named = infra.split("/")[0].replace("k8s", "kubernetes") if infra else None
    clouds = clouds or ([named] if named else list(ALL_CLOUDS))
    with offline(sky, clouds):
        t = sky.Task.from_yaml_config(dict(task))
        with sky.Dag() as dag:
            dag.add(t)
        try:
            sky.optimizer.Optimizer.optimize(dag, quiet=True)
        except Exception as exc:  # noqa: BLE001 - SkyPilot's reason is the answer
            import re

            reason = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(exc).split()))
            return {"error": reason[:600] or type(exc).__name__}
        from skyvm.skypilot.bridge import placement

        best = t.best_resources
        return {**placement(best), "accelerators": dict(best.accelerators or {})}
