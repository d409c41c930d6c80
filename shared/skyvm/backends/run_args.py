"""A node's ``docker_run_args`` for a local cluster: as Engine API options, or through the docker CLI.

Holds: ``run_options`` (the flags as host-config options, or None when one has no mapping) and
``start_with_cli`` (a cluster started with ``docker run``, which takes any flag).
May import: skyvm.engine, skyvm.capacity, skyvm.errors, skyvm.plan.
"""

from __future__ import annotations

from typing import Optional

from skyvm.capacity import quantity
from skyvm.engine import docker
from skyvm.errors import InfrastructureError
from skyvm.plan import TaskSpec


def run_options(args: list[str]) -> Optional[dict]:
    """``docker_run_args`` as Engine API host-config options, or None when one has no mapping here
    (the cluster is then created with the docker CLI, which takes any flag)."""
    out: dict = {}
    i = 0

    def value() -> str:
        nonlocal i
        arg = args[i]
        if "=" in arg and arg.startswith("--"):
            return arg.split("=", 1)[1]
        i += 1
        if i >= len(args):
            raise InfrastructureError(f"docker_run_args: {arg} needs a value")
        return args[i]

    while i < len(args):
        arg = args[i]
        flag = arg.split("=", 1)[0] if arg.startswith("--") else arg
        if flag == "--shm-size":
            out["shm_size"] = value()
        elif flag == "--gpus":
            import docker as sdk

            spec = value()
            count = -1 if spec == "all" else int(spec.removeprefix("count=")) if spec.removeprefix("count=").isdigit() else None
            if count is None:
                return None
            out.setdefault("device_requests", []).append(sdk.types.DeviceRequest(count=count, capabilities=[["gpu"]]))
        elif flag in ("--network", "--net"):
            out["network_mode"] = value()
        elif flag == "--ipc":
            out["ipc_mode"] = value()
        elif flag == "--cap-add":
            out.setdefault("cap_add", []).append(value())
        elif flag == "--privileged":
            out["privileged"] = True
        elif flag in ("-v", "--volume"):
            out.setdefault("binds", []).append(value())
        elif flag in ("-e", "--env"):
            out.setdefault("_env", []).append(value())
        else:
            return None
        i += 1
    return out


def start_with_cli(spec: TaskSpec, name: str, labels: dict, env: dict, binds: list, watch: list) -> None:
    s = spec.settings
    args = ["run", "--detach", "--rm", "--name", name, "--init"]
    for key, value in labels.items():
        args += ["--label", f"{key}={value}"]
    for key, value in env.items():
        args += ["--env", f"{key}={value}"]
    for bind in binds:
        args += ["--volume", bind]
    user_args = list(spec.docker_run_args)
    if not any(a == "--network" or a.startswith(("--network=", "--net=")) for a in user_args):
        args += ["--network", "host"]
    if s.cpus:
        args += ["--cpus", str(quantity(s.cpus))]
    if s.memory:
        mem = f"{int(quantity(s.memory) * 1024)}m"
        args += ["--memory", mem, "--memory-swap", mem]
    docker(*args, *user_args, spec.image, *watch)
