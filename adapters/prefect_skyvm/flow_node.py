"""What a flow run's node needs: its settings from the job variables, the environment, the mounts.

Pure functions of the job configuration and the worker's host, so the worker
(``workers.py``) only launches and follows.

Holds the job variables that are node settings, ``flow_settings``, the environment split, the source
directories and local mounts. May import: skyvm's core (settings, home, backends' run-arg helpers); no
prefect_skyvm module but lazily the task runner's run id, and no Prefect at module level.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from skyvm.settings import NodeSettings, as_config, validate_layer

# The job variables that are node settings, in the order the work pool's form shows them.
NODE_FIELDS = (
    "backend", "cpus", "memory", "accelerators", "use_spot", "job_recovery", "cloud", "infra", "region", "zone",
    "instance_type", "disk_size", "disk_tier", "image", "requirements", "registry", "envs", "secrets",
    "docker_run_args", "down", "idle_minutes_to_autostop", "timeout", "payload_store", "connector",
)
# Job variables that choose which settings apply, rather than being settings.
SELECT_FIELDS = ("settings_file", "profile")

# The engine runs on the node as Prefect's own workers run it: the flow run's id in PREFECT__FLOW_RUN_ID.
ENGINE_COMMAND = "python -m prefect.engine"

# Worker environment variables that carry credentials go to the node as secrets (masked, never on a
# command line); the API URL too, as it may embed a token or name a private host.
_SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|AUTH|CREDENTIAL", re.IGNORECASE)
_ALWAYS_SECRET = ("PREFECT_API_URL",)

# The node image gets Prefect at the host's version: states and results written on the node must be
# read by the same Prefect here. fastapi and certifi at the host's versions too (pyproject.toml's
# prefect extra says why); async-timeout because redis needs it below Python 3.11.3 (the base image's
# Debian Python) though not on the host, where the wheels are built; docker, so a flow on a node can
# start its tasks' nodes (SkyVMTaskRunner on the local backend).
_PINNED = ("prefect", "fastapi", "certifi", "docker")
_EXTRA = ("async-timeout>=4.0.3",)


@functools.lru_cache(maxsize=1)
def _installed_pins() -> tuple[str, ...]:
    # Asked for every engine-mode task: the installed versions do not change under a running process.
    pins = []
    for name in _PINNED:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return tuple(pins)


def node_requirements() -> list[str]:
    return [*_installed_pins(), *_EXTRA]


def flow_settings(flow_name: str, variables: Mapping[str, Any], where: str) -> NodeSettings:
    """The flow's node settings: the shared YAML's defaults, profile and ``nodes[<flow name>]``, under the
    job variables that are set. A bad value raises SettingsError naming ``job_variables.<field>``."""
    given = {k: v for k, v in variables.items() if k in NODE_FIELDS and v is not None}
    validate_layer(given, "job_variables", where)
    config = as_config(variables.get("settings_file") or None)
    return config.resolve(flow_name, profile=variables.get("profile") or None, code=given)


def split_env(env: Mapping[str, Optional[str]]) -> tuple[dict[str, str], dict[str, str]]:
    """(envs, secrets) of the flow run's environment."""
    envs, secrets = {}, {}
    for name, value in env.items():
        if value is None:
            continue
        if name in _ALWAYS_SECRET or _SECRET_NAME.search(name):
            secrets[name] = value
        else:
            envs[name] = value
    return envs, secrets


def source_directories(deployment: Any) -> list[str]:
    """Local directories the deployment's code comes from (``flow.from_source("/path")``, a
    ``set_working_directory`` pull step, the deployment's ``path``): the local backend mounts them at
    the same path, as SkyVMExecutor mounts the DAGs folder."""
    if deployment is None:
        return []
    found: list[str] = []
    for step in getattr(deployment, "pull_steps", None) or []:
        for name, args in step.items():
            if name.endswith("set_working_directory") and isinstance(args, Mapping) and args.get("directory"):
                found.append(str(args["directory"]))
    if getattr(deployment, "path", None):
        found.append(str(deployment.path))
    return _existing_dirs(found)


def _existing_dirs(paths: Iterable[str]) -> list[str]:
    out = []
    for path in paths:
        p = Path(path)
        # Templated ({{ ... }}) or relative paths mean nothing on this host: the node resolves them.
        if p.is_absolute() and p.is_dir() and str(p) not in out:
            out.append(str(p))
    return out


def local_mounts(source_dirs: Iterable[str], result_dir: Optional[str]) -> tuple[list[str], dict[str, str]]:
    """(docker_run_args, envs) for a flow's node on the local backend.

    - the flow's source directories and Prefect's local result storage, at the same paths;
    - skyvm's home and the Docker socket, so the flow's own SkyVMTaskRunner starts its tasks'
      nodes on this machine's engine (nesting), their store paths valid on the host.
    """
    from skyvm.backends.local import same_path_volumes
    from skyvm.home import Home

    home = str(Home.current().resolved)
    paths = [*source_dirs, home]
    envs = {"SKYVM_HOME": home}
    if result_dir:
        paths.append(result_dir)
        envs["PREFECT_LOCAL_STORAGE_PATH"] = result_dir
    args = same_path_volumes(paths)
    socket, cli = docker_socket(), shutil.which("docker")
    if socket and cli:
        # The local backend drives the engine through the socket and, for listing and odd flags, the CLI.
        args += ["--volume", f"{socket}:{socket}", "--volume", f"{cli}:/usr/local/bin/docker:ro"]
        # Task nodes in containers of their own, or a clear error: never plain processes in the flow's container.
        envs.update({"DOCKER_HOST": f"unix://{socket}", "SKYVM_REQUIRE_DOCKER": "1"})
    return args, envs


def docker_socket() -> Optional[str]:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://") and Path(host.removeprefix("unix://")).exists():
        return host.removeprefix("unix://")
    return None


def remove_task_clusters(flow_run_id) -> list[str]:
    """Remove the local clusters of the flow run's own task nodes (SkyVMTaskRunner on the node).

    The flow's engine releases them when it leaves its task runner; a node stopped before that (a
    cancel, the worker stopping) cannot, and nothing else owns them: the worker removes them by
    their run-id label once the flow's node is gone.
    """
    from prefect_skyvm.task_runners import task_nodes_run_id
    from skyvm.maintenance import remove_run_clusters

    return remove_run_clusters(task_nodes_run_id(flow_run_id))
