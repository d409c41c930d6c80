"""Private credential files: a directory only this user can read, files of mode 0600, removed afterwards.

SkyPilot reads some credentials only from files (a GCP key, a kubeconfig, a
Lambda key). skyvm writes them here, never to ``~/.aws``, ``~/.config/gcloud``,
``~/.azure``, ``~/.lambda_cloud`` or ``~/.kube``, and removes the directory
when the process that needed it is done.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_made: list[Path] = []


def private_dir(prefix: str = "skyvm-creds-") -> Path:
    """A fresh 0700 directory, removed at exit unless removed earlier with ``remove``."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o700)
    _made.append(path)
    return path


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to a file created with mode 0600 (never readable by others, not even briefly)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)
    return path


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path in _made:
        _made.remove(path)


@atexit.register
def _cleanup() -> None:
    for path in list(_made):
        remove(path)
