"""Fault trials, many times: ``python -m bench faults --trials 20`` runs every trial of this
environment's module in tests/faults (core: the local backend, two installs on one engine and
the SkyPilot stand-in; prefect; airflow) 20 times in one pytest session, and reports per trial its passes, failures and what was
left behind. The trials themselves live in tests/faults (trials.py and the test modules): the
suite's fixtures (servers, the stand-in, the engines) serve both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from bench import scenario
from bench.common import ROOT, TESTS, Bench, Skip, package_version

MODULES = {"core": "test_core_faults.py", "prefect": "test_prefect_faults.py", "airflow": "test_airflow_faults.py"}


@scenario(
    "faults", env="core", n=20, reps=1, smoke_n=1, n_means="trials of each", in_all=False, options={"select": ""},
    help="fault trials (tests/faults) of this environment, each N times (--trials N): passes, failures, leftovers; "
    "--set select=EXPR runs only the trials pytest's -k EXPR picks",
)
def faults(bench: Bench) -> None:
    module = MODULES.get(bench.env)
    if module is None:
        raise Skip(f"no fault trials belong to the '{bench.env}' environment (they run in: {', '.join(MODULES)})")
    venv = Path(os.environ.get("VIRTUAL_ENV", "")).name  # airflow and airflow31 run the same module
    bench.params["environment"] = venv or bench.env
    for dist in ("apache-airflow", "prefect"):
        if package_version(dist):
            bench.params[dist] = package_version(dist)
    report = Path(tempfile.mkdtemp(prefix="skyvm-bench-faults-")) / "trials.jsonl"
    env = {**os.environ, "SKYVM_FAULT_TRIALS": str(bench.n), "SKYVM_FAULT_REPORT": str(report), "SKYVM_REQUIRE_DOCKER": "1"}
    sky_python = ROOT / ".dev" / "venv" / "skypilot" / "bin" / "python"
    if sky_python.exists():
        env.setdefault("SKYVM_TEST_SKYPILOT_PYTHON", str(sky_python))
    cmd = [sys.executable, "-m", "pytest", str(TESTS / "faults" / module), "-q", "-p", "no:cacheprovider", "-o", "console_output_style=classic"]
    if bench.opt("select", ""):
        cmd += ["-k", bench.opt("select", "")]
    print(f"  {' '.join(cmd[2:])}  (SKYVM_FAULT_TRIALS={bench.n})", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    print("\n".join(proc.stdout.splitlines()[-15:]), flush=True)
    records = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    bench.check(bool(records), f"no trial reported (pytest exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    counts: dict = defaultdict(lambda: {"passed": 0, "failed": 0, "skipped": 0, "left": 0, "left_by_kind": defaultdict(int), "errors": [], "observed": None})
    for r in records:
        c = counts[r["trial"]]
        if r["phase"] == "call":
            c[r["outcome"]] += 1
            if r["outcome"] == "passed":
                bench.add(r["trial"], r["duration_s"], note="seconds a trial took (fault, checks, cleanup)")
        elif r["outcome"] == "failed":
            c["failed"] += 1  # a setup that failed (the trial never ran) or a teardown that found a mess
        observed = r.get("observed") or {}
        c["observed"] = c["observed"] or observed  # what the user saw, once per trial (the error's text)
        for key, value in observed.items():
            if key.endswith("_s") and isinstance(value, (int, float)):
                bench.add(f"{r['trial']}: {key}", value, note="what the user waited (a cancel's return, a state's change)")
        for kind, n in (r.get("left") or {}).items():
            c["left"] += n
            c["left_by_kind"][kind] += n
        if r.get("error"):
            c["errors"].append(r["error"][-600:])
    for trial, c in counts.items():
        ran = c["passed"] + c["failed"]
        bench.target(f"{trial}: failures of {ran}", c["failed"], "==", 0, "count", why=(c["errors"] or [""])[0][-300:])
        bench.target(f"{trial}: left behind", c["left"], "==", 0, "count", why=str(dict(c["left_by_kind"])))
        if c["skipped"]:
            bench.note(f"{trial}: skipped {c['skipped']} time(s)")
    bench.params["trials"] = {t: {k: (dict(v) if isinstance(v, defaultdict) else v) for k, v in c.items()} for t, c in counts.items()}
    if bench.smoke:
        failed = {t: c["errors"] for t, c in counts.items() if c["failed"] or c["left"]}
        bench.check(not failed, f"fault trials failed: {failed}")
