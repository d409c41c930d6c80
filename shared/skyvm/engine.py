"""The Docker engine client: the docker CLI, the SDK's API with bounded waits, and commands in a container.

Holds: ``docker()`` (the CLI, as SkyPilot runs it on a VM, with skyvm's own docker config),
``docker_available()``, ``EngineAPI`` (the SDK's low-level client whose timeouts and dropped
connections become errors naming the call), ``exec_bytes``/``exec_output`` (a command in a
container, read with a timeout) and ``same_path_volumes``.

May import: skyvm.errors, skyvm.home, skyvm.images (the SDK client and its timeout), and
skyvm.watcher's frame splitter; never a backend, the pool or the API.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
from typing import Optional

from skyvm.errors import InfrastructureError
from skyvm.home import Home


def docker_env(config: Optional[str] = None) -> dict:
    # skyvm's own docker config dir: registry logins never touch the user's ~/.docker.
    env = dict(os.environ)
    env["DOCKER_CONFIG"] = config or str(Home.current().docker_config)
    return env


def docker(*args: str, input: Optional[str] = None, check: bool = True, timeout: Optional[float] = 600, config: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run the docker CLI (as SkyPilot does on a VM); raise InfrastructureError with its output on failure."""
    cmd = ["docker", *args]
    try:
        out = subprocess.run(cmd, input=input, capture_output=True, text=True, env=docker_env(config), timeout=timeout)
    except FileNotFoundError:
        raise InfrastructureError("the docker CLI is not installed") from None
    except subprocess.TimeoutExpired:
        raise InfrastructureError(f"docker {args[0]} timed out after {timeout}s") from None
    if check and out.returncode != 0:
        raise InfrastructureError(f"docker {args[0]} failed (exit {out.returncode}): {(out.stderr or out.stdout).strip()[-2000:]}")
    return out


def docker_available() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return docker("version", "--format", "{{.Server.Version}}", check=False, timeout=20).returncode == 0
    except InfrastructureError:
        return False


class EngineAPI:
    """The docker SDK's low-level client, whose waits are bounded (``SKYVM_DOCKER_CALL_TIMEOUT_S``) and whose
    timeouts and dropped connections become errors naming the call, not a bare ``ReadTimeout``."""

    def __init__(self, api):
        self._api = api

    def __getattr__(self, name: str):
        import requests

        attr = getattr(self._api, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            from skyvm.images import DOCKER_CALL_TIMEOUT_S

            try:
                return attr(*args, **kwargs)
            except requests.exceptions.Timeout:
                raise InfrastructureError(
                    f"the Docker engine did not answer {name} within {DOCKER_CALL_TIMEOUT_S:g}s "
                    "(SKYVM_DOCKER_CALL_TIMEOUT_S): is dockerd overloaded or stuck?"
                ) from None
            except requests.exceptions.ConnectionError as exc:
                raise InfrastructureError(f"the Docker engine dropped {name} ({exc}): is dockerd running? (restarted mid-node?)") from None

        return call


def exec_bytes(api, name: str, cmd: list[str], timeout: Optional[float] = None) -> tuple[int, bytes, bytes]:
    """A command in a container: (exit code, stdout, stderr). A gone container raises docker's NotFound.

    Read through the exec's socket with a timeout: the SDK's plain ``exec_start`` reads with
    none, so a stuck engine or command would hold the caller forever.
    """
    from skyvm.images import DOCKER_CALL_TIMEOUT_S
    from skyvm.watcher import split_frames

    timeout = timeout or DOCKER_CALL_TIMEOUT_S
    eid = api.exec_create(name, cmd)["Id"]
    sock = api.exec_start(eid, socket=True)
    raw = getattr(sock, "_sock", sock)
    data = b""
    try:
        while True:
            # The SDK's own readers poll with no timeout: wait here, with one.
            if not select.select([raw], [], [], timeout)[0]:
                raise InfrastructureError(
                    f"{' '.join(cmd)[:120]!r} in cluster {name} gave no output for {timeout:g}s "
                    "(SKYVM_DOCKER_CALL_TIMEOUT_S): is dockerd or the container stuck?"
                )
            chunk = raw.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    frames, _rest = split_frames(data)
    out = b"".join(d for sid, d in frames if sid != 2)
    err = b"".join(d for sid, d in frames if sid == 2)
    return api.exec_inspect(eid)["ExitCode"], out, err


def exec_output(api, name: str, cmd: list[str], timeout: Optional[float] = None) -> tuple[int, str, str]:
    """A command in a container: (exit code, stdout, stderr) as text."""
    code, out, err = exec_bytes(api, name, cmd, timeout)
    return code, out.decode(errors="replace"), err.decode(errors="replace")


def same_path_volumes(paths) -> list[str]:
    """``docker run`` options mounting each host directory at the same path in a local cluster (made
    when missing): how a whole-task node (an Airflow executor's, a Prefect worker's flow) sees the
    DAGs, flow sources, logs and results where the engine put them."""
    args: list[str] = []
    for path in dict.fromkeys(str(p) for p in paths):
        os.makedirs(path, exist_ok=True)
        args += ["--volume", f"{path}:{path}"]
    return args
