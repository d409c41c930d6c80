"""``skyvm plan``: what each node would get from SkyPilot's optimizer, and what it costs per hour.

Works offline and with no cloud credentials: the optimizer runs in a fresh
process (this Python when ``sky`` imports here, else skyvm's SkyPilot
environment) whose SkyPilot runtime directory holds the catalogs given.

Its table goes through ``skyvm.tables`` (one renderer for the CLI).
May import: skyvm.tables, skyvm.errors, skyvm.plan, skyvm.settings and skyvm.skypilot (agent_setup, bridge, placing, task_config).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from skyvm import tables
from skyvm.errors import InfrastructureError
from skyvm.plan import resources as node_resources
from skyvm.settings import NodeSettings, SkyVMConfig
from skyvm.skypilot.bridge import SubprocessBridge, sky_importable, skypilot_python
from skyvm.skypilot.agent_setup import warm_path
from skyvm.skypilot.placing import place
from skyvm.skypilot.task_config import resources_config


def entries_of_config(config: SkyVMConfig) -> list[tuple[str, NodeSettings]]:
    """Every node entry and every profile of a settings file, resolved."""
    rows = [(f"profile:{name}", config.resolve(f"profile:{name}", profile=name)) for name in config.profiles]
    rows += [(name, config.resolve(name)) for name in config.nodes]
    return rows


def _optimizer_bridge(catalog_dir: Optional[str]) -> tuple[SubprocessBridge, Optional[tempfile.TemporaryDirectory]]:
    python = sys.executable if sky_importable() else skypilot_python()
    if python is None:
        raise InfrastructureError("skyvm plan needs SkyPilot: pip install 'skyvm[skypilot]', or `skyvm skypilot install`")
    env = dict(os.environ)
    tmp = None
    if catalog_dir:
        # SkyPilot binds catalog paths when its modules load: give the optimizer process a runtime dir holding these catalogs.
        catalogs = Path(catalog_dir).resolve()
        if not (catalogs / "common" / "accelerators.csv").is_file():
            raise InfrastructureError(f"--catalog-dir {catalog_dir}: expected SkyPilot v8 catalogs (<dir>/common/accelerators.csv, <dir>/<cloud>/vms.csv)")
        tmp = tempfile.TemporaryDirectory(prefix="skyvm-plan-")
        (Path(tmp.name) / ".sky" / "catalogs").mkdir(parents=True)
        (Path(tmp.name) / ".sky" / "catalogs" / "v8").symlink_to(catalogs)
        env["SKY_RUNTIME_DIR"] = tmp.name
    env["SKYPILOT_DISABLE_USAGE_COLLECTION"] = "1"
    return SubprocessBridge(python, env=env), tmp


def plan(entries: list[tuple[str, NodeSettings]], *, catalog_dir: Optional[str] = None) -> list[dict[str, Any]]:
    """One row per node: what it asks for, where SkyPilot would put it, and the hourly price (or why not)."""
    tasks = [{"name": "plan", "run": "true", "resources": resources_config(node_resources(s))} for _, s in entries]
    bridge, tmp = _optimizer_bridge(catalog_dir)
    try:
        answers = place(bridge, [t["resources"] for t in tasks])
    finally:
        bridge.close()
        if tmp is not None:
            tmp.cleanup()
    rows = []
    for (name, settings), task, answer in zip(entries, tasks, answers):
        requested = {k: v for k, v in task["resources"].items() if k not in ("labels",)}
        row = {"node": name, "requested": requested, **answer, "warm_path": warm_path(settings)}
        if settings.pool is not None and "hourly_price" in answer:
            # A pool keeps its workers up whether nodes run or not: its cost is workers x price.
            row["pool"] = {"name": settings.pool.name, "workers": settings.pool.workers, "hourly_price": round(answer["hourly_price"] * settings.pool.workers, 4)}
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def req(r):
        shown = {k: (f"[{len(v)} candidates]" if k in ("any_of", "ordered") else v) for k, v in r["requested"].items()}
        return ", ".join(f"{k}={v}" for k, v in shown.items()) or "(defaults)"

    header = ("NODE", "REQUESTED", "CLOUD", "REGION", "ZONE", "INSTANCE", "SPOT", "$/HOUR")
    table = []
    total = 0.0
    for r in rows:
        if "error" in r:
            table.append((r["node"], req(r), "-", "-", "-", "-", "-", "-"))
        elif r.get("pool"):
            pool = r["pool"]
            total += pool["hourly_price"]
            price = f"{pool['hourly_price']:.4f} ({pool['workers']} x {r['hourly_price']:.4f}, pool{' ' + pool['name'] if pool['name'] else ''})"
            table.append((r["node"], req(r), r["cloud"], r["region"] or "-", r["zone"] or "-", r["instance_type"], "yes" if r["use_spot"] else "no", price))
        else:
            total += r["hourly_price"]
            table.append((r["node"], req(r), r["cloud"], r["region"] or "-", r["zone"] or "-", r["instance_type"], "yes" if r["use_spot"] else "no", f"{r['hourly_price']:.4f}"))
    lines = [tables.render(table, header)]
    lines.append(f"\nTOTAL (every node above running at once): ${total:.4f}/hour")
    paths: dict[str, list[str]] = {}
    for r in rows:
        paths.setdefault(r["warm_path"], []).append(r["node"])
    lines.append("warm nodes (a cluster of their signature already up) go as: " + "; ".join(f"{path}: {', '.join(nodes)}" for path, nodes in paths.items()))
    for r in rows:
        if "error" in r:
            lines.append(f"{r['node']}: not placeable: {r['error']}")
    for r in rows:
        for c in r.get("candidates", []):
            asked = ", ".join(f"{k}={v}" for k, v in c["requested"].items())
            at = f" ({c['instance_type']}{' spot' if c['use_spot'] else ''} on {c['cloud']} {c['region']}, ${c['hourly_price']:.4f}/hour)" if "hourly_price" in c else ""
            lines.append(f"{r['node']}: candidate {c['candidate']} [{asked}] {c['result']}{at}: {c['why']}")
    return "\n".join(lines)


def entries_of_dag_file(path: str, config: Optional[SkyVMConfig] = None) -> list[tuple[str, NodeSettings]]:
    """The SkyVM tasks of an Airflow DAG file, read without importing Airflow (SkyPilot's
    environment has none): ``SkyVMOperator(...)`` calls and ``@task.skyvm(...)`` functions
    whose task_id, profile, sky_settings/node settings and settings_file are literals."""
    import ast

    from skyvm.settings import as_config

    source = Path(path).read_text()
    tree = ast.parse(source, filename=str(path))
    base_dir = Path(path).resolve().parent
    found: list[tuple[str, NodeSettings]] = []

    def literal(node):
        try:
            return ast.literal_eval(node)
        except (ValueError, SyntaxError):
            return None

    def settings_for(task_id: str, kwargs: dict) -> NodeSettings:
        cfg = config
        settings_file = kwargs.pop("settings_file", None)
        if cfg is None:
            if settings_file is None and (base_dir / "skyvm.yaml").is_file():
                # Not a literal (e.g. a constant built from __file__): the skyvm.yaml beside the DAG file.
                settings_file = "skyvm.yaml"
            cfg = as_config(str(base_dir / settings_file) if settings_file and not Path(settings_file).is_absolute() else settings_file)
        code = dict(kwargs.pop("sky_settings", None) or {})
        code.update({k: v for k, v in kwargs.items() if k in NodeSettings.model_fields})
        return cfg.resolve(task_id, profile=kwargs.get("profile"), code=code)

    def call_kwargs(call: ast.Call) -> dict:
        return {kw.arg: literal(kw.value) for kw in call.keywords if kw.arg}

    # settings_file given through a module-level constant, e.g. SETTINGS = str(Path(__file__).with_name("skyvm.yaml"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "SkyVMOperator":
            kwargs = call_kwargs(node)
            if isinstance(kwargs.get("task_id"), str):
                found.append((kwargs["task_id"], settings_for(kwargs.pop("task_id"), kwargs)))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for deco in node.decorator_list:
                target = deco.func if isinstance(deco, ast.Call) else deco
                if isinstance(target, ast.Attribute) and target.attr == "skyvm":
                    kwargs = call_kwargs(deco) if isinstance(deco, ast.Call) else {}
                    task_id = kwargs.pop("task_id", None) or node.name
                    found.append((task_id, settings_for(task_id, kwargs)))
    return found
