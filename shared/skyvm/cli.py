"""The ``skyvm`` command: validate and inspect settings, plan costs, check access, list and clean up.

Holds the typer app (rich help with examples, shell completion) and one small function per command:
each parses, calls the core (settings, maintenance, skyvm.skypilot.clusters, planning, check) and
prints what it got: tables through skyvm.tables, or ``--output json`` with the same fields. ``main``
runs the app and returns its exit code (``python -m skyvm``, the console script, and tests call it).
May import: typer, yaml and any skyvm module (lazily, per command, so ``skyvm validate``
loads no Docker or SkyPilot code).
"""

from __future__ import annotations

import enum
import json
import re
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml

from skyvm import tables
from skyvm.errors import SettingsError, SkyVMError
from skyvm.settings import SkyVMConfig


class Output(str, enum.Enum):
    table = "table"
    json = "json"


class SettingsOutput(str, enum.Enum):
    yaml = "yaml"
    table = "table"
    json = "json"


app = typer.Typer(
    name="skyvm",
    help="Run every node of a Prefect flow or Airflow DAG in its own container, locally or on a SkyPilot VM.",
    epilog="Where things live: SKYVM_HOME (default ~/.skyvm) holds this install's wheels, images' records, locks and "
    "SkyPilot environment. Docs: README.md.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
skypilot_app = typer.Typer(help="SkyPilot's own environment (SkyPilot cannot share one with Airflow >= 3.1.3).", no_args_is_help=True)
app.add_typer(skypilot_app, name="skypilot")


def _examples(*lines: str) -> str:
    """A command's help epilog: its examples, one a line."""
    return "[b]Examples[/b]\n\n" + "\n\n".join(f"  [cyan]$ {line}[/cyan]" for line in lines)


def _output_option():
    return typer.Option(Output.table, "--output", "-o", case_sensitive=False, help="How to print: JSON carries the same fields as the table.")


JSON_FLAG = typer.Option(False, "--json", hidden=True, help="Same as --output json.")


def _chosen(output, as_json: bool) -> str:
    return "json" if as_json else output.value


def _print_json(data, *, sort_keys: bool = False) -> None:
    """JSON, its keys in the table's order unless sorted."""
    print(json.dumps(data, indent=2, sort_keys=sort_keys, default=str))


@app.command(epilog=_examples("skyvm validate dags/skyvm.yaml"))
def validate(file: Path = typer.Argument(..., help="The shared settings YAML.")) -> int:
    """Check a shared settings file: its profiles, nodes, connectors and references."""
    config = SkyVMConfig.load(str(file))
    print(f"{file}: OK ({len(config.profiles)} profiles, {len(config.nodes)} nodes)")
    return 0


@app.command(epilog=_examples("skyvm settings dags/skyvm.yaml --node crunch", "skyvm settings dags/skyvm.yaml --node pooled --profile warm-pool -o json"))
def settings(
    file: Path = typer.Argument(..., help="The shared settings YAML."),
    node: str = typer.Option(..., "--node", help="The Prefect task name or Airflow task_id."),
    profile: Optional[str] = typer.Option(None, "--profile", help="A profile to apply, as code would."),
    output: SettingsOutput = typer.Option(SettingsOutput.yaml, "--output", "-o", case_sensitive=False, help="YAML (default), a FIELD/VALUE table, or JSON: the same fields."),
    as_json: bool = JSON_FLAG,
) -> int:
    """Print the resolved settings of one node (secrets by reference, never their values)."""
    data = SkyVMConfig.load(str(file)).resolve(node, profile=profile).public_dump()
    chosen = _chosen(output, as_json)
    if chosen == "json":
        _print_json(data, sort_keys=True)
    elif chosen == "table":
        rows = [(key, json.dumps(value) if isinstance(value, (dict, list)) else value) for key, value in sorted(data.items())]
        print(tables.render(rows, ["field", "value"]))
    else:
        print(yaml.safe_dump(data, sort_keys=True), end="")
    return 0


def _skypilot_rows() -> tuple[list[dict], list[dict]]:
    from skyvm.skypilot import clusters
    from skyvm.skypilot.bridge import get_bridge

    bridge = get_bridge()
    return clusters.skyvm_clusters(bridge), _pools_or_none(lambda: clusters.skyvm_pools(bridge))


def _pools_or_none(list_pools):
    """Pools live on SkyPilot's jobs controller, which may be out of reach (offline, not started,
    no network to the cloud): say so, and still report the clusters."""
    try:
        return list_pools()
    except Exception as exc:  # noqa: BLE001 - any failure to ask means the same to the user
        print(f"skyvm: could not list SkyPilot pools ({exc}); clusters are listed, pools are not", file=sys.stderr)
        return []


def _install(row: dict) -> str:
    """Which skyvm install a container is of: its home's id and path."""
    return f"{row['home'] or '?'} ({row['home_path'] or 'path unknown'})"


STATUS_COLUMNS = ["name", "state", "run_id", "node", "signature", "down", "status"]
SKYPILOT_COLUMNS = ["name", "state", "run_id", "node", "resources", "autostop_min", "down"]
POOL_COLUMNS = ["name", "state", "kind", "run_id", "run_live", "workers", "resources"]


@app.command(epilog=_examples("skyvm status", "skyvm status --run 0195f3c2-...  # a Prefect flow run's id, or a run id", "skyvm status --all-homes", "skyvm status --skypilot -o json"))
def status(
    output: Output = _output_option(),
    as_json: bool = JSON_FLAG,
    run: Optional[str] = typer.Option(None, "--run", help="Only the clusters of this run: a skyvm run id (run-..., prefect-..., af-...) or the orchestrator's own id in it (a Prefect flow run's id)."),
    all_homes: bool = typer.Option(False, "--all-homes", help="Every skyvm install's clusters on this Docker engine, with the install of each."),
    skypilot: bool = typer.Option(False, "--skypilot", help="Also SkyPilot's clusters that skyvm launched (asks SkyPilot's API server)."),
) -> int:
    """List the clusters this skyvm install (its SKYVM_HOME) started: a run's are labelled with its run id."""
    from skyvm.engine import docker_available
    from skyvm.home import Home
    from skyvm.maintenance import list_managed

    every = list_managed(all_homes=True)
    mine = Home.current().id
    rows = [{"backend": "local", "install": _install(r), **r} for r in every if all_homes or r["home"] == mine]
    others = {r["home"] for r in every if r["home"] != mine}
    sky_rows, pool_rows = _skypilot_rows() if skypilot else ([], [])
    if run:
        rows, sky_rows, pool_rows = (_of_run(r, run) for r in (rows, sky_rows, pool_rows))
    if _chosen(output, as_json) == "json":
        _print_json(rows + sky_rows + pool_rows)
        return 0
    if not docker_available():
        print("no Docker engine reachable: nothing to list for the local backend")
    elif not rows:
        print("nothing running: this skyvm install has no clusters on this machine")
    else:
        print(tables.render(rows, STATUS_COLUMNS + ["install"] if all_homes else STATUS_COLUMNS))
    if others and not all_homes:
        print(f"({len(every) - len(rows)} cluster(s) of {len(others)} other skyvm install(s) on this engine: skyvm status --all-homes)")
    if skypilot:
        if sky_rows:
            print("\nSkyPilot clusters (skyvm's labels):")
            print(tables.render(sky_rows, SKYPILOT_COLUMNS))
        else:
            print("no SkyPilot clusters launched by skyvm")
        if pool_rows:
            print("\nSkyPilot pools (skyvm's labels):")
            print(tables.render(pool_rows, POOL_COLUMNS))
    return 0


def _of_run(rows: list[dict], run: str) -> list[dict]:
    """Rows of one run: its run id, or the orchestrator's id inside it (``prefect-flow-<flow run id>``)."""
    return [r for r in rows if r.get("run_id") == run or f"-{run}" in (r.get("run_id") or "")]


def _home_id(value: Optional[str]) -> Optional[str]:
    if value is not None and not re.fullmatch(r"[0-9a-f]{4,12}", value):
        raise typer.BadParameter(f"{value!r} is not an install's id: 4 to 12 hex digits, as `skyvm status --all-homes` shows it")
    return value


def _said(count_of: str, items: list) -> str:
    """``"<count_of>: a, b"``, or just the count when there is nothing to name."""
    return count_of + (": " + ", ".join(map(str, items)) if items else "")


@app.command(epilog=_examples("skyvm gc --dry-run", "skyvm gc --images 3", "skyvm gc --home-id 1a2b3c4d5e6f", "skyvm gc --skypilot"))
def gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would go; remove nothing."),
    home_id: Optional[str] = typer.Option(None, "--home-id", metavar="ID", callback=_home_id,
                                          help="Instead, the clusters of the skyvm install with this id (`skyvm status --all-homes`) that no live run owns."),
    all_homes: bool = typer.Option(False, "--all-homes", help="Also every other skyvm install's clusters on this Docker engine that no live run owns."),
    images: Optional[int] = typer.Option(None, "--images", metavar="KEEP", help="Also remove node images but the newest KEEP."),
    skypilot: bool = typer.Option(False, "--skypilot", help="Also tear down skyvm's idle SkyPilot clusters (INIT or STOPPED) and the pools of runs that are over."),
    all_skypilot: bool = typer.Option(False, "--all-skypilot", help="Tear down every SkyPilot cluster and pool skyvm launched, running nodes and shared pools included."),
) -> int:
    """Remove clusters of this skyvm install that no live run owns (and credential directories of processes that are gone)."""
    from skyvm.connectors.files import gc_secret_dirs
    from skyvm.home import Home
    from skyvm.maintenance import gc_clusters, gc_images, list_managed

    if home_id and all_homes:
        raise typer.BadParameter("not allowed with --home-id: one install (--home-id ID), or every install (--all-homes)", param_hint="--all-homes")
    homes = home_id or ("all" if all_homes else "own")
    removed = gc_clusters(dry_run=dry_run, homes=homes)
    verb = "would remove" if dry_run else "removed"
    mine = Home.current().id
    # Another install's cluster is named with its install: whose it was is never a guess.
    names = [r["name"] if r["home"] == mine else f"{r['name']} (install {_install(r)})" for r in removed]
    print(_said(f"{verb} {len(removed)} cluster(s)", names))
    if homes == "own":
        others = {r["home"] for r in list_managed(all_homes=True) if r["home"] != mine}
        if others:
            print(f"left alone: clusters of {len(others)} other skyvm install(s) ({', '.join(sorted(others))}); --home-id ID or --all-homes removes theirs")
    secrets = gc_secret_dirs(dry_run=dry_run)
    print(_said(f"{verb} {len(secrets)} credential directory(ies) of processes that are gone", secrets))
    if images is not None:
        print(f"{verb} {len(gc_images(keep=images, dry_run=dry_run))} old node image tag(s)")
    if skypilot or all_skypilot:
        _gc_skypilot(everything=all_skypilot, dry_run=dry_run)
    return 0


def _gc_skypilot(*, everything: bool, dry_run: bool) -> None:
    from skyvm.skypilot import clusters
    from skyvm.skypilot.bridge import get_bridge

    bridge = get_bridge()
    verb = "would tear down" if dry_run else "tore down"
    downed = clusters.gc_clusters(bridge, everything=everything, dry_run=dry_run)
    print(_said(f"{verb} {len(downed)}{'' if everything else ' idle (INIT/STOPPED)'} SkyPilot cluster(s)", downed))
    pools = _pools_or_none(lambda: clusters.gc_pools(bridge, everything=everything, dry_run=dry_run))
    print(_said(f"{verb} {len(pools)}{'' if everything else ' per-run (their run is over)'} SkyPilot pool(s)", pools))


@app.command(epilog=_examples(
    "skyvm plan dags/skyvm.yaml", "skyvm plan dags/airflow_dag.py --settings dags/skyvm.yaml -o json",
    "skyvm plan dags/skyvm.yaml --allow-unplaceable   # report only: exit 0 even when a node has no placement",
))
def plan(
    source: str = typer.Argument(..., help="The shared settings YAML (every profile and node) or an Airflow DAG file (its SkyVM tasks)."),
    catalog_dir: Optional[str] = typer.Option(None, "--catalog-dir", help="SkyPilot v8 catalogs (<dir>/<cloud>/vms.csv); default: SkyPilot's own cache."),
    settings_file: Optional[str] = typer.Option(None, "--settings", help="For a DAG file: the settings YAML, when its tasks name none."),
    output: Output = _output_option(),
    as_json: bool = JSON_FLAG,
    allow_unplaceable: bool = typer.Option(False, "--allow-unplaceable", help="Exit 0 even when a node cannot be placed or is over its max_hourly_cost."),
) -> int:
    """Cost plan, offline: SkyPilot's choice and hourly price per node. Exits 1 when a node cannot be placed or is over its cap."""
    from skyvm.skypilot.planning import entries_of_config, entries_of_dag_file, format_table, plan as plan_rows

    if source.endswith(".py"):
        entries = entries_of_dag_file(source, SkyVMConfig.load(settings_file) if settings_file else None)
    else:
        entries = entries_of_config(SkyVMConfig.load(source))
    if not entries:
        print(f"{source}: no skyvm nodes or profiles found", file=sys.stderr)
        return 1
    rows = plan_rows(entries, catalog_dir=catalog_dir)
    if _chosen(output, as_json) == "json":
        _print_json(rows)
    else:
        print(format_table(rows))
    refused = [r["node"] for r in rows if "error" in r]
    if refused and not allow_unplaceable:
        print(f"skyvm plan: {len(refused)} node(s) cannot be placed or are over their max_hourly_cost: {', '.join(refused)} "
              f"(--allow-unplaceable to report only)", file=sys.stderr)
        return 1
    return 0


@app.command(epilog=_examples("skyvm check --config dags/skyvm.yaml", "skyvm check --profile on-s3 --no-skypilot -o json"))
def check(
    config_file: Optional[str] = typer.Option(None, "--config", help="The shared settings YAML (default: $SKYVM_CONFIG, else ./skyvm.yaml)."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Check only what this profile uses."),
    node: Optional[str] = typer.Option(None, "--node", help="Check only what this node uses."),
    no_skypilot: bool = typer.Option(False, "--no-skypilot", help="Skip SkyPilot's own cloud check."),
    output: Output = _output_option(),
    as_json: bool = JSON_FLAG,
) -> int:
    """Prove every connector, payload store, registry and cloud the settings use works. Exits 1 when a check fails."""
    from skyvm.check import FAIL, format_rows, run_checks

    config = SkyVMConfig.load(config_file)
    rows = run_checks(config, profile=profile, node=node, skypilot=False if no_skypilot else None)
    failed = [r for r in rows if r.result == FAIL]
    if _chosen(output, as_json) == "json":
        _print_json([r.as_dict() for r in rows])
    else:
        print(f"{config.source or 'built-in defaults'}:")
        print(format_rows(rows))
        if failed:
            print(f"\n{len(failed)} check(s) failed", file=sys.stderr)
    return 1 if failed else 0


@skypilot_app.command("install", epilog=_examples("skyvm skypilot install", "skyvm skypilot install --version 0.14.1"))
def skypilot_install(version: str = typer.Option("0.14.1", "--version", help="The SkyPilot version to install.")) -> int:
    """Make $SKYVM_HOME/skypilot-venv with SkyPilot and skyvm."""
    from skyvm.skypilot.install import install

    print(f"SkyPilot environment ready: {install(version=version)}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command line; the exit code: 0 done, 1 a failure (a check, a node with no placement), 2 bad input."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="skyvm", standalone_mode=False)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except typer.TyperException as exc:  # bad usage: said with the command's usage line, as click says it
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except SettingsError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except SkyVMError as exc:
        print(f"skyvm: {exc}", file=sys.stderr)
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
