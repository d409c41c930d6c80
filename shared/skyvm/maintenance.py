"""Maintenance: what skyvm left on this machine's Docker engine, and removing what nobody uses.

``skyvm status`` and ``skyvm gc`` (skyvm.cli) call these; SkyPilot's clusters and pools have
theirs in ``skyvm.skypilot.clusters``. A cluster is spared while a live run owns it (a run's
lease is held: ``Home.run_is_live``), while a process claims it, and while the attempt its
record names still runs, let go of by its launcher for whoever holds its reference (as the
backend says). Another install's clusters are judged by that
install's home when it is still on this machine, else by asking the cluster.

Holds: ``list_managed``, ``gc_clusters``, ``gc``, ``gc_images``.
May import: skyvm.engine, skyvm.home, skyvm.backends.containers (labels, rows), skyvm.backends.base,
skyvm.backends.registry (the backend that answers an attempt's status).
"""

from __future__ import annotations

import contextlib
import json
from typing import Optional

from filelock import Timeout

from skyvm.backends.base import NodeRef
from skyvm.backends.containers import L_HOME, L_MANAGED, cluster_row
from skyvm.engine import docker, docker_available
from skyvm.home import Home, home_of_labels


def list_managed(all_states: bool = True, all_homes: bool = False) -> list[dict]:
    """The containers skyvm started on this engine, with their labels: this install's, or every
    install's (``all_homes``)."""
    if not docker_available():
        return []
    args = ["ps", "--filter", f"label={L_MANAGED}=1", "--format", "{{json .}}", "--no-trunc"]
    if not all_homes:
        args[1:1] = ["--filter", f"label={L_HOME}={Home.current().id}"]
    if all_states:
        args.insert(1, "-a")
    rows = []
    for line in docker(*args).stdout.splitlines():
        row = json.loads(line)
        labels = dict(item.split("=", 1) for item in row.get("Labels", "").split(",") if "=" in item)
        rows.append(cluster_row(row["Names"], row["State"], row["Status"], labels, row["Image"]))
    return rows


def _busy_inside(cluster: str) -> bool:
    """Whether some attempt runs in the cluster, as the cluster itself says (its install's state is gone)."""
    return docker("exec", cluster, "python3", "-m", "skyvm.node", "busy", check=False, timeout=60).returncode == 0


def _attempt_runs(attempt: Optional[dict]) -> bool:
    if attempt is None:
        return False
    from skyvm.backends.registry import local_backend

    try:
        return not local_backend().status(NodeRef.from_dict(attempt)).state.finished
    except Exception:  # noqa: BLE001 - unknown: spared
        return True


def _may_remove(row: dict, home: Optional[Home]):
    """(whether no live run owns the cluster, no process claims it and no attempt runs in it, its
    claim lock: held when given, to release once the cluster is gone)."""
    running = row["state"] == "running"
    if home is not None:
        record = home.cluster_record(row["name"])
        owners = {row["run_id"]} | set(record["runs"])
        if running and any(home.run_is_live(r) for r in owners):
            return False, None
        try:
            lock = home.cluster_lock(row["name"])
            lock.acquire(timeout=0)
        except Timeout:
            return False, None  # a process is taking it right now
        except OSError:
            pass  # another user's home, not writable here: the cluster says below
        else:
            if running and record["let_go"] and _attempt_runs(record["attempt"]):
                lock.release()
                return False, None  # an attempt let go of (a deferred Airflow task) runs in it
            return True, lock
    # The install's state is gone (or not ours to lock): only the cluster can say whether a node runs.
    return not (running and _busy_inside(row["name"])), None


def gc_clusters(dry_run: bool = False, homes: str = "own") -> list[dict]:
    """Remove skyvm containers that no live run owns and no node is running in; the rows removed.

    ``homes``: "own" (this install's), "all" (every install's on this engine), or one install's id
    (a prefix of it will do). Another install's are judged by its own home's claims and leases when
    that home is still on this machine, else by asking the cluster whether a node runs in it.
    """
    removed = []
    for row in list_managed(all_homes=homes != "own"):
        if homes not in ("own", "all") and not row["home"].startswith(homes):
            continue
        home = home_of_labels(row["home"], row["home_path"])
        removable, lock = _may_remove(row, home)
        if not removable:
            continue
        try:
            if not dry_run:
                docker("rm", "--force", row["name"], check=False)
                if home is not None:
                    with contextlib.suppress(OSError):  # another user's home may not be writable here
                        home.forget_cluster(row["name"])
            removed.append(row)
        finally:
            if lock is not None:
                lock.release()
    return removed


def gc(dry_run: bool = False) -> list[str]:
    """Remove this install's skyvm containers that no live run owns and no node is running in: their names."""
    return [row["name"] for row in gc_clusters(dry_run)]


def gc_images(keep: int = 2, dry_run: bool = False) -> list[str]:
    """Remove old node images (every source or requirements change makes one), keeping the newest ``keep``."""
    if not docker_available():
        return []
    out = docker("images", "--filter", "label=dev.skyvm.image=node", "--format", "{{.ID}} {{.Repository}}:{{.Tag}} {{.CreatedAt}}")
    by_id: dict[str, list] = {}
    for line in out.stdout.splitlines():
        image_id, ref, created = line.split(" ", 2)
        by_id.setdefault(image_id, [created, []])[1].append(ref)
    in_use = set(docker("ps", "-a", "--format", "{{.Image}}").stdout.split())
    removed = []
    for image_id, (created, refs) in sorted(by_id.items(), key=lambda kv: kv[1][0], reverse=True)[keep:]:
        if in_use & set(refs):
            continue
        if not dry_run:
            docker("rmi", "--force", *refs, check=False)
        removed += refs
    return removed


def remove_run_clusters(run_id: str) -> list[str]:
    """Remove this install's local clusters a run started, whatever runs in them: for a run whose
    own process was stopped before it could end itself (a Prefect flow's task nodes, when the
    flow's node is gone) and that nothing else owns. Their names."""
    if not docker_available():
        return []
    names = [row["name"] for row in list_managed() if row["run_id"] == run_id]
    if names:
        docker("rm", "-f", *names, check=False)
        home = Home.current()
        for name in names:
            home.forget_cluster(name)
    return names
