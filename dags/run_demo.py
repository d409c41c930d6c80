"""`./dev demo`: run every example in dags/, each in its engine's environment, and fail loudly.

    ./dev demo                                  # every part
    ./dev demo --only submit --only status      # some parts
    ./dev demo --replace submit=/tmp/broken.py  # a part runs another script (a test breaks one on purpose)

Each part runs in its own process; its whole output goes to a log, and the lines that show where a
node ran (container, limits) are echoed as they come. A part that fails makes the demo exit 1, naming
the part, its script and its last lines. The Prefect parts share one real `prefect server` started
here (its own PREFECT_HOME, a free port, health-checked, stopped at the end): Prefect's temporary
server gets only 20 s to start, too few on a busy 2-CPU machine. The demo ends with a summary: what
ran, where, at what limits, and how long each part took.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from skyvm import progress, tables

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The lines worth echoing: where a node ran and at what limits, results, states, check rows.
SHOWN = re.compile(r"container=|cpus=|result|Finished in state|deployed|flow run|DAG run|^\$ skyvm|^(connector|store|registry|skypilot)\s|exit codes"
                   r"|TOTAL|^NODE\s|^CHECK\s|^profile:|^count_words|^crunch|^NAME\s|nothing running|pool |all nodes done")
LAST_LINES = 30


@dataclass
class Part:
    name: str
    title: str
    env: str  # the engine's environment under .dev/venv
    argv: list[str]  # "{script}" is the part's script
    script: str = ""
    prefect: bool = False  # needs the demo's Prefect server
    extra_env: dict = field(default_factory=dict)


def parts() -> list[Part]:
    airflow_env = {"AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__DAGS_FOLDER": str(HERE)}
    return [
        Part("submit", "engine-neutral: skyvm.submit", "core", ["python", "{script}"], "submit_example.py"),
        Part("prefect-flow", "Prefect: SkyVMTaskRunner", "prefect", ["python", "{script}"], "prefect_flow.py", prefect=True),
        Part("prefect-deployment", "Prefect: a deployment on a skyvm work pool, run by a skyvm worker", "prefect", ["python", "{script}"],
             "prefect_deployment.py", prefect=True),
        # `airflow db migrate` makes the DAG run's database in a fresh AIRFLOW_HOME (set per run below).
        Part("airflow", "Airflow: SkyVMOperator, @task.skyvm, deferrable", "airflow", ["bash", "-c", 'airflow db migrate && exec python "$0"', "{script}"],
             "airflow_dag.py", extra_env=airflow_env),
        Part("check", "skyvm check: the team connector and its S3 payload store (profile on-s3, an S3 server on loopback)", "core",
             ["python", "{script}"], "check_demo.py"),
        Part("plan", "SkyPilot: the cost plan of dags/skyvm.yaml (SkyPilot's optimizer, offline, the repo's catalog subset)", "skypilot",
             ["skyvm", "plan", "{script}", "--catalog-dir", str(ROOT / "tests" / "skypilot" / "catalog")], "skyvm.yaml"),
        Part("status", "skyvm status: what is left running (nothing: every example's clusters went with its run)", "core", ["skyvm", "status"]),
    ]


@dataclass
class Outcome:
    part: Part
    code: int
    seconds: float
    shown: list[str]
    last: list[str]
    log: Path


def bold(text: str) -> str:
    return f"\033[1m{text}\033[0m" if sys.stdout.isatty() else text


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_of(part: Part, venvs: Path, base: dict) -> dict:
    venv = venvs / part.env
    if not (venv / "bin" / "python").is_file():
        raise SystemExit(f"demo: part {part.name!r} needs the environment {part.env!r} at {venv}: run ./dev setup (or ./dev demo)")
    return {**base, **part.extra_env, "PATH": f"{venv / 'bin'}{os.pathsep}{base.get('PATH', '')}", "VIRTUAL_ENV": str(venv)}


class PrefectServer:
    """One real `prefect server start` for the demo's Prefect parts, in its own PREFECT_HOME."""

    def __init__(self, env: dict, state: Path, ready_timeout_s: float = 300):
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.log = state / "prefect-server.log"
        server_env = {**env, "PREFECT_HOME": str(state / "prefect-home")}
        server_env.pop("PREFECT_API_URL", None)
        self.proc = subprocess.Popen(["python", "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                                     env=server_env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        with progress.step(f"starting a Prefect server for the demo on port {self.port}", logger="skyvm.demo"):
            deadline = time.monotonic() + ready_timeout_s
            while not self.healthy():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    tail = "".join(deque(open(self.log), LAST_LINES))
                    raise SystemExit(f"demo: the Prefect server did not answer {self.api}/health (log {self.log}):\n{tail}")
                time.sleep(0.5)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.api + "/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def client_env(self, state: Path) -> dict:
        return {"PREFECT_API_URL": self.api, "PREFECT_HOME": str(state / "prefect-home")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def run_part(part: Part, env: dict, state: Path) -> Outcome:
    print("\n" + bold(f"==> {part.title}") + (f" (dags/{part.script})" if part.script else ""), flush=True)
    argv = [a.replace("{script}", part.script if os.path.isabs(part.script) else str(HERE / part.script)) for a in part.argv]
    log = state / f"{part.name}.log"
    shown, last = [], deque(maxlen=LAST_LINES)
    started = time.monotonic()
    with progress.step(f"demo part {part.name!r}", logger="skyvm.demo"), open(log, "w") as out:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            out.write(line)
            last.append(line.rstrip("\n"))
            if SHOWN.search(line):
                shown.append(line.rstrip("\n"))
                print("    " + line.rstrip("\n"), flush=True)
        code = proc.wait()
    outcome = Outcome(part, code, time.monotonic() - started, shown, list(last), log)
    if code != 0:
        print(f"\ndemo: example {part.name!r} ({' '.join(argv)}) FAILED with exit code {code}; its last lines (whole log: {log}):", file=sys.stderr)
        print("\n".join("  | " + line for line in outcome.last), file=sys.stderr, flush=True)
    return outcome


# A node's line as an example prints it: where it ran (its container) and the limits seen inside.
PLACED = re.compile(r"container=|cpus=[\d.]+ memory=[\d.]+ GiB|^TOTAL ")
# Prefect's log prefix ("10:36:44.120 | INFO    | Flow run 'x' - "): not needed in the summary.
PREFECT_PREFIX = re.compile(r"^\S+ \| \w+\s+\| Flow run '[^']*' - ")


def summary(outcomes: list[Outcome]) -> str:
    placed = {o.part.name: [PREFECT_PREFIX.sub("", line.strip()) for line in o.shown if PLACED.search(line)] for o in outcomes}
    rows = [(o.part.name, "ok" if o.code == 0 else f"FAILED ({o.code})", o.part.env, f"{o.seconds:.1f}s", len(placed[o.part.name])) for o in outcomes]
    lines = ["", bold("==> summary: what ran, where, at what limits, how long"), tables.render(rows, ["part", "result", "environment", "took", "nodes"])]
    for name, nodes in placed.items():
        if nodes:
            lines.append(f"{name}:")
            lines += [f"  {line[:160]}" for line in nodes]
    return "\n".join(lines)


def main(argv=None) -> int:
    every = {p.name: p for p in parts()}
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=list(every), help="run only this part (repeatable)")
    parser.add_argument("--replace", action="append", default=[], metavar="PART=SCRIPT", help="run SCRIPT as PART's script")
    parser.add_argument("--venv-dir", default=str(ROOT / ".dev" / "venv"), help="where the engines' environments are (default: .dev/venv)")
    args = parser.parse_args(argv)
    # Without a terminal (CI, a pipe) progress is log lines: start, every 10 s, end with the time.
    logging.basicConfig(level=logging.INFO, format="    [%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    chosen = [every[name] for name in (args.only or every)]
    for spec in args.replace:
        name, sep, script = spec.partition("=")
        if not sep or name not in every or not Path(script).is_file():
            parser.error(f"--replace {spec!r}: expected PART=SCRIPT with PART one of {', '.join(every)} and SCRIPT an existing file")
        every[name].script = str(Path(script).resolve())
    state = Path(tempfile.mkdtemp(prefix="skyvm-demo-"))
    # Belt and braces: any temporary Prefect server a part still starts gets minutes, not 20 s.
    base = {**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    server = None
    outcomes = []
    started = time.monotonic()
    try:
        for part in chosen:
            env = env_of(part, Path(args.venv_dir), base)
            if part.prefect:
                server = server or PrefectServer(env, state)
                env.update(server.client_env(state))
            if part.name == "airflow":
                env["AIRFLOW_HOME"] = str(state / "airflow-home")
            outcomes.append(run_part(part, env, state))
    finally:
        if server is not None:
            server.stop()
    print(summary(outcomes))
    failed = [o.part.name for o in outcomes if o.code != 0]
    took = f"{len(outcomes)} part(s) in {time.monotonic() - started:.0f}s"
    if failed:
        print(f"\n{took}; logs kept in {state}")
        print(f"demo FAILED: {', '.join(failed)} (their last lines are above)", file=sys.stderr)
        return 1
    shutil.rmtree(state, ignore_errors=True)
    print(f"\n{took}: every part passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
