"""The SkyPilot clusters and pools skyvm launched, for ``skyvm status --skypilot`` and ``skyvm gc --skypilot``.

skyvm's clusters carry its labels (``skyvm-run-id``, ``skyvm-node``,
``skyvm-signature``: see task_config) on the VM; a cluster without them is the
user's own and is never listed or touched. skyvm's pools carry them in their
task (``skyvm-pool``: ``run`` for a pool made for one run, ``shared`` for a
named one).

May import: skyvm.home, skyvm.skypilot.interface and .task_config (never the backend: the CLI's
maintenance passes a bridge in).
"""

from __future__ import annotations

from skyvm.skypilot.interface import SkyBridge

# A launch that never finished (INIT) or a cluster autostop stopped: nothing runs there, yet it costs
# (an INIT VM may be up; a STOPPED one keeps its disk). UP clusters may be running a node: only --all.
IDLE_STATES = ("INIT", "STOPPED")


def skyvm_clusters(bridge: SkyBridge) -> list[dict]:
    rows = []
    for c in bridge.status():
        labels = c.get("labels") or {}
        if "skyvm-signature" not in labels:
            continue
        rows.append({
            "backend": "skypilot",
            "name": c["name"],
            "state": c.get("status"),
            "run_id": labels.get("skyvm-run-id", ""),
            "node": labels.get("skyvm-node", ""),
            "signature": labels.get("skyvm-signature", ""),
            "down": bool(c.get("to_down")),
            "autostop_min": c.get("autostop"),
            "resources": c.get("resources") or "",
        })
    return rows


def gc_clusters(bridge: SkyBridge, *, everything: bool = False, dry_run: bool = False) -> list[str]:
    """Tear down skyvm's idle SkyPilot clusters (every one of them with ``everything``); the names."""
    doomed = [r["name"] for r in skyvm_clusters(bridge) if everything or r["state"] in IDLE_STATES]
    if not dry_run:
        for name in doomed:
            bridge.down(name)
    return doomed


def skyvm_pools(bridge: SkyBridge) -> list[dict]:
    """skyvm's SkyPilot pools, each with whether the run it was made for is still live here."""
    live = _live_run_labels()
    rows = []
    for p in bridge.pool_status(None):
        labels = p.get("labels") or {}
        if "skyvm-signature" not in labels:
            continue
        kind = labels.get("skyvm-pool", "run")
        run = labels.get("skyvm-run-id", "")
        rows.append({
            "backend": "skypilot-pool",
            "name": p["name"],
            "state": p.get("status"),
            "kind": kind,
            "run_id": run,
            "run_live": kind == "shared" or run in live,
            "signature": labels.get("skyvm-signature", ""),
            "workers": p.get("workers"),
            "resources": p.get("resources") or "",
        })
    return rows


def gc_pools(bridge: SkyBridge, *, everything: bool = False, dry_run: bool = False) -> list[str]:
    """Tear down skyvm's per-run pools whose run is no longer live (a crashed flow or DAG run leaves
    its warm workers paying); ``everything``: every pool skyvm made, shared ones included. The names."""
    doomed = [r["name"] for r in skyvm_pools(bridge) if everything or not r["run_live"]]
    if not dry_run:
        for name in doomed:
            bridge.pool_down(name)
    return doomed


def _live_run_labels() -> set[str]:
    """The runs of this skyvm home whose process still lives, as their label values."""
    from skyvm.home import Home
    from skyvm.skypilot.task_config import _label_value

    return {_label_value(run) for run in Home.current().live_runs()}
