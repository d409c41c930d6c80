"""Fault trials: each does a fault as a user would meet it, checks what the user sees, and counts
what is left behind.

A trial is a plain function: it raises ``TrialFailed`` (an AssertionError) when the user-visible
outcome is wrong (a hang, a wrong state, an unclear error), and returns an ``Outcome`` whose
``left`` counts what is still there afterwards (containers, stand-in VMs, processes), each of
which must be zero. ``tests/faults/test_*_faults.py`` run each trial once (``./dev test``);
``python -m bench faults --trials N`` runs them N times and reports passes, failures and leftovers.

Only skyvm's public API, the docker CLI and the engines' own APIs are used to cause and to observe
a fault; the fault is real (a killed process, a stopped server, a restarted engine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

# What a cancel may take before the trial calls it a hang (handle.cancel raises past it).
CANCEL_BOUND_S = 15.0
# How long cleanup that happens after the user's call returns (a VM torn down, a process exiting)
# may take before what is still there counts as left behind.
SETTLE_S = 60.0


class TrialFailed(AssertionError):
    """The user-visible outcome of a fault was wrong."""


@dataclass
class Outcome:
    observed: dict = field(default_factory=dict)  # what the user saw (for the report)
    left: dict = field(default_factory=dict)  # what is left behind, by kind: all must be 0

    @property
    def left_total(self) -> int:
        return sum(self.left.values())


def expect(ok: bool, message: str) -> None:
    if not ok:
        raise TrialFailed(message)


def wait_for(predicate: Callable[[], object], timeout: float, what, every: float = 0.1):
    """Poll until ``predicate()`` is truthy; its value, or TrialFailed naming what never happened
    (``what``, or what ``what()`` says then)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TrialFailed(f"{what() if callable(what) else what}: not within {timeout:g}s")
        time.sleep(every)


def settle(count: Callable[[], dict], timeout: float = SETTLE_S) -> dict:
    """What is left, once cleanup that runs on after the user's call had its bound to finish."""
    deadline = time.monotonic() + timeout
    while True:
        left = count()
        if not any(left.values()) or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)


def token() -> str:
    return uuid.uuid4().hex[:8]


# -- counting what is left ---------------------------------------------------------------------


def skyvm_containers(*filters: str, docker_host: Optional[str] = None, home: Optional[str] = None) -> list[str]:
    """Containers skyvm started from a skyvm home (its `dev.skyvm.home` label): this process's, or
    the install with the id ``home``."""
    from skyvm.backends.local import home_id

    host = ["-H", docker_host] if docker_host else []
    args = ["docker", *host, "ps", "-a", "--format", "{{.Names}}", "--filter", "label=dev.skyvm.managed=1", "--filter", f"label=dev.skyvm.home={home or home_id()}"]
    for f in filters:
        args += ["--filter", f]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise TrialFailed(f"cannot list containers ({' '.join(args)}): {out.stderr.strip()}")
    return out.stdout.split()


def run_containers(run_id: str, docker_host: Optional[str] = None) -> list[str]:
    return skyvm_containers(f"label=dev.skyvm.run-id={run_id}", docker_host=docker_host)


def processes_with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment has ``name=value`` (what a trial's processes inherit)."""
    needle = f"{name}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in env and state != "Z":
            pids.append(int(entry.name))
    return pids


def command_line(pid: int) -> str:
    try:
        return f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:300]
    except OSError:
        return f"{pid}: (gone)"


# -- helpers for node bodies ------------------------------------------------------------------------


def gated(gate: str, marker: str = "") -> str:
    """A shell node that says it started, then waits for ``gate`` to exist (no sleep decides the order)."""
    touch = f"touch {marker}; " if marker else ""
    return f"{touch}echo started; while [ ! -e {gate} ]; do sleep 0.1; done; echo passed the gate"


def open_gate_in(container: str, gate: str, docker_host: Optional[str] = None) -> None:
    host = ["-H", docker_host] if docker_host else []
    subprocess.run(["docker", *host, "exec", container, "touch", gate], check=True, capture_output=True, timeout=60)


def _store_dir() -> Path:
    """The directory store: bind-mounted at the same path in every local cluster."""
    from skyvm.home import Home

    path = Home.current().store
    path.mkdir(parents=True, exist_ok=True)
    return path


# == the trials ===================================================================================


def cancel_while_queued() -> Outcome:
    """Two nodes under ``max_clusters: 1``: the second waits for a cluster. Cancelled while it
    waits, it returns within the bound and never runs its body, even after the slot frees."""
    import skyvm

    t = token()
    store = _store_dir()
    gate, marker = store / f"fault-gate-{t}", store / f"fault-body-ran-{t}"
    config = {"defaults": {"max_clusters": 1, "down": True, "cpus": 0.5, "labels": {"fault-trial": t}}}
    out = Outcome()
    run = skyvm.Run(config)
    try:
        holder = run.submit_command(gated(str(gate)), node="holder")
        wait_for(lambda: "started" in holder.logs(), 180, "the first node starts")
        queued = run.submit_command(f"touch {marker}; echo body ran", node="waiting")
        # Past its upload and plan, in the launch: with the one slot busy it can only wait for it.
        wait_for(lambda: queued.spec is not None, 60, "the queued node reaches its launch")
        expect(queued.ref is None and not queued.done(), f"the second node did not queue behind max_clusters=1 (ref {queued.ref})")
        t0 = time.monotonic()
        cancelled = queued.cancel(wait_s=CANCEL_BOUND_S)  # raises past the bound: a hang fails the trial
        out.observed["cancel_s"] = round(time.monotonic() - t0, 3)
        expect(cancelled, "cancel() said the queued node had already finished")
        err = queued.exception(0)
        # (cancelled while queued for a cluster; or, when the cancel beat it to the pool, before it started)
        expect(isinstance(err, skyvm.NodeCancelled) and "node 'waiting' was cancelled" in str(err), f"the queued node's error does not say it was cancelled: {err!r}")
        out.observed["error"] = str(err)
        gate.touch()  # the slot frees: a cancelled node must still never start
        expect(holder.result(120) == "passed the gate", "the first node did not finish after its gate opened")
        run.close()
        expect(not marker.exists() and "body ran" not in queued.logs(), "the cancelled node ran its body after the slot freed")
        expect(queued.ref is None, f"the cancelled node was launched on {queued.ref}")
    finally:
        run.close()
        gate.unlink(missing_ok=True)
        marker.unlink(missing_ok=True)
    out.left = settle(lambda: {"containers": len(run_containers(run.run_id))})
    return out


def sigkill_then_gc() -> Outcome:
    """The launching process is killed with SIGKILL mid-node; `skyvm gc` (same skyvm home) then
    leaves nothing of its run."""
    t = token()
    script = textwrap.dedent(
        f"""
        import skyvm, sys, time
        run = skyvm.Run({{"defaults": {{"cpus": 0.5, "labels": {{"fault-trial": "{t}"}}}}}})
        print("run", run.run_id, flush=True)
        h = run.submit_command("echo started; sleep 600", node="killed-launcher")
        while "started" not in h.logs():
            time.sleep(0.1)
        print("node started", flush=True)
        time.sleep(600)
        """
    )
    out = Outcome()
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        wait_for(lambda: any("node started" in line for line in lines), 240, "the launching process's node starts")
        run_id = next(line.split()[1] for line in lines if line.startswith("run "))
        expect(bool(run_containers(run_id)), "the node's container was not there before the kill")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        out.observed["before_gc"] = run_containers(run_id)
        gc = subprocess.run([sys.executable, "-m", "skyvm", "gc"], capture_output=True, text=True, timeout=180)
        expect(gc.returncode == 0, f"skyvm gc failed: {gc.stdout}{gc.stderr}")
        out.observed["gc"] = gc.stdout.strip()[-300:]
        expect(all(name in gc.stdout for name in out.observed["before_gc"]), f"skyvm gc did not name what it removed: {gc.stdout!r}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    out.left = {"containers": len(run_containers(run_id)), "launcher processes": int(proc.poll() is None)}
    return out


# -- two skyvm installs on one Docker engine ---------------------------------------------------------

# One install's process: its nodes, where each ran (from inside: the cluster's own name) and the
# labels of that container (from the engine), as JSON lines starting with "@".
INSTALL_SCRIPT = """
import json, os, subprocess, sys, time
import skyvm

role, settings, gate, go = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
QUICK = "echo ran-in $SKYVM_CLUSTER"

def say(step, handle=None, **kw):
    if handle is not None:
        try:
            kw["result"] = handle.result(300)
        except Exception as exc:
            kw["error"] = f"{type(exc).__name__}: {exc}"
        out = subprocess.run(["docker", "inspect", "--format", "{{json .Config.Labels}}", handle.cluster or "-"], capture_output=True, text=True)
        kw.update(cluster=handle.cluster, fresh=handle.ref.fresh if handle.ref else None, labels=json.loads(out.stdout) if out.returncode == 0 else None)
    print("@" + json.dumps({"step": step, **kw}), flush=True)

with skyvm.Run(settings) as run:
    if role == "a":
        # A node that runs until the trial opens its gate, while the other install submits its own.
        busy = run.submit_command(f"echo started; while [ ! -e {gate} ]; do sleep 0.1; done; echo passed the gate", node="a-gated")
        while "started" not in busy.logs() and not busy.done():
            time.sleep(0.1)
        print("@" + json.dumps({"step": "busy", "cluster": busy.cluster}), flush=True)
        say("idle", busy)  # its cluster is warm and idle now, this run still live
        while not os.path.exists(go):
            time.sleep(0.1)
        say("again", run.submit_command(QUICK, node="a-again"))
    else:
        for _ in range(2):  # the second on the first's cluster, warm
            say("quick", run.submit_command(QUICK, node="b-quick"))
"""


def _steps(lines: list[str]) -> list[dict]:
    return [json.loads(line[1:]) for line in lines if line.startswith("@")]


def _ran_in_own(step: dict, install: str, home_id: str, home: Path, other: set) -> None:
    """A node's answer says it ran in a cluster of its own install (by name, inside and out, and
    by the container's labels), never in the other install's."""
    cluster = step["cluster"]
    expect(step.get("result") == f"ran-in {cluster}", f"install {install}'s node did not finish in its cluster {cluster}: {step}")
    labels = step.get("labels") or {}
    expect(
        labels.get("dev.skyvm.home") == home_id and labels.get("dev.skyvm.home-path") == str(home),
        f"install {install}'s node ran in {cluster}, whose labels say install {labels.get('dev.skyvm.home')} at {labels.get('dev.skyvm.home-path')}, not {home_id} at {home}",
    )
    expect(cluster not in other, f"install {install}'s node ran in the other install's cluster {cluster}")


def two_installs(image: str, down: bool) -> Outcome:
    """Two skyvm installs (two SKYVM_HOMEs: two CI jobs, two users) with equal settings on one
    engine. A runs a node that waits on a gate; B runs quick nodes meanwhile (its first cold, its
    second warm on its own cluster); the gate opens; B runs again while A's cluster is warm and
    idle in A's live run; A runs again. Every node finishes right in a container of its own
    install, A's cluster stays A's (never killed, never taken), and nothing is left of either:
    with ``down: false`` after `skyvm gc`, which leaves the other install's clusters alone until
    it is named with ``--home-id``."""
    from skyvm.backends.local import home_id

    t = token()
    homes = {k: Path(tempfile.mkdtemp(prefix=f"skyvm-fault-install-{k}-")).resolve() for k in "ab"}
    ids = {k: home_id(h) for k, h in homes.items()}
    gate, go = homes["a"] / "store" / f"gate-{t}", homes["a"] / f"go-{t}"
    gate.parent.mkdir(parents=True)
    settings = json.dumps({"defaults": {"image": image, "cpus": 0.5, "memory": 0.5, "down": down, "labels": {"fault-trial": t}}})
    env = {k: {**os.environ, "SKYVM_HOME": str(h)} for k, h in homes.items()}
    out = Outcome()
    out.observed["installs"] = ids

    def install(role: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", INSTALL_SCRIPT, role, settings, str(gate), str(go)], env=env[role], capture_output=True, text=True, timeout=600)

    def skyvm_cli(role: str, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "skyvm", *args], env=env[role], capture_output=True, text=True, timeout=180)
        expect(done.returncode == 0, f"skyvm {' '.join(args)} of install {role} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def quick_nodes(stage: str, a_clusters: set) -> set:
        b = install("b")
        steps = [s for s in _steps(b.stdout.splitlines()) if s["step"] == "quick"]
        expect(b.returncode == 0 and len(steps) == 2, f"install B ({stage}) did not run its two nodes (exit {b.returncode}):\n{(b.stdout + b.stderr)[-3000:]}")
        for step in steps:
            _ran_in_own(step, "B", ids["b"], homes["b"], a_clusters)
        expect(steps[1]["fresh"] is False and steps[1]["cluster"] == steps[0]["cluster"], f"install B's second node did not reuse its own warm cluster: {steps}")
        out.observed[f"b_{stage}"] = steps[0]["cluster"]
        return {s["cluster"] for s in steps}

    a = subprocess.Popen([sys.executable, "-c", INSTALL_SCRIPT, "a", settings, str(gate), str(go)], env=env["a"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        reader = threading.Thread(target=lambda: lines.extend(iter(a.stdout.readline, "")), daemon=True)
        reader.start()

        def a_step(name: str) -> dict:
            wait_for(lambda: any(s["step"] == name for s in _steps(lines)) or a.poll() is not None, 300, f"install A's step {name!r}")
            found = [s for s in _steps(lines) if s["step"] == name]
            expect(bool(found), f"install A ended before its step {name!r} (exit {a.poll()}):\n" + "".join(lines)[-3000:])
            return found[0]

        a_cluster = a_step("busy")["cluster"]
        out.observed["a_cluster"] = a_cluster
        b_clusters = quick_nodes("beside_busy", {a_cluster})  # A's node runs meanwhile
        gate.touch()
        idle = a_step("idle")
        expect(idle.get("result") == "passed the gate", f"install A's node did not finish right while B ran beside it: {idle}")
        b_clusters |= quick_nodes("beside_idle", {a_cluster})  # A's cluster is warm and idle, its run live
        go.touch()
        again = a_step("again")
        _ran_in_own(again, "A", ids["a"], homes["a"], b_clusters)
        expect(again["cluster"] == a_cluster and again["fresh"] is False, f"install A's warm cluster {a_cluster} was not there for its next node (it ran on {again['cluster']}, fresh={again['fresh']})")
        a.wait(120)
        reader.join(10)
        expect(a.returncode == 0, f"install A's process failed (exit {a.returncode}):\n" + "".join(lines)[-3000:])
        if not down:
            # Warm clusters of both stay. B's own gc, status name only B's, and say A's are there.
            status = skyvm_cli("b", "status")
            expect(all(c in status for c in b_clusters) and a_cluster not in status, f"B's skyvm status does not list exactly B's clusters:\n{status}")
            every = skyvm_cli("b", "status", "--all-homes")
            expect(a_cluster in every and ids["a"] in every and str(homes["a"]) in every, f"skyvm status --all-homes does not name A's cluster and install:\n{every}")
            gc = skyvm_cli("b", "gc")
            expect(all(c in gc for c in b_clusters) and a_cluster not in gc.split("left alone")[0] and ids["a"] in gc, f"B's skyvm gc did not remove only B's clusters, naming A's install as left alone:\n{gc}")
            expect(bool(skyvm_containers(home=ids["a"])), "B's skyvm gc removed A's warm cluster")
            gc = skyvm_cli("b", "gc", "--home-id", ids["a"])
            expect(a_cluster in gc and ids["a"] in gc and str(homes["a"]) in gc, f"skyvm gc --home-id did not remove A's cluster naming A's install:\n{gc}")
            out.observed["gc --home-id"] = gc.strip()[-300:]
    finally:
        if a.poll() is None:
            a.kill()
            a.wait(30)
        out.left = settle(lambda: {f"containers of install {k.upper()}": len(skyvm_containers(home=i)) for k, i in ids.items()})
        out.left["launcher processes"] = int(a.poll() is None)
        leftover = [n for i in ids.values() for n in skyvm_containers(home=i)]
        if leftover:  # counted above; not left to the next trial
            subprocess.run(["docker", "rm", "-f", *leftover], capture_output=True, timeout=120)
        for h in homes.values():
            shutil.rmtree(h, ignore_errors=True)
    return out


def start_moto(workdir: Path, bucket: str):
    """moto's S3 server on loopback with ``bucket``, of this trial alone (it is stopped mid-run)."""
    import boto3
    import emulators

    proc, endpoint = emulators.start_moto(workdir / "moto.log")
    for key, value in (("AWS_ACCESS_KEY_ID", "skyvm-test-key"), ("AWS_SECRET_ACCESS_KEY", "skyvm-test-secret"), ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return emulators.Server(proc, endpoint, workdir / "moto.log")


def bucket_unreachable() -> Outcome:
    """The S3 bucket stops answering while a node runs: the node fails with an error naming the
    store, not a hang and not success, and nothing is left."""
    t = token()
    workdir = Path(tempfile.mkdtemp(prefix="skyvm-fault-moto-"))
    bucket = "skyvm-fault"
    server = start_moto(workdir, bucket)
    try:
        return _bucket_unreachable(t, server.endpoint, server.stop, bucket)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _bucket_unreachable(t: str, endpoint: str, stop_server: Callable[[], None], bucket: str) -> Outcome:
    import skyvm

    url = f"s3://{bucket}/fault-{t}"
    config = {"defaults": {"payload_store": url, "payload_store_endpoint": endpoint, "cpus": 0.5, "down": True, "labels": {"fault-trial": t}}}
    gate = f"/tmp/skyvm-fault-gate-{t}"
    out = Outcome()
    with skyvm.Run(config) as run:
        h = run.submit_command(gated(gate), node="bucket-gone")
        wait_for(lambda: "started" in h.logs(), 240, "the node starts (its payload fetched from the bucket)")
        stop_server()  # the bucket is unreachable from now on
        open_gate_in(h.cluster, gate)  # the node goes on, and must write its result to the bucket
        try:
            value = h.result(300)
        except skyvm.InfrastructureError as exc:
            err = exc
        except Exception as exc:  # noqa: BLE001 - any other type is a wrong outcome
            raise TrialFailed(f"the node failed with {type(exc).__name__}, not an InfrastructureError: {exc}") from exc
        else:
            raise TrialFailed(f"the node succeeded ({value!r}) with its bucket unreachable")
        out.observed["error"] = str(err)[:600]
        expect("'bucket-gone'" in str(err) and (url in str(err) or endpoint in str(err)), f"the error names neither the node nor the store {url}: {err}")
    out.left = settle(lambda: {"containers": len(run_containers(run.run_id))})
    return out


# -- the SkyPilot stand-in (tests/skypilot/standin_vm.py) ---------------------------------------------


def skypilot_settings(s3_endpoint: str, registry: dict, t: str, **extra) -> dict:
    return {
        "defaults": {
            "backend": "skypilot", "cloud": "aws", "cpus": "2+", "down": True,
            "payload_store": f"s3://skyvm-test/fault-{t}", "payload_store_endpoint": s3_endpoint,
            "registry": registry, "labels": {"fault-trial": t}, **extra,
        }
    }


def standin_calls(state: Path) -> list[dict]:
    path = state / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def standin_left(state: Path) -> dict:
    vms = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=dev.skyvm.standin={state}"], capture_output=True, text=True).stdout.split()
    return {
        "stand-in VMs": len(vms),
        "cluster records": len(list((state / "clusters").glob("*.json"))) if (state / "clusters").exists() else 0,
        "SkyPilot-side processes": len(processes_with_env("SKYVM_STANDIN_DIR", str(state))),
    }


def _close_skypilot(settings: dict) -> None:
    """This trial's SkyPilot-side process goes: what is still alive afterwards is a leftover."""
    from skyvm.backends.skypilot import skypilot_backend
    from skyvm.settings import as_config

    skypilot_backend(as_config(settings).resolve("any")).close()


def cancel_while_provisioning(state: Path, s3_endpoint: str, registry: dict, provision_s: float = 120.0) -> Outcome:
    """A node whose VM takes long to come up (the stand-in's slow cloud) is cancelled while SkyPilot
    provisions it: cancel returns within the bound, and the half-made cluster is downed."""
    import skyvm

    t = token()
    settings = skypilot_settings(s3_endpoint, registry, t)
    out = Outcome()
    previous = os.environ.get("SKYVM_STANDIN_PROVISION_S")
    os.environ["SKYVM_STANDIN_PROVISION_S"] = str(provision_s)  # read by the SkyPilot-side process this trial starts
    try:
        run = skyvm.Run(settings)
        try:
            h = run.submit(sum, [1, 2], node="provisioning")
            wait_for(lambda: h.spec is not None, 600, "the node's image is built and pushed and its payload uploaded")
            cluster = h.spec.cluster_name_for(0)

            def provisioning() -> bool:
                launched = any(c["call"] == "launch" and c["cluster"] == cluster for c in standin_calls(state))
                return launched and (state / "clusters" / f"{cluster}.json").exists()

            wait_for(provisioning, 300, f"SkyPilot starts provisioning {cluster}")
            t0 = time.monotonic()
            cancelled = h.cancel(wait_s=CANCEL_BOUND_S)
            out.observed["cancel_s"] = round(time.monotonic() - t0, 3)
            expect(cancelled, "cancel() said the provisioning node had already finished")
            err = h.exception(0)
            expect(isinstance(err, skyvm.NodeCancelled) and "provisioning" in str(err), f"the node's error does not say it was cancelled while provisioning: {err!r}")
            out.observed["error"] = str(err)
        finally:
            run.close()
        # Downed at the cancel, then again when the abandoned launch fails (it found its VM terminated);
        # only then is SkyPilot's process idle, and closing it final.
        downs = wait_for(lambda: [c for c in standin_calls(state) if c["call"] == "down" and c["cluster"] == cluster][1:], SETTLE_S, f"the half-made cluster {cluster} is downed and its launch ended")
        out.observed["downs"] = len(downs) + 1
        out.observed["launch aborted"] = any(c["call"] == "provisioning_aborted" and c["cluster"] == cluster for c in standin_calls(state))
        launched_jobs = [c for c in standin_calls(state) if c["call"] in ("exec",)]
        expect(not launched_jobs, f"a job was submitted after the cancel: {launched_jobs}")
    finally:
        if previous is None:
            os.environ.pop("SKYVM_STANDIN_PROVISION_S", None)
        else:
            os.environ["SKYVM_STANDIN_PROVISION_S"] = previous
        _close_skypilot(settings)
    out.left = settle(lambda: standin_left(state))
    if out.left["SkyPilot-side processes"]:
        out.observed["processes left"] = [command_line(pid) for pid in processes_with_env("SKYVM_STANDIN_DIR", str(state))]
    return out


def bridge_killed_mid_node(state: Path, s3_endpoint: str, registry: dict) -> Outcome:
    """SkyPilot's process (the bridge) is killed while a node runs and a call streams from it: that
    call fails with a clear error, the next call starts a new process and works, and the node
    finishes with its result."""
    import skyvm
    from skyvm.backends.skypilot import skypilot_backend
    from skyvm.errors import InfrastructureError

    t = token()
    settings = skypilot_settings(s3_endpoint, registry, t)
    gate = f"/tmp/skyvm-fault-gate-{t}"
    out = Outcome()
    try:
        with skyvm.Run(settings) as run:
            h = run.submit_command(gated(gate), node="bridge-killed")
            wait_for(lambda: "started" in h.logs(), 600, "the node starts on its stand-in VM")
            bridge = skypilot_backend(h.settings).bridge
            old_pid = bridge._proc.pid
            streamed: list[str] = []
            failure: dict = {}

            def follow() -> None:
                try:
                    bridge.tail_logs(h.cluster, h.ref.job_id, on_log=streamed.append, follow=True)
                    failure["none"] = True
                except InfrastructureError as exc:
                    failure["error"] = exc

            follower = threading.Thread(target=follow, daemon=True)
            follower.start()
            wait_for(lambda: "started" in streamed, 120, "a log is streaming from SkyPilot's process")
            os.kill(old_pid, signal.SIGKILL)
            follower.join(CANCEL_BOUND_S)
            expect(not follower.is_alive(), f"a call in flight did not end within {CANCEL_BOUND_S:g}s of SkyPilot's process dying")
            err = failure.get("error")
            expect(err is not None and "bridge process" in str(err) and "exited with code -9" in str(err), f"the call in flight did not fail clearly: {failure}")
            out.observed["error"] = str(err)[:300]
            status = bridge.status()  # the next call: a new process answers
            expect(bridge._proc.pid != old_pid and isinstance(status, list), "the next call did not start a new SkyPilot process")
            open_gate_in(f"skyvm-standin-{h.cluster}"[:120], gate)
            expect(h.result(300) == "passed the gate", "the node did not finish with its result after the bridge was replaced")
    finally:
        _close_skypilot(settings)
    out.left = settle(lambda: standin_left(state))
    if out.left["SkyPilot-side processes"]:
        out.observed["processes left"] = [command_line(pid) for pid in processes_with_env("SKYVM_STANDIN_DIR", str(state))]
    return out


# -- a private Docker engine, restarted mid-node ------------------------------------------------------


class PrivateDockerd:
    """A second Docker engine of this trial's own (own data root, exec root, socket; no bridge, no
    iptables): restarting it touches nothing of anyone else's."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="skyvm-faultd-"))
        self.sock = f"unix://{self.dir}/docker.sock"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        if not shutil.which("dockerd"):
            raise TrialFailed("no dockerd on this machine for a private Docker engine")
        d = self.dir
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", f"{d}/data", "--exec-root", f"{d}/exec", "--pidfile", f"{d}/dockerd.pid", "-H", self.sock,
             "--bridge=none", "--iptables=false", "--ip6tables=false"],
            stdout=open(d / "dockerd.log", "a"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        wait_for(self.answers, 60, f"the private dockerd answers on {self.sock} (log {d}/dockerd.log)", every=0.2)

    def answers(self) -> bool:
        return subprocess.run(["docker", "-H", self.sock, "version"], capture_output=True, timeout=20).returncode == 0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.proc = None

    def load(self, image: str) -> None:
        save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
        load = subprocess.run(["docker", "-H", self.sock, "load"], stdin=save.stdout, capture_output=True, text=True, timeout=600)
        save.wait(600)
        if save.returncode or load.returncode:
            raise TrialFailed(f"loading {image} into the private dockerd failed: {load.stderr}")

    def remove(self) -> None:
        self.stop()
        # Its network namespace and overlay mounts outlive it: unmount before removing the tree.
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines() if line.split()[1].startswith(str(self.dir))]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def processes(self) -> int:
        """dockerd and containerd processes of this engine still alive."""
        count = 0
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if str(self.dir).encode() in (entry / "cmdline").read_bytes():
                        count += 1
                except OSError:
                    pass
        return count


@contextmanager
def private_dockerd(image: str):
    """A private Docker engine with ``image`` loaded; stopped and removed at the end."""
    engine = PrivateDockerd()
    try:
        engine.start()
        engine.load(image)
        yield engine
    finally:
        engine.remove()


def dockerd_restarted_mid_node(engine: PrivateDockerd, image: str) -> Outcome:
    """The Docker engine restarts while a node runs in it: the node fails with a clear error (not a
    hang, not success), and `skyvm gc` then leaves nothing in that engine."""
    t = token()
    home = Path(tempfile.mkdtemp(prefix="skyvm-fault-home-"))
    env = {**os.environ, "DOCKER_HOST": engine.sock, "SKYVM_HOME": str(home)}
    # The launching process talks to the private engine only (DOCKER_HOST), with its own skyvm home.
    script = textwrap.dedent(
        f"""
        import json, skyvm, time
        run = skyvm.Run({{"defaults": {{"image": {image!r}, "cpus": 0.5, "down": True, "labels": {{"fault-trial": "{t}"}}}}}})
        h = run.submit_command("echo started; sleep 600", node="engine-restarted")
        while "started" not in h.logs() and not h.done():
            time.sleep(0.1)
        print("node started", h.cluster, flush=True)
        try:
            value = h.result(300)
            print(json.dumps({{"ok": True, "value": value}}), flush=True)
        except Exception as exc:
            print(json.dumps({{"ok": False, "type": type(exc).__name__, "error": str(exc)}}), flush=True)
        run.close()
        """
    )
    out = Outcome()
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        wait_for(lambda: any(line.startswith("node started") for line in lines) or proc.poll() is not None, 240, "the node starts in the private engine")
        expect(any(line.startswith("node started") for line in lines), "the node did not start:\n" + "".join(lines)[-2000:])
        engine.stop(signal.SIGTERM)  # a restart: the engine stops, then comes back
        engine.start()
        try:
            proc.wait(CANCEL_BOUND_S + 120)
        except subprocess.TimeoutExpired:
            raise TrialFailed("the launching process hung after the Docker engine restarted:\n" + "".join(lines)[-2000:]) from None
        reader.join(10)
        answers = [json.loads(line) for line in lines if line.startswith("{")]
        expect(len(answers) == 1, "the node gave no answer after the engine restarted:\n" + "".join(lines)[-2000:])
        answer = answers[0]
        expect(not answer["ok"], f"the node succeeded although its engine restarted: {answer}")
        out.observed["error"] = f"{answer['type']}: {answer['error']}"[:600]
        expect(answer["type"] == "InfrastructureError" and "'engine-restarted'" in answer["error"], f"not a clear infrastructure error naming the node: {answer}")
        gc = subprocess.run([sys.executable, "-m", "skyvm", "gc"], capture_output=True, text=True, timeout=180, env=env)
        expect(gc.returncode == 0, f"skyvm gc failed: {gc.stdout}{gc.stderr}")
        left = subprocess.run(["docker", "-H", engine.sock, "ps", "-aq", "--filter", "label=dev.skyvm.managed=1"], capture_output=True, text=True, timeout=60).stdout.split()
        out.left = {"containers in the restarted engine": len(left), "launcher processes": int(proc.poll() is None)}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        shutil.rmtree(home, ignore_errors=True)
    return out


# -- Prefect: a flow run cancelled through the API --------------------------------------------------


PREFECT_FLOW = '''
import time
from prefect import flow, task
from prefect_skyvm import SkyVMTaskRunner

@task
def long_task():
    print("node started", flush=True)
    time.sleep(600)  # a long task body: the cancel must end it

@flow(task_runner=SkyVMTaskRunner({{"defaults": {{"cpus": 0.5, "labels": {{"fault-trial": "{t}"}}}}}}))
def fault_flow():
    long_task.submit().result()

if __name__ == "__main__":
    fault_flow.serve(name="fault-{t}")
'''


def prefect_flow_run_cancelled_through_the_api() -> Outcome:
    """A deployment served as a user serves one (``flow.serve``); a run of it is cancelled through
    Prefect's API (the UI's Cancel: state Cancelling) while its task runs on a node. The run ends
    Cancelled and its node's container goes; stopping the server leaves no process."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelling, StateType

    t = token()
    workdir = Path(tempfile.mkdtemp(prefix="skyvm-fault-prefect-"))
    script = workdir / "fault_flow.py"
    script.write_text(PREFECT_FLOW.format(t=t))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1", "SKYVM_FAULT_TRIAL": t}
    server = subprocess.Popen([sys.executable, str(script)], cwd=workdir, env=env, stdout=open(workdir / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    out = Outcome()
    flow_run_id = None
    try:
        with get_client(sync_client=True) as client:

            def served():
                expect(server.poll() is None, "flow.serve() exited:\n" + (workdir / "serve.log").read_text()[-2000:])
                try:
                    return client.read_deployment_by_name(f"fault-flow/fault-{t}")
                except Exception:  # noqa: BLE001 - not registered yet
                    return None

            wait_for(served, 120, "the served deployment is registered", every=0.5)
            flow_run = run_deployment(f"fault-flow/fault-{t}", timeout=0)
            flow_run_id = flow_run.id
            # The flow run's containers: the adapter's run is named by the flow run.
            mine = f"label=dev.skyvm.run-id=prefect-{flow_run_id}"
            wait_for(lambda: skyvm_containers(mine), 240, lambda: "the task's node starts; flow.serve()'s log:\n" + (workdir / "serve.log").read_text()[-3000:], every=0.5)
            expect(client.read_flow_run(flow_run_id).state.type == StateType.RUNNING, "the flow run is not running while its node runs")
            t0 = time.monotonic()
            client.set_flow_run_state(flow_run_id, Cancelling(message="cancelled by the fault trial"), force=True)
            state = wait_for(
                lambda: (s := client.read_flow_run(flow_run_id).state) is not None and s.is_final() and s,
                120, "the cancelled flow run reaches a final state", every=0.5,
            )
            out.observed["cancelled_s"] = round(time.monotonic() - t0, 3)
            out.observed["state"] = f"{state.type.value}: {state.message}"
            expect(state.type == StateType.CANCELLED, f"the flow run ended {state.type.value}, not Cancelled: {state.message}")
            out.left["containers"] = settle(lambda: {"n": len(skyvm_containers(mine))})["n"]
    finally:
        server.send_signal(signal.SIGINT)  # how a user stops `flow.serve()`: Ctrl-C
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)
        out.left["processes"] = settle(lambda: {"n": len(processes_with_env("SKYVM_FAULT_TRIAL", t))}, 30)["n"]
        if out.left["processes"]:
            out.observed["processes left"] = [command_line(p) for p in processes_with_env("SKYVM_FAULT_TRIAL", t)]
            for pid in processes_with_env("SKYVM_FAULT_TRIAL", t):
                os.kill(pid, signal.SIGKILL)  # counted above; not left to the next trial
        shutil.rmtree(workdir, ignore_errors=True)
    return out


# -- Airflow: a running task marked failed ------------------------------------------------------------


def _set_running_task_state(dag_id: str, task_id: str, state) -> None:
    """What the UI's "mark failed" does: the running task instance's state in the metadata DB."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select

    with create_session() as session:
        ti = session.scalars(
            select(TaskInstance).where(TaskInstance.dag_id == dag_id, TaskInstance.task_id == task_id, TaskInstance.state == TaskInstanceState.RUNNING)
        ).one()
        ti.state = state


def airflow_marked_failed_while_running() -> Outcome:
    """A running (not deferred) SkyVMOperator task is marked failed as the UI does, and Airflow's task
    runner hears of it as its supervisor tells it when a heartbeat finds the state changed: SIGTERM,
    whose handler (installed by Airflow's own task runner) calls the operator's on_kill. The node
    stops, the task ends failed, and no container is left."""
    import importlib.util

    from airflow.utils.state import TaskInstanceState

    from test_operator import af_containers, run_dag

    path = Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"]) / "skyvm_fault_dags.py"
    spec = importlib.util.spec_from_file_location("skyvm_fault_dags", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = module.marked_failed_dag
    seen: dict = {}

    def node_running() -> bool:
        names = [r["name"] for r in af_containers(dag.dag_id) if r["state"] == "running"]
        top = subprocess.run(["docker", "top", names[0]], capture_output=True, text=True).stdout if names else ""
        return "sleep 600" in top

    def mark_failed() -> None:
        try:
            wait_for(node_running, 240, "the task's node runs")
            _set_running_task_state(dag.dag_id, "sleeper", TaskInstanceState.FAILED)
            seen["marked"] = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)  # the supervisor's word to the task runner (dag.test runs it in this process)
        except BaseException as exc:  # noqa: BLE001 - reported by the trial below
            seen["error"] = exc

    previous = signal.getsignal(signal.SIGTERM)
    marker = threading.Thread(target=mark_failed, daemon=True)
    marker.start()
    try:
        dr, states = run_dag(dag)
    finally:
        marker.join(CANCEL_BOUND_S)
        signal.signal(signal.SIGTERM, previous)  # Airflow's handler stays installed after the task
    if "error" in seen:
        raise seen["error"]
    out = Outcome()
    out.observed["stopped_s"] = round(time.monotonic() - seen["marked"], 3)
    out.observed["states"] = states
    expect(states == {"sleeper": "failed"}, f"the task marked failed ended {states}")
    out.left = settle(lambda: {"containers": len(af_containers(dag.dag_id))})
    return out
