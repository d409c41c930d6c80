"""What every scenario shares: a private skyvm home, alternating arms, samples, medians, targets,
the table and the JSON record, and the cleanup check.

Only skyvm's public API is used here (``skyvm.Run``, ``Run.submit``, ``handle.result()``,
``handle.spec.image``), the docker CLI / SDK and the engines' own APIs, so the benchmarks keep
working while skyvm's internals change.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
TESTS = ROOT / "tests"

# Container labels: skyvm turns settings `labels` into `dev.skyvm.user.<key>` on its containers
# (README, Settings reference); the baselines' own containers carry BASELINE_LABEL.
SESSION_KEY = "skyvm-bench"
KEEP_KEY = "skyvm-bench-keep"  # warm clusters (down: false) the bench removes itself at the end
BASELINE_LABEL = "dev.skyvm.bench"


class BenchError(RuntimeError):
    """A wrong result, a failed node, a container left behind: the run is not valid."""


class Skip(Exception):
    """The scenario cannot run here (a missing package or tool); says why."""


# -- the environment ----------------------------------------------------------------------


def private_home() -> Path:
    """A skyvm home of this bench run only (locks, leases, store): other runs share the default one.

    Must run before skyvm is imported (it reads SKYVM_HOME once). The wheel cache of ./dev's
    home is shared when present: it is content-addressed and written by rename, and building
    the node image's wheels again would cost half a minute per run.
    """
    if os.environ.get("SKYVM_BENCH_HOME"):
        home = Path(os.environ["SKYVM_BENCH_HOME"])
    else:
        home = Path(tempfile.mkdtemp(prefix="skyvm-bench-home-"))
        shared_wheels = ROOT / ".dev" / "home" / "wheels"
        if shared_wheels.is_dir() and not os.environ.get("SKYVM_BENCH_OWN_WHEELS"):
            (home / "wheels").symlink_to(shared_wheels)
        os.environ["SKYVM_BENCH_HOME"] = str(home)  # children (scale's subprocesses) use it too
    os.environ["SKYVM_HOME"] = str(home)
    return home


def home_label() -> str:
    """The `dev.skyvm.home` label value skyvm puts on the containers of this home."""
    home = Path(os.environ["SKYVM_HOME"]).resolve()
    return hashlib.sha256(str(home).encode()).hexdigest()[:12]


def current_env() -> str:
    """Which of ./dev's environments this is: by what it can import."""
    import importlib.util

    venv = Path(os.environ.get("VIRTUAL_ENV", "")).name
    if venv in ("core", "prefect", "airflow", "airflow31", "skypilot"):
        return "airflow" if venv == "airflow31" else venv
    for module, env in (("sky", "skypilot"), ("airflow", "airflow"), ("prefect", "prefect")):
        if importlib.util.find_spec(module) is not None:
            return env
    return "core"


def tests_on_path() -> None:
    """tests/ holds the emulator helpers (moto's, the GCS emulator, Azurite, the registry)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


def sh(*cmd: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and out.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed (exit {out.returncode}): {(out.stderr or out.stdout).strip()[-1500:]}")
    return out


def docker_ok() -> bool:
    # skyvm's own check; imported here, after the bench's private SKYVM_HOME is chosen.
    from skyvm.engine import docker_available

    return docker_available()


def need_docker() -> None:
    if not docker_ok():
        raise Skip("no Docker engine answers (./dev setup starts one)")


def machine() -> dict:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
    }
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        info["memory_gib"] = round(int(meminfo["MemTotal"].split()[0]) / 2**20, 1)
    except (OSError, KeyError, ValueError):
        info["memory_gib"] = None
    try:
        out = sh("docker", "version", "--format", "{{.Server.Version}}", check=False, timeout=20)
        info["docker"] = out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["docker"] = None
    return info


def git_commit() -> dict:
    try:
        head = sh("git", "rev-parse", "HEAD", cwd=ROOT).stdout.strip()
        dirty = bool(sh("git", "status", "--porcelain", "--untracked-files=no", cwd=ROOT).stdout.strip())
        return {"commit": head, "dirty": dirty}
    except (OSError, BenchError):
        return {"commit": None, "dirty": None}


def package_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# -- statistics ----------------------------------------------------------------------------


def median(xs: Iterable[float]) -> Optional[float]:
    xs = list(xs)
    return statistics.median(xs) if xs else None


def fmt(value: Optional[float], unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if abs(value) < 1 else f"{value:.2f} s"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "MiB/s":
        return f"{value:.0f} MiB/s"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    if unit == "ms":
        return f"{value:+.0f} ms" if abs(value) < 1000 else f"{value / 1000:+.2f} s"
    if unit == "count":
        return f"{value:g}"
    if unit == "ms/task":
        return f"{value:.1f} ms"
    return f"{value:g} {unit}"


@dataclass
class Series:
    name: str
    unit: str = "s"
    values: list = field(default_factory=list)
    note: str = ""

    def summary(self) -> dict:
        xs = self.values
        return {
            "unit": self.unit,
            "n": len(xs),
            "median": median(xs),
            "min": min(xs) if xs else None,
            "max": max(xs) if xs else None,
            "note": self.note,
            "samples": xs,
        }


@dataclass
class Target:
    name: str
    measured: Optional[float]
    limit: float
    op: str  # "<=" or ">=" or "=="
    unit: str
    why: str = ""

    @property
    def met(self) -> Optional[bool]:
        if self.measured is None:
            return None
        return {"<=": self.measured <= self.limit, ">=": self.measured >= self.limit, "==": self.measured == self.limit}[self.op]

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "measured": self.measured,
            "op": self.op,
            "limit": self.limit,
            "unit": self.unit,
            "result": {True: "pass", False: "miss", None: "not measured"}[self.met],
            "why": self.why,
        }


class Bench:
    """One scenario's run: parameters, samples per series, comparisons, targets; printed and recorded."""

    def __init__(self, scenario: str, *, n: int, reps: int, smoke: bool, options: dict, env: str):
        self.scenario = scenario
        self.n = n
        self.reps = reps
        self.smoke = smoke
        self.options = options  # scenario-specific flags (from --set KEY=VALUE)
        self.env = env
        self.session = f"b{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.started = time.time()
        self.params: dict[str, Any] = {"n": n, "reps": reps, "smoke": smoke, "env": env, **options}
        self.series: dict[str, Series] = {}
        self.comparisons: list[dict] = []
        self.targets: list[Target] = []
        self.notes: list[str] = []
        self.checks = 0
        self.cleanups: list[Callable[[], None]] = []
        self.machine_start = machine()
        self.explicit: set = set()

    # -- recording ------------------------------------------------------------------------

    def opt(self, key: str, default):
        value = self.options.get(key, default)
        return type(default)(value) if default is not None and not isinstance(value, type(default)) else value

    def add(self, series: str, value: float, unit: str = "s", note: str = "") -> None:
        s = self.series.setdefault(series, Series(series, unit, note=note))
        s.values.append(value)

    @contextlib.contextmanager
    def timed(self, series: str, note: str = ""):
        t0 = time.perf_counter()
        yield
        self.add(series, time.perf_counter() - t0, note=note)

    def med(self, series: str) -> Optional[float]:
        s = self.series.get(series)
        return median(s.values) if s else None

    def ratio(self, name: str, a: str, b: str) -> Optional[float]:
        """median(a) / median(b), recorded as a comparison."""
        ma, mb = self.med(a), self.med(b)
        value = ma / mb if ma is not None and mb else None
        self.comparisons.append({"name": name, "kind": "ratio", "a": a, "b": b, "value": value, "unit": "x"})
        return value

    def delta_ms(self, name: str, a: str, b: str) -> Optional[float]:
        """median(a) - median(b) in milliseconds, recorded as a comparison."""
        ma, mb = self.med(a), self.med(b)
        value = (ma - mb) * 1000 if ma is not None and mb is not None else None
        self.comparisons.append({"name": name, "kind": "delta", "a": a, "b": b, "value": value, "unit": "ms"})
        return value

    def target(self, name: str, measured: Optional[float], op: str, limit: float, unit: str, why: str = "") -> None:
        self.targets.append(Target(name, measured, limit, op, unit, why))

    def check(self, ok: bool, message: str) -> None:
        """Results must be right, whatever the timings: a wrong one fails the run."""
        self.checks += 1
        if not ok:
            raise BenchError(f"{self.scenario}: {message}")

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    def on_exit(self, fn: Callable[[], None]) -> None:
        self.cleanups.append(fn)

    # -- running --------------------------------------------------------------------------

    def alternate(self, arms: dict[str, Callable[[int], None]], reps: Optional[int] = None) -> None:
        """Run every arm once per repetition, in turn, reversing the order every other
        repetition so that drift (a noisy neighbour, a warming cache) hits every arm alike."""
        names = list(arms)
        for rep in range(self.reps if reps is None else reps):
            order = names if rep % 2 == 0 else names[::-1]
            for name in order:
                t0 = time.perf_counter()
                arms[name](rep)
                print(f"  rep {rep + 1}: {name} {time.perf_counter() - t0:.2f} s", flush=True)

    # -- labels and cleanup ---------------------------------------------------------------------

    def labels(self, keep: bool = False, **extra: str) -> dict:
        """skyvm settings `labels` marking this run's clusters (they also split the signature from anyone else's)."""
        labels = {SESSION_KEY: self.session, **extra}
        if keep:
            labels[KEEP_KEY] = "1"
        return labels

    def baseline_labels(self) -> list[str]:
        return ["--label", f"{BASELINE_LABEL}={self.session}"]

    def containers(self, *filters: str) -> list[str]:
        out = sh("docker", "ps", "-aq", *[a for f in filters for a in ("--filter", f)], check=False)
        return out.stdout.split()

    def remove_kept(self) -> None:
        """The warm clusters (`down: false`) this run kept on purpose, and the baselines' containers."""
        if not docker_ok():
            return
        ids = self.containers(f"label=dev.skyvm.user.{KEEP_KEY}=1", f"label=dev.skyvm.user.{SESSION_KEY}={self.session}")
        ids += self.containers(f"label={BASELINE_LABEL}={self.session}")
        if ids:
            sh("docker", "rm", "-f", *ids, check=False)

    def leftovers(self) -> list[str]:
        """Containers of this run still there: skyvm's (by this run's label or this home) and the baselines'."""
        if not docker_ok():
            return []
        ids = set(self.containers(f"label=dev.skyvm.user.{SESSION_KEY}={self.session}"))
        ids |= set(self.containers("label=dev.skyvm.managed=1", f"label=dev.skyvm.home={home_label()}"))
        ids |= set(self.containers(f"label={BASELINE_LABEL}={self.session}"))
        return sorted(ids)

    # -- output ---------------------------------------------------------------------------

    def table(self) -> str:
        lines = [f"== {self.scenario}  (n={self.n}, reps={self.reps}{', smoke' if self.smoke else ''})"]
        if self.series:
            width = max(len(s) for s in self.series) + 2
            lines.append(f"{'series':<{width}} {'n':>4} {'median':>12} {'min':>12} {'max':>12}")
            for s in self.series.values():
                summary = s.summary()
                lines.append(
                    f"{s.name:<{width}} {summary['n']:>4} {fmt(summary['median'], s.unit):>12} {fmt(summary['min'], s.unit):>12} {fmt(summary['max'], s.unit):>12}"
                )
        for c in self.comparisons:
            lines.append(f"  {c['name']}: {fmt(c['value'], c['unit'])}")
        for t in self.targets:
            d = t.as_dict()
            lines.append(f"  target {t.name}: {fmt(t.measured, t.unit)} {t.op} {fmt(t.limit, t.unit)} -> {d['result'].upper()}" + (f"  (why: {t.why})" if t.why and t.met is False else ""))
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)

    def record(self, status: str, error: Optional[str] = None, leftovers: Optional[list] = None) -> dict:
        mach = machine()
        mach["loadavg_end"] = mach.pop("loadavg_start")
        return {
            "scenario": self.scenario,
            "status": status,
            "error": error,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "wall_s": round(time.time() - self.started, 2),
            "machine": {**self.machine_start, "loadavg_end": mach["loadavg_end"]},
            "git": git_commit(),
            "params": self.params,
            "series": {name: s.summary() for name, s in self.series.items()},
            "comparisons": self.comparisons,
            "targets": [t.as_dict() for t in self.targets],
            "notes": self.notes,
            "checks": self.checks,
            "leftover_containers": leftovers or [],
        }

    def write(self, data: dict, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{self.scenario}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(self.started))}.json"
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        return path


# -- peak memory and threads of this process ------------------------------------------------------


def proc_status() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def rss_mib() -> float:
    return int(proc_status()["VmRSS"].split()[0]) / 1024


def peak_rss_mib() -> float:
    """The process's high-water mark of resident memory (VmHWM), in MiB."""
    return int(proc_status()["VmHWM"].split()[0]) / 1024


class Sampler:
    """Samples this process's thread count (threading's and the kernel's) and RSS every few ms."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak_threads = 0
        self.peak_py_threads = 0
        self.peak_rss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="bench-sampler")

    def _loop(self) -> None:
        while not self._stop.is_set():
            st = proc_status()
            self.peak_threads = max(self.peak_threads, int(st["Threads"]))
            self.peak_rss = max(self.peak_rss, int(st["VmRSS"].split()[0]) / 1024)
            self.peak_py_threads = max(self.peak_py_threads, threading.active_count())
            self._stop.wait(self.interval)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class CpuMeter:
    """CPU seconds spent by this process, by its child processes alive at both readings (an API server the
    bench started) and by this run's containers (skyvm's clusters): where a runner's work goes on cores
    that all of them share. A wall time alone hides it: Prefect's flow-run heartbeat rounds a short flow's
    up to a whole second, and a server's work on the events a flow sent may come after the flow's end.
    Containers are read from their cgroup's CPU accounting (cgroup v1 or v2): None where neither is found."""

    FLOW, CHILDREN, NODES = "flow process", "API server", "nodes"

    def __init__(self, bench: "Bench") -> None:
        self.bench = bench

    def read(self) -> dict[str, Any]:
        t = os.times()
        return {self.FLOW: t.user + t.system, self.CHILDREN: _descendants_cpu(), self.NODES: self._containers()}

    def spent(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Optional[float]]:
        """CPU seconds between two readings, per part (a container or child new since ``before`` from its start)."""
        out: dict[str, Optional[float]] = {self.FLOW: after[self.FLOW] - before[self.FLOW]}
        for part in (self.CHILDREN, self.NODES):
            then, now = before[part], after[part]
            out[part] = None if then is None or now is None else sum(v - then.get(k, 0.0) for k, v in now.items())
        return out

    def after_quiet(self, step_s: float = 0.5, quiet_share: float = 0.05, limit_s: float = 60.0) -> dict[str, Any]:
        """A reading once the child processes (the API server) have gone quiet: less than ``quiet_share`` of a
        core over ``step_s``, twice in a row, or ``limit_s`` at most. Why: a server records a flow's task runs
        from its events at its own pace; a flow that ends first leaves that work for after its end, on the same
        cores, and the CPU it took then belongs to the flow as much as what it took during it."""
        last, calm = _descendants_cpu(), 0
        deadline = time.monotonic() + limit_s
        while calm < 2 and time.monotonic() < deadline:
            time.sleep(step_s)
            now = _descendants_cpu()
            calm = calm + 1 if sum(v - last.get(k, 0.0) for k, v in now.items()) < quiet_share * step_s else 0
            last = now
        return self.read()

    def _containers(self) -> Optional[dict[str, float]]:
        ids = sh("docker", "ps", "-q", "--no-trunc", "--filter", f"label=dev.skyvm.user.{SESSION_KEY}={self.bench.session}", check=False).stdout.split()
        found: dict[str, float] = {}
        for cid in ids:
            usage = _cgroup_cpu(cid)
            if usage is None:
                return None
            found[cid] = usage
        return found


def _cgroup_cpu(cid: str) -> Optional[float]:
    v1 = [Path(f"/sys/fs/cgroup/{d}/docker/{cid}/cpuacct.usage") for d in ("cpuacct", "cpu,cpuacct")]
    for path in v1:
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text()) / 1e9
    for path in (Path(f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/cpu.stat"), Path(f"/sys/fs/cgroup/docker/{cid}/cpu.stat")):
        with contextlib.suppress(OSError, ValueError):
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
    return None


def _descendants_cpu() -> dict[int, float]:
    """CPU seconds of each live descendant of this process, by pid (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            # After the command's closing parenthesis: state, ppid, ... utime (12th), stime (13th).
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    found: dict[int, float] = {}
    todo = [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = cpu[child]
            todo.append(child)
    return found


# -- skyvm's side ------------------------------------------------------------------------------


def node_image_of(handle) -> str:
    """The image a finished node ran in (skyvm builds it once per content hash)."""
    spec = getattr(handle, "spec", None)
    image = getattr(spec, "image", None)
    if not image:
        raise BenchError("cannot tell the node image from the handle (handle.spec.image)")
    return image


def build_node_image(bench: Bench, settings: Optional[dict] = None) -> str:
    """Build (or find) skyvm's node image through skyvm itself, outside every timing: a first node."""
    import skyvm

    from bench import nodefns

    t0 = time.perf_counter()
    config = {"defaults": {"labels": bench.labels(purpose="image"), **(settings or {})}}
    with skyvm.Run(config) as run:
        handle = run.submit(nodefns.noop, node="image")
        bench.check(handle.result(900) == 1, "the image-building node returned a wrong result")
        image = node_image_of(handle)
    bench.params["image"] = image
    print(f"  node image {image} ready in {time.perf_counter() - t0:.1f} s (not counted)", flush=True)
    return image


# -- servers on loopback (the same real servers the tests start) ----------------------------------


def start_moto(bench: Bench, bucket: str = "skyvm-bench") -> str:
    """moto's standalone S3 server over HTTP on loopback, a bucket, credentials in this process's
    environment (nodes get them the way the tests' nodes do); stopped when the scenario ends."""
    tests_on_path()
    import emulators
    from netutil import stop_group

    log = Path(tempfile.mkdtemp(prefix="skyvm-bench-moto-")) / "log"
    # A port this moto holds itself: another install's run beside this one never answers for it.
    proc, endpoint = emulators.start_moto(log)

    def stop() -> None:
        stop_group(proc)
        shutil.rmtree(log.parent, ignore_errors=True)

    bench.on_exit(stop)
    os.environ.update({"AWS_ACCESS_KEY_ID": "skyvm-bench-key", "AWS_SECRET_ACCESS_KEY": "skyvm-bench-secret", "AWS_DEFAULT_REGION": "us-east-1"})
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return endpoint


def start_registry(bench: Bench):
    """Debian's docker-registry on loopback with htpasswd auth (tests/emulators.py): skyvm settings `registry`."""
    tests_on_path()
    try:
        import emulators
    except ImportError as exc:
        raise Skip(f"tests/emulators.py cannot be imported here: {exc}") from None
    workdir = Path(tempfile.mkdtemp(prefix="skyvm-bench-registry-"))
    password = "bench-" + uuid.uuid4().hex[:8]
    try:
        server = emulators.LocalRegistry(workdir, "skyvm", password)
    except (RuntimeError, ImportError) as exc:
        raise Skip(f"no registry: {exc}") from None
    bench.on_exit(lambda: (server.stop(), shutil.rmtree(workdir, ignore_errors=True)))
    os.environ["SKYVM_BENCH_REGISTRY_PASSWORD"] = password
    return {"server": server.server, "username": "skyvm", "password_env": "SKYVM_BENCH_REGISTRY_PASSWORD"}
