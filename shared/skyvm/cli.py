"""The ``skyvm`` command: validate and inspect settings, list and clean up what skyvm started.

Holds the argument parser and one small function per command: each parses, calls the core (settings,
maintenance, skyvm.skypilot.clusters, planning, check) and prints what it got (tables through skyvm.tables).
May import: any skyvm module (lazily, per command, so ``skyvm validate`` loads no Docker or SkyPilot code).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Optional

import yaml

from skyvm import tables
from skyvm.errors import SettingsError, SkyVMError
from skyvm.settings import SkyVMConfig


def cmd_validate(args) -> int:
    config = SkyVMConfig.load(args.file)
    print(f"{args.file}: OK ({len(config.profiles)} profiles, {len(config.nodes)} nodes)")
    return 0


def cmd_settings(args) -> int:
    config = SkyVMConfig.load(args.file)
    settings = config.resolve(args.node, profile=args.profile)
    data = settings.public_dump()
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
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


def cmd_status(args) -> int:
    from skyvm.engine import docker_available
    from skyvm.home import Home
    from skyvm.maintenance import list_managed

    every = list_managed(all_homes=True)
    mine = Home.current().id
    rows = [{"backend": "local", "install": _install(r), **r} for r in every if args.all_homes or r["home"] == mine]
    others = {r["home"] for r in every if r["home"] != mine}
    sky_rows, pool_rows = _skypilot_rows() if args.skypilot else ([], [])
    if args.json:
        print(json.dumps(rows + sky_rows + pool_rows, indent=2))
        return 0
    if not docker_available():
        print("no Docker engine reachable: nothing to list for the local backend")
    elif not rows:
        print("nothing running: this skyvm install has no clusters on this machine")
    else:
        columns = ["name", "state", "run_id", "node", "signature", "down", "status"]
        print(tables.render(rows, columns + ["install"] if args.all_homes else columns))
    if others and not args.all_homes:
        print(f"({len(every) - len(rows)} cluster(s) of {len(others)} other skyvm install(s) on this engine: skyvm status --all-homes)")
    if args.skypilot:
        if sky_rows:
            print("\nSkyPilot clusters (skyvm's labels):")
            print(tables.render(sky_rows, ["name", "state", "run_id", "node", "resources", "autostop_min", "down"]))
        else:
            print("no SkyPilot clusters launched by skyvm")
        if pool_rows:
            print("\nSkyPilot pools (skyvm's labels):")
            print(tables.render(pool_rows, ["name", "state", "kind", "run_id", "run_live", "workers", "resources"]))
    return 0


def _home_id(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{4,12}", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not an install's id: 4 to 12 hex digits, as `skyvm status --all-homes` shows it")
    return value


def _said(count_of: str, items: list) -> str:
    """``"<count_of>: a, b"``, or just the count when there is nothing to name."""
    return count_of + (": " + ", ".join(map(str, items)) if items else "")


def cmd_gc(args) -> int:
    from skyvm.connectors.files import gc_secret_dirs
    from skyvm.home import Home
    from skyvm.maintenance import gc_clusters, gc_images, list_managed

    homes = args.home_id or ("all" if args.all_homes else "own")
    removed = gc_clusters(dry_run=args.dry_run, homes=homes)
    verb = "would remove" if args.dry_run else "removed"
    mine = Home.current().id
    # Another install's cluster is named with its install: whose it was is never a guess.
    names = [r["name"] if r["home"] == mine else f"{r['name']} (install {_install(r)})" for r in removed]
    print(_said(f"{verb} {len(removed)} cluster(s)", names))
    if homes == "own":
        others = {r["home"] for r in list_managed(all_homes=True) if r["home"] != mine}
        if others:
            print(f"left alone: clusters of {len(others)} other skyvm install(s) ({', '.join(sorted(others))}); --home-id ID or --all-homes removes theirs")
    secrets = gc_secret_dirs(dry_run=args.dry_run)
    print(_said(f"{verb} {len(secrets)} credential directory(ies) of processes that are gone", secrets))
    if args.images is not None:
        images = gc_images(keep=args.images, dry_run=args.dry_run)
        print(f"{verb} {len(images)} old node image tag(s)")
    if args.skypilot or args.all_skypilot:
        _gc_skypilot(everything=args.all_skypilot, dry_run=args.dry_run)
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


def cmd_plan(args) -> int:
    from skyvm.skypilot.planning import entries_of_config, entries_of_dag_file, format_table, plan

    if args.source.endswith(".py"):
        config = SkyVMConfig.load(args.settings) if args.settings else None
        entries = entries_of_dag_file(args.source, config)
    else:
        entries = entries_of_config(SkyVMConfig.load(args.source))
    if not entries:
        print(f"{args.source}: no skyvm nodes or profiles found")
        return 1
    rows = plan(entries, catalog_dir=args.catalog_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
    return 0


def cmd_check(args) -> int:
    from skyvm.check import FAIL, format_rows, run_checks

    config = SkyVMConfig.load(args.config)
    rows = run_checks(config, profile=args.profile, node=args.node, skypilot=False if args.no_skypilot else None)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        print(f"{config.source or 'built-in defaults'}:")
        print(format_rows(rows))
    failed = [r for r in rows if r.result == FAIL]
    if failed and not args.json:
        print(f"\n{len(failed)} check(s) failed", file=sys.stderr)
    return 1 if failed else 0


def cmd_skypilot_install(args) -> int:
    from skyvm.skypilot.install import install

    python = install(version=args.version)
    print(f"SkyPilot environment ready: {python}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skyvm", description="Run Prefect and Airflow nodes in containers on SkyPilot VMs.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("validate", help="check a shared settings file")
    p.add_argument("file")
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("settings", help="print the resolved settings of one node")
    p.add_argument("file")
    p.add_argument("--node", required=True, help="the Prefect task name or Airflow task_id")
    p.add_argument("--profile", help="a profile to apply, as code would")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_settings)
    p = sub.add_parser("plan", help="cost plan: SkyPilot's choice and hourly price per node, offline")
    p.add_argument("source", help="the shared settings YAML (every profile and node) or an Airflow DAG file (its SkyVM tasks)")
    p.add_argument("--catalog-dir", help="SkyPilot v8 catalogs (<dir>/<cloud>/vms.csv); default: SkyPilot's own cache")
    p.add_argument("--settings", help="for a DAG file: the settings YAML, when its tasks name none")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("check", help="prove every connector, payload store, registry and cloud the settings use works")
    p.add_argument("--config", help="the shared settings YAML (default: $SKYVM_CONFIG, else ./skyvm.yaml)")
    p.add_argument("--profile", help="check only what this profile uses")
    p.add_argument("--node", help="check only what this node uses")
    p.add_argument("--no-skypilot", action="store_true", help="skip SkyPilot's own cloud check")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_check)
    p = sub.add_parser("skypilot", help="SkyPilot's own environment (SkyPilot cannot share one with Airflow >= 3.1.3)")
    skysub = p.add_subparsers(dest="skypilot_cmd", required=True)
    q = skysub.add_parser("install", help="make $SKYVM_HOME/skypilot-venv with SkyPilot and skyvm")
    q.add_argument("--version", default="0.14.1")
    q.set_defaults(fn=cmd_skypilot_install)
    p = sub.add_parser("status", help="list the clusters this skyvm install (its SKYVM_HOME) started")
    p.add_argument("--json", action="store_true")
    p.add_argument("--all-homes", action="store_true", help="every skyvm install's clusters on this Docker engine, with the install of each")
    p.add_argument("--skypilot", action="store_true", help="also SkyPilot's clusters that skyvm launched (asks SkyPilot's API server)")
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("gc", help="remove clusters of this skyvm install that no live run owns")
    p.add_argument("--dry-run", action="store_true")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--home-id", metavar="ID", type=_home_id, help="instead, the clusters of the skyvm install with this id (`skyvm status --all-homes`) that no live run owns")
    which.add_argument("--all-homes", action="store_true", help="also every other skyvm install's clusters on this Docker engine that no live run owns")
    p.add_argument("--images", type=int, metavar="KEEP", help="also remove node images but the newest KEEP")
    p.add_argument("--skypilot", action="store_true", help="also tear down skyvm's idle SkyPilot clusters (INIT or STOPPED) and the pools of runs that are over")
    p.add_argument("--all-skypilot", action="store_true", help="tear down every SkyPilot cluster and pool skyvm launched, running nodes and shared pools included")
    p.set_defaults(fn=cmd_gc)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SettingsError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except SkyVMError as exc:
        print(f"skyvm: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
