"""The SkyPilot clusters skyvm launched, for ``skyvm status --skypilot`` and ``skyvm gc --skypilot``.

skyvm's clusters carry its labels (``skyvm-run-id``, ``skyvm-node``,
``skyvm-signature``: see task_config) on the VM; a cluster without them is the
user's own and is never listed or touched.
"""

from __future__ import annotations

from skyvm.skypilot.bridge import SkyBridge

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
