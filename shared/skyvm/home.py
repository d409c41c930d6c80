"""The install's on-disk state: its home directory, what lies in it, and the locks and records there.

Holds ``Home``: one skyvm install (a ``SKYVM_HOME``: two CI jobs or two users have two). It carries
the install's paths (the default store, docker config, wheel cache, secrets, SkyPilot state), its
id (what its containers are labelled with), a run's lease (a lock held for the run's life: a
run is live while its lock is held, whatever became of pids), and per cluster a lock (held while a
process claims it) and a record (the runs that used it, the attempt last launched there and not yet
released). ``Home.current()`` reads ``SKYVM_HOME`` when called, never at import: a test or bench
makes its own home by setting the variable, or passes a ``Home`` explicitly.

May import: the standard library and ``filelock`` only (every other skyvm module may import this one).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Optional

from filelock import FileLock, Timeout


@functools.lru_cache(maxsize=None)
def _id_of(resolved: str) -> str:
    return hashlib.sha256(resolved.encode()).hexdigest()[:12]


class RunLease:
    """A lock held while a run lives in this process: ``release()`` when it ends (a process that
    dies lets go of it too). Several processes may hold leases of one run (an Airflow DAG run's
    tasks): the run is live while any of them holds one."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = FileLock(path, thread_local=False)
        self._lock.acquire(timeout=0)

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()
        self.path.unlink(missing_ok=True)


class ClusterLock:
    """A cluster's claim lock: ``flock(2)`` on a file of the home's ``locks/``, held on an open file of its
    own (two holders in one process exclude each other, as two processes do), released from any thread.
    A process that dies lets go of it. Its file is never removed, so a holder's file is always the one
    the path names. Acquire and release as ``filelock.FileLock``'s (``Timeout`` when not had in time).

    Why not ``filelock`` here: every node takes its cluster's lock twice (its claim, its release), in
    the launcher's busiest path. Measured on the host, a ``FileLock`` made, acquired and released costs
    about 100 us of CPU (filelock 4: its registry, fork tracking, the lock file removed and made again);
    these calls cost 3 us. Leases and other locks keep ``filelock``."""

    POLL_S = 0.05

    def __init__(self, path: Path):
        self.path = path
        self._fd: Optional[int] = None

    @property
    def is_locked(self) -> bool:
        return self._fd is not None

    def acquire(self, timeout: float = -1) -> "ClusterLock":
        """Hold the lock; ``timeout`` seconds at most (0: only if free now, negative: as long as it takes)."""
        deadline = None if timeout < 0 else time.monotonic() + timeout
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if deadline is not None and time.monotonic() >= deadline:
                    raise Timeout(str(self.path)) from None
                time.sleep(self.POLL_S if deadline is None else max(0.0, min(self.POLL_S, deadline - time.monotonic())))
                continue
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)  # unlocked, not only closed: a child forked meanwhile holds a copy
            finally:
                os.close(fd)

    def __enter__(self) -> "ClusterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class Home:
    """One install's state directory. Equal when their resolved paths are."""

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)

    @classmethod
    def current(cls) -> "Home":
        """This process's install: ``SKYVM_HOME`` as it is now, else ``~/.skyvm``."""
        return cls(os.environ.get("SKYVM_HOME") or Path.home() / ".skyvm")

    def __eq__(self, other) -> bool:
        return isinstance(other, Home) and self.resolved == other.resolved

    def __hash__(self) -> int:
        return hash(self.resolved)

    def __repr__(self) -> str:
        return f"Home({str(self.path)!r})"

    @property
    def resolved(self) -> Path:
        return self.path.resolve()

    @property
    def id(self) -> str:
        """The install's id: a hash of its home's resolved path (containers carry it as a label)."""
        return _id_of(str(self.resolved))

    def state_dir(self, kind: str) -> Path:
        """A directory of the home's state (made when missing)."""
        d = self.path / kind
        d.mkdir(parents=True, exist_ok=True)
        return d

    # Paths other rooms keep here; made by whoever writes them.
    @property
    def store(self) -> Path:
        return self.path / "store"

    @property
    def docker_config(self) -> Path:
        return self.path / "docker"

    @property
    def wheels(self) -> Path:
        return self.path / "wheels"

    @property
    def secrets(self) -> Path:
        return self.path / "secrets"

    @property
    def skypilot(self) -> Path:
        return self.path / "skypilot"

    @property
    def skypilot_venv(self) -> Path:
        return self.path / "skypilot-venv"

    @property
    def node_state(self) -> Path:
        return self.path / "node-state"

    # -- runs ------------------------------------------------------------------

    def _run_dir(self, run_id: str) -> Path:
        return self.state_dir("runs") / run_id

    def hold_run(self, run_id: str) -> RunLease:
        """This process's lease of the run, held until released: while any is, gc spares the run's clusters."""
        d = self._run_dir(run_id)
        d.mkdir(parents=True, exist_ok=True)
        return RunLease(d / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.lock")

    def run_is_live(self, run_id: str) -> bool:
        """Whether some process holds a lease of the run now. Stale lease files (a process that died) go."""
        try:
            held = list((self.path / "runs" / run_id).glob("*.lock"))
        except OSError:
            return False
        live = False
        for path in held:
            probe = FileLock(path, thread_local=False)
            try:
                probe.acquire(timeout=0)
            except Timeout:
                live = True
                continue
            except OSError:
                continue  # another user's home, not writable here
            try:
                path.unlink(missing_ok=True)
            finally:
                probe.release()
        return live

    def live_runs(self) -> set[str]:
        runs = self.path / "runs"
        if not runs.is_dir():
            return set()
        return {d.name for d in runs.iterdir() if d.is_dir() and self.run_is_live(d.name)}

    # -- clusters --------------------------------------------------------------

    def cluster_lock(self, name: str) -> ClusterLock:
        """Held while a process claims the cluster or removes it (any thread may release it)."""
        return ClusterLock(self.state_dir("locks") / f"{name}.lock")

    def _record_path(self, name: str) -> Path:
        return self.state_dir("clusters") / f"{name}.json"

    def cluster_record(self, name: str) -> dict:
        """What this install knows of a cluster: ``runs`` (that used it), ``attempt`` (the NodeRef, as a
        dict, of the attempt launched there and not yet released; None when none), ``let_go`` (its
        launcher handed it to whoever holds its reference: it is that holder's until released)."""
        try:
            record = json.loads(self._record_path(name).read_text())
        except (OSError, ValueError):
            record = {}
        return {"runs": list(record.get("runs", [])), "attempt": record.get("attempt"), "let_go": bool(record.get("let_go"))}

    def write_cluster_record(self, name: str, record: dict) -> None:
        path = self._record_path(name)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # written under the cluster's lock: one writer
        with open(tmp, "wb") as fh:  # bytes: Path.write_text's text layer doubled the CPU (82 us against 42)
            fh.write(json.dumps(record).encode())
        os.replace(tmp, path)  # a reader never sees half a record

    def cluster_users(self, name: str) -> set[str]:
        return set(self.cluster_record(name)["runs"])

    def forget_cluster(self, name: str) -> None:
        self._record_path(name).unlink(missing_ok=True)


def home_of_labels(home_id: str, home_path: str) -> Optional[Home]:
    """The home a cluster's labels name, when it is still on this machine (its id matches its path)."""
    if home_id == Home.current().id:
        return Home.current()
    if home_path and Path(home_path).is_dir() and Home(home_path).id == home_id:
        return Home(home_path)
    return None
