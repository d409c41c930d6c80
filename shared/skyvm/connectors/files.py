"""Private credential files: a directory only this user can read, files of mode 0600, removed afterwards.

Environment variables are preferred; files are written only for what SkyPilot
reads from files alone (an AWS profile, a GCP key, a kubeconfig, a Lambda
key), never to ``~/.aws``, ``~/.config/gcloud``, ``~/.azure``,
``~/.lambda_cloud`` or ``~/.kube``.

They live under ``secrets_root()``: memory-backed ``/dev/shm/skyvm-<uid>-<home id>``
where the machine has it (nothing reaches a disk), else ``$SKYVM_HOME/secrets``.
Each directory is named for the process that owns it (pid and start time, so a
reused pid is not mistaken for it). The owner removes it when done and at exit;
a process killed with SIGKILL runs no exit handler, so ``skyvm gc``
(``gc_secret_dirs``) removes every directory whose owner is gone.

May import: the standard library and skyvm.home only (connectors and the SkyPilot credentials use it).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

_made: list[Path] = []
# <prefix>@<pid>.<start time>@<random>: the owner is in the name, written atomically with the directory.
_OWNER = re.compile(r"@(\d+)\.(\d+)@")
SHM = Path("/dev/shm")


def secrets_root() -> Path:
    """Where this install's credential directories go (see the module's docstring)."""
    from skyvm.home import Home

    home = Home.current()
    if SHM.is_dir() and os.access(SHM, os.W_OK | os.X_OK):
        return SHM / f"skyvm-{os.getuid()}-{home.id}"
    return home.secrets


def start_time(pid: int) -> Optional[int]:
    """When a process started, in clock ticks since boot (Linux's /proc), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    # Field 22 (starttime); the command name (field 2) may hold spaces and parentheses: count from its end.
    return int(stat.rsplit(")", 1)[1].split()[19])


def process_alive(pid: int, started: Optional[int]) -> bool:
    """Whether process ``pid`` runs and is the one that started at ``started`` (None or 0: any)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process holds the pid: it exists
    if started:
        now = start_time(pid)
        return now is None or now == started
    return True


def owner_token(pid: Optional[int] = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}.{start_time(pid) or 0}"


def private_dir(prefix: str = "skyvm-creds-") -> Path:
    """A fresh 0700 directory owned by this process, removed at exit unless removed earlier with ``remove``."""
    root = secrets_root()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}@{owner_token()}@", dir=root))
    os.chmod(path, 0o700)
    _made.append(path)
    return path


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to a file created with mode 0600 (never readable by others, not even briefly).

    Written beside and renamed into place, so a reader (SkyPilot's boto3 reading a profile while
    minted keys are renewed) sees the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path in _made:
        _made.remove(path)


def gc_secret_dirs(dry_run: bool = False) -> list[Path]:
    """Remove this install's credential directories whose owner process is gone; the removed ones.

    A directory whose name carries no owner is not skyvm's and is left alone, as is every one
    whose owner still runs.
    """
    root = secrets_root()
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.iterdir()):
        owner = _OWNER.search(path.name)
        if owner is None or not path.is_dir():
            continue
        if process_alive(int(owner.group(1)), int(owner.group(2))):
            continue
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@atexit.register
def _cleanup() -> None:
    for path in list(_made):
        remove(path)
