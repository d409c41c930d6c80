"""A node's settings: the model every engine and backend reads, and its whole-node checks.

Holds: ``NodeSettings`` (the fields, their forms through :mod:`skyvm.settings.forms`, and the
checks across fields: infra against region, Lambda Cloud's limits, pools, connectors,
candidates), ``FIELD_NAMES`` and ``unknown_key`` (how an unknown key in a node is worded).
Validated with the context ``{"partial": True}`` it checks one layer alone (what the file's
defaults, a profile, a node entry or code arguments set); the merged layers are checked whole.

The fields and their accepted forms follow ZenML's SkyPilot VM orchestrator
(the seed), with the mistakes it makes fixed: unknown keys are errors, and
per-cloud limits are checked when settings are validated, not when a VM is
already being asked for.

May import: pydantic, :mod:`skyvm.settings.forms` and ``.parts``, :mod:`skyvm.candidates`,
:mod:`skyvm.validation`; nothing of the file loader.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Mapping, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

import skyvm.settings.forms as forms
from skyvm import candidates as _cands
from skyvm.candidates import FieldError
from skyvm.settings.parts import PoolSettings, RegistrySettings
from skyvm.validation import problems, suggest, unknown_field


def _partial(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("partial"))


def _below(field: str, check: Callable[..., Any], *args: Any) -> Any:
    """Run a candidates check inside the validator of ``field``: its ``FieldError`` names a path
    from the node, while pydantic already reports the error at ``field``."""
    try:
        return check(*args)
    except FieldError as exc:
        raise FieldError(exc.field.removeprefix(field).lstrip("."), str(exc)) from None


class NodeSettings(BaseModel):
    """Everything that decides where and how one node runs."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # Where: the backend, then the cloud placement SkyPilot chooses within.
    backend: Literal["local", "skypilot"] = "local"
    cloud: Optional[Literal[forms.CLOUDS]] = None
    infra: Optional[str] = None
    region: Optional[str] = None
    zone: Optional[str] = None

    # What the VM has.
    instance_type: Optional[str] = None
    cpus: Optional[str] = None
    memory: Optional[str] = None
    accelerators: Optional[Union[str, dict[str, float]]] = None
    accelerator_args: Optional[dict[str, Any]] = None
    use_spot: Optional[bool] = None
    job_recovery: Optional[Union[str, dict[str, Any]]] = None
    image_id: Optional[Union[str, dict[str, str]]] = None
    disk_size: Optional[int] = Field(default=None, gt=0)
    disk_tier: Optional[Literal["low", "medium", "high", "ultra", "best"]] = None
    ports: Optional[list[Union[int, str]]] = None
    labels: dict[str, str] = Field(default_factory=dict)

    # The cluster's life.
    cluster_name: Optional[str] = None
    retry_until_up: bool = False
    idle_minutes_to_autostop: Optional[int] = Field(default=30, ge=0)
    down: bool = True
    max_clusters: int = Field(default=4, ge=1, description="clusters of one signature running at once; more nodes queue")
    # The seed's disable_step_based_settings: every node of a run on one cluster, one node at a
    # time; the cluster has the resources of the node that started it.
    single_vm: bool = False
    # Warm workers ahead of the nodes of this signature (SkyPilot: a managed-jobs pool; local:
    # clusters started ahead). A cloud VM's cold start is minutes; a pool worker's job starts in seconds.
    pool: Optional[PoolSettings] = None

    # Placement choices (SkyPilot's resource candidates): any_of (the cheapest feasible one wins)
    # or ordered (the first feasible one wins), each a mapping of resource fields over the node's own;
    # spot_fallback: spot first, then on demand. max_hourly_cost refuses a placement that costs more.
    any_of: Optional[list[dict[str, Any]]] = None
    ordered: Optional[list[dict[str, Any]]] = None
    spot_fallback: bool = False
    max_hourly_cost: Optional[float] = Field(default=None, gt=0)
    network_tier: Optional[Literal["standard", "best"]] = None
    # VMs in the cluster: a command node runs on each (SkyPilot's SKYPILOT_NODE_RANK and friends
    # set); a callable node runs on rank 0 unless all_ranks is true.
    num_nodes: int = Field(default=1, ge=1)
    all_ranks: bool = False
    workdir: Optional[str] = None
    file_mounts: dict[str, Union[str, dict[str, Any]]] = Field(default_factory=dict)
    # SkyPilot's own autostop form ({idle_minutes, down, wait_for, hook, hook_timeout}, a number
    # of minutes, or false); when given it wins over idle_minutes_to_autostop for the cluster.
    autostop: Optional[Union[bool, int, dict[str, Any]]] = None
    # Fields skyvm does not model, handed to SkyPilot as they are: {resources, task, launch}.
    skypilot: dict[str, dict[str, Any]] = Field(default_factory=dict)

    # The container the node runs in.
    image: Optional[str] = None
    requirements: list[str] = Field(default_factory=list)
    registry: Optional[RegistrySettings] = None
    docker_run_args: list[str] = Field(default_factory=list)

    # The node's run.
    envs: dict[str, str] = Field(default_factory=dict)
    secrets: dict[str, str] = Field(default_factory=dict, repr=False)
    stream_logs: bool = True
    timeout: Optional[float] = Field(default=None, gt=0)
    # Prefect's adapter only (Airflow ignores it): true runs Prefect's own task engine on the node,
    # false ships only the task's function body; unset: the engine where the node can reach the API.
    prefect_engine: Optional[bool] = None

    # Where payloads and results travel: a directory (file:// or a path), s3://, gs:// or az://.
    payload_store: Optional[str] = None
    payload_store_endpoint: Optional[str] = None

    # Credentials: the names of connectors (the file's top-level `connectors:`) this node uses,
    # at most one per cloud; a cloud with none uses its implicit credentials.
    connector: Optional[Union[str, list[str]]] = None
    payload_store_connector: Optional[str] = None
    # The definitions of the file's connectors (references, no secret values), carried with the
    # settings so a node found again elsewhere (a trigger, an executor) has them. Set by SkyVMConfig.
    connector_defs: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _layer_and_alias(cls, data: Any, info: ValidationInfo) -> Any:
        if _partial(info):
            # One layer a user wrote: a mapping, and never the connector definitions the loader adds.
            if not isinstance(data, Mapping):
                raise ValueError(f"expected a mapping of settings, got {type(data).__name__}")
            if "connector_defs" in data:
                raise FieldError("connector_defs", "connectors are defined in the file's top-level connectors: map, then named with connector: NAME")
        if isinstance(data, Mapping) and "spot_recovery" in data:
            data = dict(data)
            if "job_recovery" in data:
                raise ValueError("give job_recovery only; spot_recovery is its deprecated alias")
            data["job_recovery"] = data.pop("spot_recovery")
        return data

    @field_validator("pool", mode="before")
    @classmethod
    def _pool_forms(cls, value: Any) -> Any:
        if value is None or isinstance(value, (Mapping, PoolSettings)):
            return value
        if isinstance(value, str):
            return {"name": value}
        raise ValueError(f"pool accepts {{workers: N}}, a pool name, or {{name: NAME, workers: N}}; got {value!r}")

    @field_validator("any_of", "ordered", mode="before")
    @classmethod
    def _check_candidates(cls, value: Any, info: ValidationInfo) -> Any:
        return _below(info.field_name, _cands.check_candidates, value, info.field_name)

    @field_validator("autostop", mode="before")
    @classmethod
    def _check_autostop(cls, value: Any) -> Any:
        return _below("autostop", _cands.check_autostop, value)

    @field_validator("skypilot", mode="before")
    @classmethod
    def _check_pass_through(cls, value: Any) -> Any:
        return _below("skypilot", _cands.check_pass_through, value)

    @field_validator("cpus", "memory", mode="before")
    @classmethod
    def _check_quantity(cls, value: Any, info: ValidationInfo) -> Optional[str]:
        return forms.quantity(value, info.field_name)

    # Single values: each form is checked, and worded, in skyvm.settings.forms.
    _check_accelerators = field_validator("accelerators", mode="before")(lambda cls, v: forms.accelerators(v))
    _check_recovery = field_validator("job_recovery", mode="before")(lambda cls, v: forms.job_recovery(v))
    _check_infra = field_validator("infra")(lambda cls, v: forms.infra(v))
    _check_cluster_name = field_validator("cluster_name")(lambda cls, v: forms.cluster_name(v, "cluster_name"))
    _check_ports = field_validator("ports", mode="before")(lambda cls, v: forms.ports(v))
    _check_env_names = field_validator("envs", "secrets")(lambda cls, v: forms.env_names(v))
    _stringify = field_validator("envs", "secrets", "labels", mode="before")(lambda cls, v: forms.string_map(v))
    _check_store = field_validator("payload_store")(lambda cls, v: forms.payload_store(v))
    _connector_names = field_validator("connector", mode="before")(lambda cls, v: forms.connector_names(v))

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> "NodeSettings":
        if _partial(info):
            return self  # one layer alone; the merged settings are checked whole
        if self.infra and (self.region or self.zone):
            raise FieldError("region" if self.region else "zone", f"infra ({self.infra!r}) conflicts with region/zone: give infra='CLOUD/REGION/ZONE' or cloud + region + zone, not both")
        infra_cloud = forms.infra_cloud(self.infra) if self.infra else None
        if infra_cloud and self.cloud and infra_cloud != self.cloud:
            raise FieldError("cloud", f"cloud={self.cloud!r} conflicts with infra={self.infra!r}")
        self._check_connectors()
        if self.pool is not None:
            self._check_pool()
        if self.effective_cloud == "lambda":
            bad = [f for f in forms.LAMBDA_UNSUPPORTED if f in self.model_fields_set and getattr(self, f) not in (None, False)]
            if bad:
                raise FieldError(
                    bad[0],
                    f"Lambda Cloud does not support {', '.join(bad)}; "
                    f"drop {'it' if len(bad) == 1 else 'them'} or choose another cloud ({', '.join(c for c in forms.CLOUDS if c != 'lambda')})"
                )
        self._check_candidates_whole()
        if self.num_nodes > 1 and self.backend != "skypilot":
            raise FieldError("num_nodes", f"num_nodes={self.num_nodes} needs backend: skypilot (the local backend runs one container per node)")
        return self

    def _check_candidates_whole(self) -> None:
        """Each candidate over the node's own fields is checked as a whole node (Lambda limits, infra
        against region), so a bad candidate is named before SkyPilot sees it."""
        fields = {k: getattr(self, k) for k in self.model_fields_set}
        _cands.check_combination(fields)
        which = "spot_fallback" if self.spot_fallback else ("any_of" if self.any_of else "ordered")
        layers = _cands.candidate_layers(fields)
        if self.pool is not None and len({bool(layer.get("use_spot")) for layer in layers}) > 1:
            raise FieldError(which, "a pool's workers are all spot or all on demand (SkyPilot refuses a mix): give every candidate the same use_spot, or drop pool")
        for i, layer in enumerate(layers):
            try:
                NodeSettings.model_validate({**layer, "backend": self.backend})
            except ValidationError as exc:
                where, msg = problems(exc, unknown=unknown_key)[0]
                raise FieldError(f"{which}.{i}.{where}" if which != "spot_fallback" else which, f"candidate {i}: {msg}") from None

    def _check_pool(self) -> None:
        # What SkyPilot refuses for a pool, said now rather than at its pool_apply: a pool replaces
        # preempted workers itself, and takes no ordered candidates (spot_fallback, a mix of spot
        # and on demand, is refused with the candidates); single_vm puts every node on one cluster.
        if self.job_recovery is not None and str(self.job_recovery).upper() != "NONE":
            raise FieldError("job_recovery", f"a pool replaces preempted spot workers itself, so job_recovery ({self.job_recovery!r}) cannot be set with pool; drop one of them")
        if self.ordered:
            raise FieldError("ordered", "SkyPilot's pools take no ordered candidates (ordered is set with pool); use any_of, or drop pool")
        if self.single_vm:
            raise FieldError("single_vm", "pool conflicts with single_vm: true (one cluster for the whole run); drop one of them")

    @property
    def connector_names(self) -> list[str]:
        if self.connector is None:
            return []
        return [self.connector] if isinstance(self.connector, str) else list(self.connector)

    def _check_connectors(self) -> None:
        defined = ", ".join(sorted(self.connector_defs)) or "none defined (add a top-level connectors: map)"
        named = [("connector", n) for n in self.connector_names]
        named += [("payload_store_connector", self.payload_store_connector)] if self.payload_store_connector else []
        named += [("registry.connector", self.registry.connector)] if self.registry and self.registry.connector else []
        for field_name, name in named:
            if name not in self.connector_defs:
                raise ValueError(f"{field_name}: unknown connector {name!r}{suggest(name, self.connector_defs)}; connectors: {defined}")
        seen: dict[str, str] = {}
        for name in self.connector_names:
            kind = self.connector_defs[name].get("type")
            if kind in seen:
                raise ValueError(f"connector: {seen[kind]!r} and {name!r} are both {kind} connectors; a node uses at most one per cloud")
            seen[kind] = name

    @property
    def effective_cloud(self) -> Optional[str]:
        if self.cloud:
            return self.cloud
        if self.infra:
            return forms.infra_cloud(self.infra)
        return None

    @property
    def autostop_minutes(self) -> Optional[int]:
        """Idle minutes before the cluster stops (None: never), from ``autostop`` when given (SkyPilot's
        form), else ``idle_minutes_to_autostop``: what the local backend's idle watch applies."""
        if self.autostop is None:
            return self.idle_minutes_to_autostop
        if self.autostop is False:
            return None
        if self.autostop is True:
            return self.idle_minutes_to_autostop
        if isinstance(self.autostop, int):
            return self.autostop
        return self.autostop.get("idle_minutes", self.idle_minutes_to_autostop)

    def accelerator_request(self) -> Optional[tuple[str, float]]:
        """(name, count) of the accelerators asked for, or None."""
        if self.accelerators is None:
            return None
        if isinstance(self.accelerators, dict):
            ((name, count),) = self.accelerators.items()
            return name, count
        name, _, count = self.accelerators.partition(":")
        return name, float(count) if count else 1

    def public_dump(self) -> dict[str, Any]:
        """The settings as a dict, secret values masked (for printing and logs)."""
        data = self.model_dump(mode="json", exclude_none=True, exclude={"connector_defs"})
        if data.get("secrets"):
            data["secrets"] = {k: "***" for k in data["secrets"]}
        return data


FIELD_NAMES = tuple(n for n in NodeSettings.model_fields if n != "connector_defs") + ("spot_recovery",)


def unknown_key(loc: Sequence[str]) -> str:
    """How a key no model of a node has is worded; ``loc`` is its place inside the node."""
    accepted = FIELD_NAMES if len(loc) == 1 else {"pool": PoolSettings.model_fields}.get(loc[0], RegistrySettings.model_fields)
    return unknown_field(loc[-1], accepted)
