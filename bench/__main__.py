"""python -m bench SCENARIO|all|list [--n N] [--reps R] [--smoke] [--set KEY=VALUE ...] [--out DIR]

(or ``python PATH/TO/bench ...`` from any directory)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

if not __package__:  # `python bench ...` (the folder) from anywhere: import it as the package it is
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]  # its modules are not top-level ones
    sys.path.insert(0, str(_here.parent))

from bench import common  # noqa: E402 - stdlib only: safe before skyvm's home is chosen

# skyvm reads SKYVM_HOME when first imported: choose the private one before anything imports it.
_HOME = common.private_home()

from bench import ENVS, SCENARIOS, load  # noqa: E402


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants KEY=VALUE, got {item!r}")
        out[key.replace("-", "_")] = value
    return out


def run_one(name: str, args, env: str, extra: dict) -> str:
    """Run one scenario; returns its status: ok, skipped or error."""
    sc = SCENARIOS[name]
    n = args.n if args.n is not None else args.trials if args.trials is not None else (sc.smoke_n if args.smoke else sc.n)
    reps = args.reps if args.reps is not None else (sc.smoke_reps if args.smoke else sc.reps)
    options = {**sc.options, **extra}
    bench = common.Bench(name, n=n, reps=reps, smoke=args.smoke, options=options, env=env)
    bench.explicit = set(extra)  # options given on the command line (a smoke run keeps those, shrinks the rest)
    print(f"\n### {name}: {sc.help} (n={n} {sc.n_means}, reps={reps}{', smoke' if args.smoke else ''}; session {bench.session})", flush=True)
    if sc.env != env:
        print(f"  note: {name} belongs to the '{sc.env}' environment (./dev run {sc.env} -- python -m bench {name}); this is '{env}'", flush=True)
    status, error = "ok", None
    saved_env = dict(os.environ)  # a scenario's servers and stand-ins set variables: none outlives it
    try:
        sc(bench)
    except common.Skip as exc:
        status, error = "skipped", str(exc)
        print(f"  SKIPPED: {exc}", flush=True)
    except Exception as exc:  # noqa: BLE001 - reported, recorded, and the exit code says so
        status, error = "error", f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        for fn in reversed(bench.cleanups):
            try:
                fn()
            except Exception:  # noqa: BLE001 - the next cleanup still runs
                traceback.print_exc()
        bench.remove_kept()
        os.environ.clear()
        os.environ.update(saved_env)
        left = bench.leftovers()
        if left:
            common.sh("docker", "rm", "-f", *left, check=False)
            if status == "ok":
                status, error = "error", f"containers left behind (removed now): {left}"
            print(f"  ERROR: {len(left)} container(s) left behind by {name}: {left}", flush=True)
    print(bench.table(), flush=True)
    data = bench.record(status, error, left)
    out_dir = Path(args.out) if args.out else common.RESULTS / ("smoke" if args.smoke else "")
    path = bench.write(data, out_dir)
    print(f"  {status}; wrote {path.relative_to(common.ROOT) if path.is_relative_to(common.ROOT) else path}", flush=True)
    return status


def report(scenarios: dict, results: Path) -> str:
    """Markdown of the latest (non-smoke) result of every scenario: targets first, then medians."""
    import json

    latest = {}
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("status") == "ok" and not data["params"].get("smoke"):
            latest[data["scenario"]] = (path, data)
    if not latest:
        return f"no results in {results}"
    first = next(iter(latest.values()))[1]
    m = first["machine"]
    commits = sorted({d["git"]["commit"][:10] + ("+" if d["git"].get("dirty") else "") for _, d in latest.values() if d["git"]["commit"]})
    dates = sorted(d["date"][:16].replace("T", " ") for _, d in latest.values())
    out = [
        f"Machine: {m['cpus']} CPUs, {m['memory_gib']} GiB, Linux {m['kernel']}, Docker {m['docker']}, Python {m['python']}; "
        f"run {dates[0]} to {dates[-1]}, commit {', '.join(commits)} (+: with uncommitted changes in the tree).",
        "",
        "| scenario | target | measured | limit | met |",
        "|---|---|---|---|---|",
    ]
    for name, (path, d) in latest.items():
        for t in d["targets"]:
            out.append(f"| {name} | {t['name']} | {common.fmt(t['measured'], t['unit'])} | {t['op']} {common.fmt(t['limit'], t['unit'])} | {t['result']} |")
    for name, (path, d) in latest.items():
        p = d["params"]
        out += ["", f"`{name}` (n={p['n']}, reps={p['reps']}; {path.name}):", "", "| series | n | median | min | max |", "|---|---|---|---|---|"]
        for sname, s in d["series"].items():
            out.append(f"| {sname} | {s['n']} | {common.fmt(s['median'], s['unit'])} | {common.fmt(s['min'], s['unit'])} | {common.fmt(s['max'], s['unit'])} |")
        comps = [f"{c['name']}: {common.fmt(c['value'], c['unit'])}" for c in d["comparisons"] if c.get("kind") != "throughput"]
        if comps:
            out += ["", "; ".join(comps) + "."]
        for note in d["notes"]:
            out += ["", f"Note: {note}"]
    return "\n".join(out)


def main(argv=None) -> int:
    scenarios = load()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("scenario", help="a scenario, 'all' (those of this environment), 'list', or 'report' (markdown of the latest results)")
    parser.add_argument("--n", type=int, help="size: nodes (or MiB for payloads); default per scenario")
    parser.add_argument("--reps", type=int, help="repetitions; default per scenario")
    parser.add_argument("--trials", type=int, help="faults: how many times each fault trial runs (its N)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition: checks that it runs and results are right, asserts no timing")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a scenario option (see list)")
    parser.add_argument("--env", choices=("core", "prefect", "airflow", "skypilot"), help="this environment, for 'all' (default: detected)")
    parser.add_argument("--out", help="where the JSON goes (default bench/results, bench/results/smoke with --smoke)")
    args = parser.parse_args(argv)
    env = args.env or common.current_env()
    if args.scenario == "list":
        for sc in sorted(scenarios.values(), key=lambda s: (ENVS.index(s.env), s.name)):
            opts = " ".join(f"{k}={v}" for k, v in sc.options.items())
            print(f"{sc.name:<10} [{sc.env}] {sc.help}; n={sc.n} {sc.n_means}, reps={sc.reps}; smoke n={sc.smoke_n}" + (f"; --set {opts}" if opts else "") + ("" if sc.in_all else " (not in 'all')"))
        return 0
    if args.scenario == "report":
        print(report(scenarios, Path(args.out) if args.out else common.RESULTS))
        return 0
    if args.scenario == "all":
        names = [s.name for s in scenarios.values() if s.env == env and s.in_all]
        if not names:
            print(f"no scenario belongs to the '{env}' environment")
            return 0
    elif args.scenario in scenarios:
        names = [args.scenario]
    else:
        parser.error(f"unknown scenario {args.scenario!r}; known: {', '.join(scenarios)}, all, list")
    extra = parse_set(args.set)
    t0 = time.time()
    statuses = {name: run_one(name, args, env, extra) for name in names}
    print(f"\n{' '.join(f'{k}: {v}' for k, v in statuses.items())}  ({time.time() - t0:.0f} s)")
    return 1 if "error" in statuses.values() else 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        if not os.environ.get("SKYVM_BENCH_KEEP_HOME") and _HOME.name.startswith("skyvm-bench-home-"):
            shutil.rmtree(_HOME, ignore_errors=True)
    sys.exit(code)
