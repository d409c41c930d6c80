"""Planning a node: resolved settings in, an engine-neutral TaskSpec out. Pure: no I/O.

A TaskSpec holds everything a SkyPilot task needs (container image, setup and
run commands, envs and secrets, resources, cluster name) and nothing about
Prefect or Airflow. Both backends run the same TaskSpec.

Holds TaskSpec, the cluster signature and names, and ``plan_node``. May import: skyvm.settings only.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Optional

from skyvm.settings import NodeSettings, RegistrySettings

# Fields that decide what VM and container a node gets. Two nodes whose
# values here are equal can share a cluster; everything else (envs, secrets,
# stream_logs, timeout, where payloads go) is per node and does not split it.
SIGNATURE_FIELDS = (
    "backend",
    "cloud",
    "infra",
    "region",
    "zone",
    "instance_type",
    "cpus",
    "memory",
    "accelerators",
    "accelerator_args",
    "use_spot",
    "job_recovery",
    "image_id",
    "disk_size",
    "disk_tier",
    "ports",
    "labels",
    "idle_minutes_to_autostop",
    "down",
    "docker_run_args",
    # SkyPilot's placement choices and cluster shape (issue 13).
    "any_of",
    "ordered",
    "spot_fallback",
    "max_hourly_cost",
    "network_tier",
    "autostop",
    "num_nodes",
    "workdir",
    "file_mounts",
    "skypilot",
)
# Signature fields that are the task's (or the launch's), not its resources'.
_TASK_FIELDS = ("backend", "idle_minutes_to_autostop", "down", "docker_run_args", "num_nodes", "workdir", "file_mounts", "skypilot")

# Shared memory PyTorch data loaders need; Docker's default 64 MB breaks them.
GPU_SHM_SIZE = "--shm-size=8g"
NODE_IMAGE_PYTHON = "python3"
MAX_NAME = 63


@dataclass(frozen=True)
class TaskSpec:
    """What to run for one node attempt, for either backend."""

    node: str
    run_id: str
    attempt_id: str
    signature: str
    cluster_name: str
    image: str
    registry: Optional[RegistrySettings]
    docker_run_args: tuple[str, ...]
    setup: str
    run: str
    envs: dict[str, str]
    secrets: dict[str, str] = field(repr=False)
    resources: dict[str, Any]
    settings: NodeSettings = field(repr=False)
    payload_url: str = ""
    result_url: str = ""
    # (username, password or token) for the registry, minted when the attempt was prepared.
    registry_auth: Optional[tuple[str, str]] = field(default=None, repr=False)
    # The payload itself, for a backend that hands it to the node directly (a cluster's agent); else it is
    # read from payload_url.
    payload: Optional[bytes] = field(default=None, repr=False, compare=False)
    # The store payload_url names, while the payload is not in it yet: prepare left a small one for a backend
    # that hands it over inline (Backend.inline_limit), which puts it there before a node must read it.
    pending_store: Optional[Any] = field(default=None, repr=False, compare=False)

    def cluster_name_for(self, slot: int) -> str:
        """The name of the slot-th cluster of this signature in this run."""
        if slot == 0:
            return self.cluster_name
        suffix = f"-{slot}"
        return self.cluster_name[: MAX_NAME - len(suffix)].rstrip("-") + suffix

    def public_dict(self) -> dict[str, Any]:
        """A printable form: secret values never appear."""
        return {
            "node": self.node,
            "run_id": self.run_id,
            "cluster_name": self.cluster_name,
            "signature": self.signature,
            "image": self.image,
            "docker_run_args": list(self.docker_run_args),
            "setup": self.setup,
            "run": self.run,
            "envs": dict(self.envs),
            "secrets": sorted(self.secrets),
            "resources": self.resources,
        }


def signature(settings: NodeSettings, image: str) -> str:
    """A stable hash of what makes a node's cluster: its VM fields and its container image."""
    data = {name: getattr(settings, name) for name in SIGNATURE_FIELDS}
    data["image"] = image
    if settings.pool is not None:
        # Pool nodes run on the pool's workers, never on a plain cluster of the same resources.
        data["pool"] = settings.pool.model_dump()
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _slug(text: str, limit: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if len(slug) > limit or slug != text.lower():
        # Keep names apart that differ only in characters the slug dropped.
        digest = hashlib.sha256(text.encode()).hexdigest()[:6]
        slug = slug[: limit - 7].rstrip("-") + "-" + digest
    return slug.strip("-") or "run"


def cluster_name(settings: NodeSettings, sig: str, run_id: str) -> str:
    """Deterministic and valid on every cloud: lowercase, digits, '-', at most 63, starts with a letter."""
    if settings.cluster_name:
        return settings.cluster_name
    name = f"skyvm-{_slug(run_id, 24)}-{sig[:8]}"
    return name[:MAX_NAME].rstrip("-")


def pool_name(settings: NodeSettings, sig: str, run_id: str) -> Optional[str]:
    """The SkyPilot pool a node runs on: the shared one it names, else one of this signature and run."""
    if settings.pool is None:
        return None
    if settings.pool.name:
        return settings.pool.name
    return f"skyvm-pool-{_slug(run_id, 24)}-{sig[:8]}"[:MAX_NAME].rstrip("-")


def docker_run_args(settings: NodeSettings) -> tuple[str, ...]:
    args = list(settings.docker_run_args)
    if settings.accelerators is not None:
        if not any(a == "--gpus" or a.startswith("--gpus=") for a in args):
            args += ["--gpus", "all"]
        if not any(a == "--shm-size" or a.startswith("--shm-size=") for a in args):
            args.append(GPU_SHM_SIZE)
    return tuple(args)


def resources(settings: NodeSettings) -> dict[str, Any]:
    """The VM fields SkyPilot's Resources takes, only those set."""
    names = [n for n in SIGNATURE_FIELDS if n not in _TASK_FIELDS and (n != "spot_fallback" or settings.spot_fallback)]
    return {n: getattr(settings, n) for n in names if getattr(settings, n) not in (None, {}, [])}


def node_command(payload_url: str, result_url: str, attempt_id: str) -> str:
    """The run command: start the node runtime on this attempt's payload.

    Only URLs and names go on the command line; secrets reach the process
    through its environment.
    """
    return " ".join(
        [NODE_IMAGE_PYTHON, "-m", "skyvm.node", "run", "--payload", shlex.quote(payload_url), "--result", shlex.quote(result_url), "--attempt", shlex.quote(attempt_id)]
    )


SETUP_COMMAND = f"{NODE_IMAGE_PYTHON} -m skyvm.node check"


def plan_node(
    settings: NodeSettings,
    *,
    node: str,
    run_id: str,
    attempt_id: str,
    payload_url: str,
    result_url: str,
    image: str,
    secrets: Optional[dict[str, str]] = None,
    registry_auth: Optional[tuple[str, str]] = None,
    payload: Optional[bytes] = None,
) -> TaskSpec:
    """Turn resolved settings, the node's identity, its payload and its image into a TaskSpec."""
    if settings.single_vm:
        # One cluster for the whole run, whatever each node asks for; nodes take turns on it.
        sig = hashlib.sha256(f"single-vm:{settings.backend}:{run_id}:{image}".encode()).hexdigest()
        settings = settings.model_copy(update={"max_clusters": 1})
    else:
        sig = signature(settings, image)
    secrets = dict(settings.secrets if secrets is None else secrets)
    return TaskSpec(
        node=node,
        run_id=run_id,
        attempt_id=attempt_id,
        signature=sig,
        cluster_name=cluster_name(settings, sig, run_id),
        image=image,
        registry=settings.registry,
        docker_run_args=docker_run_args(settings),
        setup=SETUP_COMMAND,
        run=node_command(payload_url, result_url, attempt_id),
        envs={
            **settings.envs,
            "SKYVM_NODE": node,
            "SKYVM_RUN_ID": run_id,
            "SKYVM_ATTEMPT_ID": attempt_id,
            # Names only: the node masks these variables' values in its own log, which a deferred
            # Airflow task's trigger (a process that never saw the secrets) streams as it is.
            "SKYVM_SECRET_NAMES": ",".join(sorted(secrets)),
        },
        secrets=secrets,
        resources=resources(settings),
        settings=settings,
        payload_url=payload_url,
        result_url=result_url,
        registry_auth=registry_auth,
        payload=payload,
    )
