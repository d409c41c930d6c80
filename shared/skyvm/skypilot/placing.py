"""Where a node would land, which of its candidates wins and why the others lose, and the cost cap:
one judgement for ``skyvm plan`` and for every launch (so a launch refuses what the plan refused).

The prices and picks are SkyPilot's optimizer's, asked through the bridge's ``optimize`` (offline,
on the catalogs of the SkyPilot process that answers). Pure apart from that one call.

May import: the standard library and skyvm.candidates (the bridge is passed in).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from skyvm.candidates import CANDIDATE_FIELDS

_PLACE = ("cloud", "region", "zone", "instance_type", "use_spot")
# How a refusal for the cost cap starts (a launch refuses on these, and leaves SkyPilot's other reasons to SkyPilot).
CAP_REFUSAL = "max_hourly_cost $"


def _task(resources: dict[str, Any]) -> dict[str, Any]:
    return {"name": "plan", "run": "true", "resources": resources}


def _key(task: dict) -> str:
    return json.dumps(task, sort_keys=True, default=str)


def requests(resources: dict[str, Any]) -> dict[str, Any]:
    """The optimizer tasks one node needs: ``pick`` (as it would be launched, cap included: SkyPilot's
    own ``max_hourly_cost`` filter) and ``options`` (each candidate alone, uncapped; the node itself
    when it has none), whose prices say why a candidate lost and what the cheapest placement costs."""
    cands = resources.get("any_of") or resources.get("ordered")
    shared = {k: v for k, v in resources.items() if k not in ("any_of", "ordered", "max_hourly_cost")}
    options = [{**shared, **c} for c in cands] if cands else [shared]
    return {"pick": _task(resources), "options": [_task(o) for o in options]}


def distinct_tasks(reqs: list[dict[str, Any]]) -> list[dict]:
    """Every task the requests name, each once: 1,000 nodes of 5 signatures are 5 optimizer runs."""
    seen: dict[str, dict] = {}
    for req in reqs:
        for task in [req["pick"], *req["options"]]:
            seen.setdefault(_key(task), task)
    return list(seen.values())


def where(answer: dict) -> str:
    spot = " (spot)" if answer.get("use_spot") else ""
    place = "/".join(p for p in (answer.get("cloud"), answer.get("region"), answer.get("zone")) if p)
    return f"{answer.get('instance_type')}{spot} on {place}"


def judge(resources: dict[str, Any], req: dict[str, Any], answers: dict[str, dict]) -> dict[str, Any]:
    """One node's row: SkyPilot's pick (or why none), the candidates and why each lost, the cap."""
    pick = dict(answers[_key(req["pick"])])
    options = [dict(answers[_key(t)]) for t in req["options"]]
    cap = resources.get("max_hourly_cost")
    if cap is not None and ("error" in pick or pick["hourly_price"] > cap):
        # SkyPilot's own max_hourly_cost filter leaves some choices alone (an instance_type pinned,
        # some accelerators): skyvm refuses them here, naming the cheapest placement and its price.
        feasible = sorted([o for o in [pick, *options] if "error" not in o], key=lambda o: o["hourly_price"])
        if feasible and feasible[0]["hourly_price"] > cap:
            cheapest = feasible[0]
            pick = {"error": f"{CAP_REFUSAL}{cap:g}/hour: the cheapest feasible placement, {where(cheapest)}, costs ${cheapest['hourly_price']:.4f}/hour"}
        elif feasible and "error" not in pick:
            pick = {"error": f"{CAP_REFUSAL}{cap:g}/hour: SkyPilot would take {where(pick)} at ${pick['hourly_price']:.4f}/hour, "
                             f"though {where(feasible[0])} costs ${feasible[0]['hourly_price']:.4f}/hour: put that candidate first or drop the others"}
    row: dict[str, Any] = {**pick}
    if cap is not None:
        row["max_hourly_cost"] = cap
    cands = resources.get("any_of") or resources.get("ordered")
    if cands:
        kind = "any_of" if resources.get("any_of") else "ordered"
        row["candidates"] = _verdicts(kind, cands, options, pick, cap)
    return row


def _verdicts(kind: str, cands: list[dict], options: list[dict], pick: dict, cap: Optional[float]) -> list[dict]:
    won = None
    if "error" not in pick:
        won = next((i for i, o in enumerate(options) if "error" not in o and all(o.get(k) == pick.get(k) for k in _PLACE)), None)
    out = []
    for i, (cand, option) in enumerate(zip(cands, options)):
        asked = {k: v for k, v in cand.items() if k in CANDIDATE_FIELDS or k == "infra"}
        verdict: dict[str, Any] = {"candidate": i, "requested": asked}
        if "error" in option:
            verdict.update(result="lost", why=f"not placeable: {option['error']}")
        else:
            verdict.update({k: option.get(k) for k in (*_PLACE, "hourly_price")})
            price = option["hourly_price"]
            if i == won:
                verdict.update(result="won", why="cheapest feasible candidate" if kind == "any_of" else "first feasible candidate in order")
            elif cap is not None and price > cap:
                verdict.update(result="lost", why=f"${price:.4f}/hour is over max_hourly_cost ${cap:g}/hour")
            elif won is None:
                verdict.update(result="lost", why="no candidate was chosen")
            elif kind == "ordered" and i > won:
                verdict.update(result="lost", why=f"comes after candidate {won}, which is placeable")
            else:
                winner = options[won]["hourly_price"]
                why = f"${price:.4f}/hour, more than candidate {won}'s ${winner:.4f}/hour" if price > winner else f"same price as candidate {won} (${winner:.4f}/hour); SkyPilot took that one"
                verdict.update(result="lost", why=why)
        out.append(verdict)
    return out


def place(bridge, resources_list: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each node's placement row, asking the bridge's optimizer once per distinct task."""
    reqs = [requests(r) for r in resources_list]
    tasks = distinct_tasks(reqs)
    answers = dict(zip((_key(t) for t in tasks), bridge.optimize(tasks))) if tasks else {}
    return [judge(r, req, answers) for r, req in zip(resources_list, reqs)]


def cap_refusal(row: dict[str, Any]) -> Optional[str]:
    """Why the cost cap refuses this node, or None (within it, or not placeable for another reason:
    SkyPilot's launch says that one itself)."""
    error = row.get("error") or ""
    return error if error.startswith(CAP_REFUSAL) else None
