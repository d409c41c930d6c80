"""``skyvm skypilot install``: SkyPilot in its own virtual environment, beside an engine's.

SkyPilot pins uvicorn < 0.36 (and more), so it cannot live in an Airflow >= 3.1.3
environment. skyvm talks to this environment through ``SubprocessBridge``.

May import: the standard library, skyvm.errors, skyvm.home, skyvm.images.
"""

from __future__ import annotations

import subprocess
import sys

from skyvm.errors import InfrastructureError
from skyvm.home import Home


def install(version: str = "0.14.1") -> str:
    venv = Home.current().skypilot_venv
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    from skyvm.images import project_root

    root = project_root()
    skyvm_req = str(root) if root else "skyvm"
    out = subprocess.run([str(python), "-m", "pip", "install", "-q", f"skypilot=={version}", skyvm_req], capture_output=True, text=True)
    if out.returncode != 0:
        raise InfrastructureError(f"installing SkyPilot {version} into {venv} failed:\n{out.stderr[-3000:]}")
    return str(python)
