"""A TaskSpec as SkyPilot's task YAML (a plain dict): what ``sky.Task.from_yaml_config`` takes.

Pure and JSON-serialisable, so it crosses the bridge to SkyPilot's own
environment unchanged. No ``sky`` import here.

May import: the standard library, skyvm.candidates, skyvm.clouds, skyvm.errors, skyvm.plan.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from skyvm.candidates import CANDIDATE_FIELDS, candidate_layers
from skyvm.clouds import SKYPILOT_INFRA
from skyvm.errors import SettingsError
from skyvm.plan import TaskSpec

# Resource fields passed through unchanged.
_PASS_THROUGH = ("instance_type", "cpus", "memory", "accelerators", "accelerator_args", "use_spot", "job_recovery", "disk_size", "disk_tier", "ports", "network_tier", "max_hourly_cost", "autostop")


def _label_value(text: str) -> str:
    # Valid as a label value on every cloud: lowercase, digits, '-', '_', at most 63.
    return re.sub(r"[^a-z0-9_-]", "-", text.lower())[:63].strip("-_") or "none"


def infra_of(resources: dict[str, Any]) -> Optional[str]:
    """``cloud`` + ``region`` + ``zone`` as one SkyPilot ``infra`` string (``infra`` as given wins)."""
    if resources.get("infra"):
        return resources["infra"]
    cloud = resources.get("cloud")
    if not cloud:
        if resources.get("region") or resources.get("zone"):
            raise SettingsError([("region", "region/zone without a cloud: give cloud (or infra='CLOUD/REGION[/ZONE]')")])
        return None
    parts = [SKYPILOT_INFRA[cloud]] + [p for p in (resources.get("region"), resources.get("zone")) if p]
    if resources.get("zone") and not resources.get("region"):
        raise SettingsError([("zone", "a zone needs its region: give region too (or infra='CLOUD/REGION/ZONE')")])
    return "/".join(parts)


def resources_config(res: dict[str, Any]) -> dict[str, Any]:
    """SkyPilot's ``resources:`` block for a node's resource fields (as in TaskSpec.resources).

    Candidates become SkyPilot's own ``any_of`` / ``ordered`` (``spot_fallback``: ordered, spot
    first), each candidate whole (the node's resource fields under its own), so SkyPilot's
    optimizer and failover choose among them; what every candidate shares stays on top.
    """
    layers = candidate_layers(res)
    if not layers:
        return _one_resources(res)
    resources = _one_resources({k: v for k, v in res.items() if k not in CANDIDATE_FIELDS})
    resources["ordered" if res.get("ordered") or res.get("spot_fallback") else "any_of"] = [_one_resources(layer) for layer in layers]
    return resources


def _one_resources(res: dict[str, Any]) -> dict[str, Any]:
    resources: dict[str, Any] = {k: res[k] for k in _PASS_THROUGH if res.get(k) is not None}
    infra = infra_of(res)
    if infra:
        resources["infra"] = infra
    if res.get("image_id") is not None:
        resources["image_id"] = res["image_id"]
    if res.get("labels"):
        resources["labels"] = dict(res["labels"])
    return resources


def task_config(spec: TaskSpec, *, registry_password: Optional[str] = None) -> dict[str, Any]:
    """The SkyPilot task for one node attempt.

    The node's container image becomes ``image_id: docker:<image>``, so SkyPilot
    runs ``setup`` and ``run`` inside that container, with ``docker_run_args``
    as its docker run options. If the settings name a VM image (``image_id``),
    the VM keeps it and the commands start the container themselves.
    """
    res = spec.resources
    resources = resources_config(res)
    resources["labels"] = {
        **res.get("labels", {}),
        "skyvm-run-id": _label_value(spec.run_id),
        "skyvm-node": _label_value(spec.node),
        "skyvm-signature": spec.signature[:12],
    }
    envs = dict(spec.envs)
    secrets = dict(spec.secrets)
    login = spec.registry_auth or ((spec.registry.username, registry_password or "") if spec.registry and spec.registry.username else None)
    s = spec.settings
    if s.num_nodes > 1 and s.all_ranks:
        envs["SKYVM_ALL_RANKS"] = "1"  # the node runtime runs a callable on every rank, not rank 0 alone
    config: dict[str, Any] = {"name": re.sub(r"[^A-Za-z0-9_.-]", "-", spec.node)[:60] or "node", "envs": envs, "secrets": secrets, "num_nodes": s.num_nodes}
    if s.workdir:
        config["workdir"] = s.workdir
    if s.file_mounts:
        config["file_mounts"] = dict(s.file_mounts)

    vm_image = res.get("image_id")
    if vm_image is None:
        resources["image_id"] = f"docker:{spec.image}"
        config["setup"] = spec.setup
        config["run"] = spec.run
        if spec.docker_run_args:
            config["config"] = {"docker": {"run_options": list(spec.docker_run_args)}}
        if login:
            # SkyPilot logs in with these on the VM; as secrets they stay out of logs and the dashboard.
            secrets.update(SKYPILOT_DOCKER_USERNAME=login[0], SKYPILOT_DOCKER_PASSWORD=login[1], SKYPILOT_DOCKER_SERVER=spec.registry.server)
    else:
        # A custom VM image: run the node's container ourselves, as ZenML's orchestrator does,
        # with env *names* on the command line and values in the job's environment.
        resources["image_id"] = vm_image
        names = " ".join(f"-e {k}" for k in [*envs, *secrets])
        run_args = " ".join(spec.docker_run_args)
        docker_login = ""
        if login:
            secrets["SKYVM_REGISTRY_PASSWORD"] = login[1]
            docker_login = f'printf "%s" "$SKYVM_REGISTRY_PASSWORD" | sudo docker login --username {login[0]} --password-stdin {spec.registry.server} && '
        # Login and pull in run, not only setup: `sky exec` on a warm cluster skips setup, and tokens expire.
        config["setup"] = f"{docker_login}sudo docker pull {spec.image}"
        config["run"] = f"{docker_login}sudo --preserve-env docker run --rm --network host {run_args} {names} {spec.image} sh -c '{spec.setup} && {spec.run}'"
    # The pass-through last: fields skyvm does not model (validated to not be ones it does).
    resources.update(s.skypilot.get("resources", {}))
    config.update(s.skypilot.get("task", {}))
    config["resources"] = resources
    return config


def _pool_labels(spec: TaskSpec, pool: str) -> dict[str, str]:
    # The pool's and its jobs' resources must match, so they carry the same labels: the signature,
    # and for a run's own pool that run (skyvm status / gc read them), never one node's name. A
    # shared pool serves many runs: naming one would make every other run's jobs mismatch it.
    shared = bool(spec.settings.pool and spec.settings.pool.shared)
    return {
        **spec.resources.get("labels", {}),
        **({} if shared else {"skyvm-run-id": _label_value(spec.run_id)}),
        "skyvm-signature": spec.signature[:12],
        "skyvm-pool": "shared" if shared else "run",
    }


def pool_task_config(spec: TaskSpec, pool: str, workers: int) -> dict[str, Any]:
    """The task that makes a SkyPilot pool for a node's signature: ``pool: {workers}``, the node's
    resources and image, setup only (a pool's task has no run: its jobs bring theirs)."""
    config = task_config(spec)
    config.pop("run", None)
    config["name"] = pool
    config["pool"] = {"workers": workers}
    # The pool pulls the image when a worker starts; the jobs' own envs and secrets go with each job.
    config["envs"] = {}
    config["secrets"] = {k: v for k, v in config["secrets"].items() if k.startswith("SKYPILOT_DOCKER_") or k == "SKYVM_REGISTRY_PASSWORD"}
    config["resources"] = {k: v for k, v in config["resources"].items() if k != "job_recovery"}
    config["resources"]["labels"] = _pool_labels(spec, pool)
    return config


def pool_job_config(spec: TaskSpec, pool: str) -> dict[str, Any]:
    """One node attempt as a job on a pool: run only (jobs on a pool cannot have their own setup,
    workdir or file mounts), resources exactly the pool's."""
    config = task_config(spec)
    config.pop("setup", None)
    config["resources"] = {k: v for k, v in config["resources"].items() if k != "job_recovery"}
    config["resources"]["labels"] = _pool_labels(spec, pool)
    return config
