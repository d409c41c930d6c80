"""What a run's nodes were: one row per node (where it ran, its limits, how long, at what price, what
it cost) and the total, as JSON-able rows and as a table. Every place a user looks shows these:
``Run.close``'s log, an Airflow task's log and its XCom ``skyvm``, a Prefect flow run's artifact.

    rows = [node_row(handle) for handle in ...]      # or run.cost_summary()
    summary = Summary.of(rows)
    summary.table()                                  # text, through skyvm.tables
    summary.to_json()                                # {"rows": [...], "total_cost": ..., ...}

A row's placement is what the backend reported where it did (``NodeRef.extra["placement"]``: cloud,
region, zone, instance type, spot, price), else what the node's settings asked for. A local node's
placement is ``local`` and its container: its limits are all it has, and it costs nothing by the
hour (a ``local process``, where no Docker engine is, has no limits at all). A
node on a SkyPilot pool is a job on one of the pool's workers: its price is a worker's, when known.
A price the backend did not report leaves the node's cost unknown (``None``), never 0, and the
summary names those nodes beside the total.

Holds ``node_row``, ``limits_of``, ``Summary``, ``COLUMNS``. May import: skyvm.tables (a handle is
only passed in: never skyvm.handle or skyvm.run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

from skyvm.tables import render

# The table's columns, in order; every row has these keys (and more: cluster, backend, cloud, ...).
COLUMNS = ("node", "placement", "limits", "duration", "price", "cost")
_PLACED = ("cloud", "region", "zone", "instance_type", "use_spot")
# Settings fields that bound what a node may use, in the order a table shows them.
_LIMITS = ("cpus", "memory", "accelerators", "disk_size", "num_nodes")
# The local backends, and what their placement reads: a container, or (no Docker engine) a plain host
# process, which enforces no limits at all.
_LOCAL = {"local": "local", "local-process": "local process"}


def limits_of(settings: Any) -> dict[str, Any]:
    """The node's limits as its settings give them (the local container's --cpus/--memory, a VM's
    minimum): only those set. ``memory`` and ``disk_size`` are GiB, as in the settings."""
    limits = {}
    for name in _LIMITS:
        value = getattr(settings, name, None)
        if value is not None and not (name == "num_nodes" and value == 1):
            limits[name] = value
    return limits


def limits_text(limits: Mapping[str, Any]) -> str:
    """A node's limits as one short text (``cpus=2 memory=4GiB``)."""
    if not limits:
        return "none"
    unit = {"memory": "GiB", "disk_size": "GiB"}
    parts = []
    for name, value in limits.items():
        if isinstance(value, Mapping):  # accelerators: {"A100": 2}
            value = ",".join(f"{k}:{v:g}" if isinstance(v, (int, float)) else f"{k}:{v}" for k, v in value.items())
        parts.append(f"{name}={value}{unit.get(name, '')}")
    return " ".join(parts)


def _placement(settings: Any, ref: Any) -> dict[str, Any]:
    """Where the node ran: the backend's report (``reported: True``), else what its settings asked."""
    extra = getattr(ref, "extra", None) or {}
    if getattr(ref, "backend", None) in _LOCAL:
        return {"reported": True}
    reported = extra.get("placement") or {}
    where = {k: reported.get(k) for k in _PLACED} if reported else {k: getattr(settings, k, None) for k in _PLACED}
    if not reported and where["cloud"] is None and getattr(settings, "infra", None):
        where["cloud"] = settings.infra
    where["reported"] = bool(reported)
    where["hourly_price"] = reported.get("hourly_price")
    return where


def _placement_text(row: Mapping[str, Any]) -> str:
    if row["backend"] in _LOCAL:
        return f"{_LOCAL[row['backend']]} ({row['cluster']})"
    parts = [str(row[k]) for k in ("cloud", "region", "zone", "instance_type") if row.get(k)]
    text = " ".join(parts) or "any cloud"
    if row.get("use_spot"):
        text += " (spot)"
    if not row["placement_reported"]:
        text += " (as asked; not reported)"
    if row.get("pool"):
        return f"pool {row['pool']}: {text}"
    if row.get("managed"):
        return f"managed job {row['cluster']}: {text}"
    return f"{row['cluster']}: {text}" if row["cluster"] else text


def node_row(handle: Any, *, started_at: Optional[float] = None, finished_at: Optional[float] = None) -> Optional[dict]:
    """The node's row, JSON-able; None when it was never launched (it ran nowhere). ``started_at`` and
    ``finished_at`` (epoch seconds) stand in for the handle's own when it has none: a handle found again
    from its reference (an Airflow task back from its trigger) did not see the node start or end."""
    ref = getattr(handle, "ref", None)
    if ref is None:
        return None
    settings = handle.settings
    started = handle.started_at if handle.started_at is not None else started_at
    finished = handle.finished_at if handle.finished_at is not None else finished_at
    duration = handle.duration_s if handle.started_at is not None else (None if started is None else (finished or started) - started)
    where = _placement(settings, ref)
    # A local node has no price by the hour; a cloud node's is the backend's, when it said one.
    price = 0.0 if ref.backend in _LOCAL else (ref.hourly_price if ref.hourly_price is not None else where.get("hourly_price"))
    cost = None if price is None or duration is None else round(duration * price / 3600, 6)
    limits = {} if ref.backend == "local-process" else limits_of(settings)
    row = {
        "node": handle.node,
        "cluster": ref.cluster,
        "backend": ref.backend,
        **{k: where.get(k) for k in _PLACED},
        "placement_reported": where["reported"],
        "pool": (ref.extra or {}).get("pool"),
        "managed": bool(ref.managed) and not (ref.extra or {}).get("pool"),
        "limits": limits,
        "started_at": started,
        "duration_s": None if duration is None else round(duration, 1),
        "hourly_price": price,
        "cost": cost,
    }
    return {**row, "placement": _placement_text(row)}


def _money(value: Optional[float], digits: int) -> str:
    return "unknown" if value is None else f"${value:.{digits}f}"


@dataclass(frozen=True)
class Summary:
    """Rows and their total. ``total_cost`` adds the rows' known costs (or, from a run that keeps only
    its last rows, all its finished nodes'); ``unpriced`` names nodes whose cost is unknown."""

    rows: list[dict]
    total_cost: float
    nodes: int  # nodes the total covers (more than the rows when older rows were let go)
    unpriced: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, rows: Iterable[Optional[Mapping[str, Any]]], *, total_cost: Optional[float] = None, nodes: Optional[int] = None) -> "Summary":
        rows = [dict(r) for r in rows if r is not None]
        known = round(sum(r["cost"] for r in rows if r["cost"] is not None), 6)
        return cls(rows, known if total_cost is None else round(total_cost, 6), len(rows) if nodes is None else nodes, [r["node"] for r in rows if r["cost"] is None])

    def to_json(self) -> dict[str, Any]:
        """The summary as JSON: ``rows`` (every row's fields), ``total_cost``, ``nodes``, ``unpriced``."""
        return {"rows": self.rows, "total_cost": self.total_cost, "nodes": self.nodes, "unpriced": list(self.unpriced)}

    def table(self, *, width: Optional[int] = -1) -> str:
        """The rows as a table (``COLUMNS``) and a closing total row, through skyvm.tables."""
        cells = [
            {
                "node": r["node"],
                "placement": r["placement"],
                "limits": limits_text(r["limits"]),
                "duration": "-" if r["duration_s"] is None else f"{r['duration_s']:.1f}s",
                "price": _money(r["hourly_price"], 4) + ("/h" if r["hourly_price"] is not None else ""),
                "cost": _money(r["cost"], 6),
            }
            for r in self.rows
        ]
        total = f"${self.total_cost:.6f}" + (f" + unknown ({', '.join(self.unpriced)})" if self.unpriced else "")
        shown = f"{self.nodes} node(s)" if self.nodes == len(self.rows) else f"{self.nodes} node(s), the last {len(self.rows)} listed"
        cells.append({"node": "total", "placement": shown, "cost": total})
        return render(cells, COLUMNS, width=width)
