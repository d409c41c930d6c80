"""A node's settings, and the shared settings YAML that both engines read.

The fields and their accepted forms follow ZenML's SkyPilot VM orchestrator
(the seed), with the mistakes it makes fixed: unknown keys are errors, and
per-cloud limits are checked when settings are validated, not when a VM is
already being asked for.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from skyvm import candidates as _cands
from skyvm.candidates import FieldError
from skyvm.errors import SettingsError

CLOUDS = ("aws", "gcp", "azure", "lambda", "kubernetes")
# infra prefixes SkyPilot accepts, mapped to the cloud they mean.
_INFRA_CLOUDS = {"aws": "aws", "gcp": "gcp", "azure": "azure", "lambda": "lambda", "kubernetes": "kubernetes", "k8s": "kubernetes"}
DISK_TIERS = ("low", "medium", "high", "ultra", "best")
RECOVERY_STRATEGIES = ("FAILOVER", "EAGER_NEXT_REGION", "NONE")
BACKENDS = ("local", "skypilot")
STORE_PREFIXES = ("file://", "s3://", "gs://", "gcs://", "az://", "abfs://")

# Lambda Cloud has no spot market, no custom images, no zones, fixed disks and
# no autostop: SkyPilot would refuse these only at launch time.
LAMBDA_UNSUPPORTED = ("use_spot", "spot_fallback", "job_recovery", "image_id", "zone", "disk_size", "disk_tier", "idle_minutes_to_autostop", "autostop")

_QUANTITY = re.compile(r"^\d+(\.\d+)?\+?$")
_ACCEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*(:\d+(\.\d+)?)?$")
_CLUSTER_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _quantity(value: Any, what: str) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number or a string like '2' or '2+', not a boolean")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"{what} must be positive, got {value}")
        return f"{value:g}"
    if isinstance(value, str) and _QUANTITY.match(value.strip()):
        text = value.strip()
        if float(text.rstrip("+")) <= 0:
            raise ValueError(f"{what} must be positive, got {value!r}")
        return text
    raise ValueError(f"{what} accepts a positive number or a string like '2' or '2+' (meaning at least 2); got {value!r}")


def _cluster_name_field(value: Optional[str], field: str) -> Optional[str]:
    if value is not None and not _CLUSTER_NAME.match(value):
        raise ValueError(
            f"{field} must be 1-63 characters of lowercase letters, digits and '-', "
            f"starting with a letter and not ending with '-' (valid on every cloud); got {value!r}"
        )
    return value


class RegistrySettings(BaseModel):
    """A container registry and the credentials to reach it, by reference.

    The password itself never sits in settings: ``password`` is a secret
    reference (``env:NAME``, ``file:PATH``, ``airflow:CONN_ID``,
    ``prefect:secret/NAME``); ``password_env`` / ``password_file`` are the older
    spellings of the first two. ``connector`` names a connector that mints a
    fresh token instead (ECR, Artifact Registry, ACR).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    server: str
    username: Optional[str] = None
    password: Optional[str] = None
    password_env: Optional[str] = None
    password_file: Optional[str] = None
    connector: Optional[str] = None

    @field_validator("password")
    @classmethod
    def _reference(cls, value: Optional[str]) -> Optional[str]:
        from skyvm.connectors.refs import check_syntax

        return None if value is None else check_syntax(value, "registry.password")

    @model_validator(mode="after")
    def _one_password_source(self) -> "RegistrySettings":
        sources = [n for n in ("password", "password_env", "password_file", "connector") if getattr(self, n)]
        if len(sources) > 1:
            raise ValueError(f"give one of password, password_env, password_file or connector, not {' and '.join(sources)}")
        if sources and sources[0] != "connector" and not self.username:
            raise ValueError("a registry password needs a username")
        return self

    def password_reference(self) -> Optional[str]:
        if self.password:
            return self.password
        if self.password_env:
            return f"env:{self.password_env}"
        if self.password_file:
            return f"file:{self.password_file}"
        return None


class PoolSettings(BaseModel):
    """Warm workers for a signature: ``{workers: N}`` (a pool skyvm makes per signature and run)
    or ``{name: NAME[, workers: N]}`` (a long-lived pool a team shares; ``pool: NAME`` for short)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Optional[str] = None
    workers: int = 1

    @field_validator("workers", mode="before")
    @classmethod
    def _check_workers(cls, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
            raise ValueError(f"pool.workers accepts a whole number from 1 to 1000 (warm workers kept for the nodes); got {value!r}")
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: Optional[str]) -> Optional[str]:
        # SkyPilot names a pool's workers <pool>-<id>, so a pool name must be a valid cluster name too.
        return _cluster_name_field(value, "pool.name")

    @property
    def shared(self) -> bool:
        """A named pool outlives runs: skyvm never tears it down at a run's end."""
        return self.name is not None


class NodeSettings(BaseModel):
    """Everything that decides where and how one node runs."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # Where: the backend, then the cloud placement SkyPilot chooses within.
    backend: Literal["local", "skypilot"] = "local"
    cloud: Optional[Literal["aws", "gcp", "azure", "lambda", "kubernetes"]] = None
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
    def _deprecated_alias(cls, data: Any) -> Any:
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
    def _check_candidates(cls, value: Any, info) -> Any:
        return _cands.check_candidates(value, info.field_name)

    @field_validator("autostop", mode="before")
    @classmethod
    def _check_autostop(cls, value: Any) -> Any:
        return _cands.check_autostop(value)

    @field_validator("skypilot", mode="before")
    @classmethod
    def _check_pass_through(cls, value: Any) -> Any:
        return _cands.check_pass_through(value)

    @field_validator("cpus", "memory", mode="before")
    @classmethod
    def _check_quantity(cls, value: Any, info) -> Optional[str]:
        return _quantity(value, info.field_name)

    @field_validator("accelerators", mode="before")
    @classmethod
    def _check_accelerators(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            if not _ACCEL.match(value.strip()):
                raise ValueError(f"accelerators accepts 'NAME', 'NAME:COUNT' or {{NAME: COUNT}} (e.g. 'V100', 'V100:2'); got {value!r}")
            name, _, count = value.strip().partition(":")
            if count and float(count) <= 0:
                raise ValueError(f"accelerator count must be positive; got {value!r}")
            return value.strip()
        if isinstance(value, Mapping):
            if len(value) != 1:
                raise ValueError(f"accelerators as a mapping takes exactly one NAME: COUNT entry; got {dict(value)!r}")
            ((name, count),) = value.items()
            if isinstance(count, bool) or not isinstance(count, (int, float)) or count <= 0:
                raise ValueError(f"accelerator count must be a positive number; got {count!r} for {name!r}")
            return {str(name): int(count) if float(count).is_integer() else count}
        raise ValueError(f"accelerators accepts 'NAME', 'NAME:COUNT' or {{NAME: COUNT}}; got {value!r}")

    @field_validator("job_recovery", mode="before")
    @classmethod
    def _check_recovery(cls, value: Any) -> Any:
        if value is None:
            return None
        allowed = ", ".join(RECOVERY_STRATEGIES)
        if isinstance(value, str):
            if value.upper() not in RECOVERY_STRATEGIES:
                raise ValueError(f"job_recovery strategy must be one of {allowed} (any case); got {value!r}{_suggest(value.upper(), RECOVERY_STRATEGIES)}")
            return value
        if isinstance(value, Mapping):
            extra = set(value) - {"strategy", "max_restarts_on_errors", "recover_on_exit_codes"}
            if extra:
                raise ValueError(f"job_recovery accepts keys strategy, max_restarts_on_errors, recover_on_exit_codes; unknown: {sorted(extra)}")
            strategy = value.get("strategy")
            if strategy is not None and str(strategy).upper() not in RECOVERY_STRATEGIES:
                raise ValueError(f"job_recovery.strategy must be one of {allowed}; got {strategy!r}{_suggest(str(strategy).upper(), RECOVERY_STRATEGIES)}")
            restarts = value.get("max_restarts_on_errors")
            if restarts is not None and (not isinstance(restarts, int) or restarts < 0):
                raise ValueError(f"job_recovery.max_restarts_on_errors must be a non-negative integer; got {restarts!r}")
            return dict(value)
        raise ValueError(f"job_recovery accepts a strategy name ({allowed}) or a mapping; got {value!r}")

    @field_validator("infra")
    @classmethod
    def _check_infra(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        parts = value.split("/")
        if parts[0].lower() not in _INFRA_CLOUDS or any(not p for p in parts) or len(parts) > 3:
            raise ValueError(
                "infra accepts CLOUD[/REGION[/ZONE]] (e.g. 'aws/us-east-1') or 'k8s/CONTEXT', "
                f"with CLOUD one of {', '.join(sorted(_INFRA_CLOUDS))}; got {value!r}{_suggest(parts[0].lower(), _INFRA_CLOUDS)}"
            )
        return value

    @field_validator("cluster_name")
    @classmethod
    def _check_cluster_name(cls, value: Optional[str]) -> Optional[str]:
        return _cluster_name_field(value, "cluster_name")

    @field_validator("ports", mode="before")
    @classmethod
    def _check_ports(cls, value: Any) -> Any:
        if value is None:
            return None
        items = value if isinstance(value, list) else [value]
        out: list[Union[int, str]] = []
        for item in items:
            text = str(item)
            lo, _, hi = text.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()) or not (0 < int(lo) < 65536) or (hi and not int(lo) <= int(hi) < 65536):
                raise ValueError(f"ports accepts port numbers (1-65535) or ranges like '8000-8010'; got {item!r}")
            out.append(int(text) if not hi else text)
        return out

    @field_validator("envs", "secrets")
    @classmethod
    def _check_env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name (letters, digits, '_', not starting with a digit)")
        return value

    @field_validator("envs", "secrets", "labels", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): ("" if v is None else str(v)) for k, v in value.items()}
        return value

    @field_validator("payload_store")
    @classmethod
    def _check_store(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and "://" in value and not value.startswith(STORE_PREFIXES):
            raise ValueError(
                "payload_store accepts a directory path, file://PATH, s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX] "
                f"or az://CONTAINER[/PREFIX]; got {value!r}"
            )
        return value

    @field_validator("connector", mode="before")
    @classmethod
    def _connector_names(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError(f"connector takes a connector name or a list of names (one per cloud); got {value!r}")

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> "NodeSettings":
        if info.context and info.context.get("partial"):
            return self  # one layer alone; the merged settings are checked whole
        if self.infra and (self.region or self.zone):
            raise FieldError("region" if self.region else "zone", f"infra ({self.infra!r}) conflicts with region/zone: give infra='CLOUD/REGION/ZONE' or cloud + region + zone, not both")
        infra_cloud = _INFRA_CLOUDS[self.infra.split("/")[0].lower()] if self.infra else None
        if infra_cloud and self.cloud and infra_cloud != self.cloud:
            raise FieldError("cloud", f"cloud={self.cloud!r} conflicts with infra={self.infra!r}")
        self._check_connectors()
        if self.pool is not None:
            self._check_pool()
        if self.effective_cloud == "lambda":
            bad = [f for f in LAMBDA_UNSUPPORTED if f in self.model_fields_set and getattr(self, f) not in (None, False)]
            if bad:
                raise FieldError(
                    bad[0],
                    f"Lambda Cloud does not support {', '.join(bad)}; "
                    f"drop {'it' if len(bad) == 1 else 'them'} or choose another cloud ({', '.join(c for c in CLOUDS if c != 'lambda')})"
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
                where, msg = _problems(exc, "")[0]
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
                raise ValueError(f"{field_name}: unknown connector {name!r}{_suggest(name, self.connector_defs)}; connectors: {defined}")
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
            return _INFRA_CLOUDS[self.infra.split("/")[0].lower()]
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
# Fields whose values are mappings merged key by key across layers, so a node
# can add one env var without repeating the defaults' others.
_MERGED_MAPPINGS = ("envs", "secrets", "labels")
_TOP_LEVEL = ("connectors", "defaults", "profiles", "nodes")


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _problems(exc: ValidationError, prefix: str) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        path = ".".join([prefix] + loc if prefix else loc)
        found = (err.get("ctx") or {}).get("error")
        if isinstance(found, FieldError):
            path = ".".join(p for p in (prefix, found.field) if p)
        if err["type"] == "extra_forbidden":
            name = loc[-1]
            accepted = FIELD_NAMES if len(loc) == 1 else {"pool": PoolSettings.model_fields}.get(loc[0], RegistrySettings.model_fields)
            msg = f"unknown field {name!r}{_suggest(name, accepted)}; accepted fields: {', '.join(sorted(accepted))}"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"].startswith(("string_type", "int_", "float_", "bool_", "dict_", "list_")):
                msg += f" (got {err.get('input')!r})"
            elif err["type"] == "literal_error":
                # An enum: repeat what was given, and the nearest accepted value when one is close.
                accepted = re.findall(r"'([^']*)'", (err.get("ctx") or {}).get("expected", ""))
                msg = f"got {err.get('input')!r}{_suggest(str(err.get('input')), accepted)}; accepted: {', '.join(repr(a) for a in accepted)}"
        out.append((path, msg))
    return out


def _validated_layer(layer: Any, path: str, source: Optional[str]) -> dict[str, Any]:
    """Check one partial layer (defaults, a profile, a node entry, code arguments)."""
    if layer is None:
        return {}
    if not isinstance(layer, Mapping):
        raise SettingsError([(path, f"expected a mapping of settings, got {type(layer).__name__}")], source)
    if "connector_defs" in layer:
        raise SettingsError([(f"{path}.connector_defs", "connectors are defined in the file's top-level connectors: map, then named with connector: NAME")], source)
    try:
        model = NodeSettings.model_validate(dict(layer), context={"partial": True})
    except ValidationError as exc:
        raise SettingsError(_problems(exc, path), source) from None
    return model.model_dump(exclude_unset=True)


def validate_layer(layer: Any, path: str, source: Optional[str] = None) -> dict[str, Any]:
    """Check a partial set of settings on its own (unknown keys, forms); returns the fields it sets."""
    return _validated_layer(layer, path, source)


def merge_layers(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Later layers win; envs/secrets/labels merge key by key."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key in _MERGED_MAPPINGS and isinstance(merged.get(key), dict) and isinstance(value, Mapping):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return merged


class SkyVMConfig:
    """The shared settings file: ``defaults``, named ``profiles`` and per-node ``nodes``.

    Precedence, lowest first: built-in defaults, ``defaults``, the node's
    profile, ``nodes[name]``, arguments in code, a per-call override.
    """

    def __init__(self, data: Optional[Mapping[str, Any]] = None, source: Optional[str] = None):
        self.source = source
        data = {} if data is None else data
        if not isinstance(data, Mapping):
            raise SettingsError([("", f"the file must hold a mapping with keys {', '.join(_TOP_LEVEL)}; got {type(data).__name__}")], source)
        unknown = [k for k in data if k not in _TOP_LEVEL]
        if unknown:
            raise SettingsError(
                [(str(k), f"unknown top-level key{_suggest(str(k), _TOP_LEVEL)}; accepted: {', '.join(_TOP_LEVEL)}") for k in unknown], source
            )
        from skyvm.connectors.base import parse_connector

        self.connectors = {name: parse_connector(name, conn, f"connectors.{name}", source) for name, conn in self._section(data, "connectors").items()}
        self.defaults = _validated_layer(data.get("defaults"), "defaults", source)
        self.profiles: dict[str, dict[str, Any]] = {}
        for name, layer in self._section(data, "profiles").items():
            self.profiles[name] = _validated_layer(layer, f"profiles.{name}", source)
        self.nodes: dict[str, dict[str, Any]] = {}
        self.node_profiles: dict[str, str] = {}
        for name, layer in self._section(data, "nodes").items():
            layer = dict(layer) if isinstance(layer, Mapping) else layer
            if isinstance(layer, dict) and "profile" in layer:
                self.node_profiles[name] = self._check_profile(layer.pop("profile"), f"nodes.{name}.profile")
            self.nodes[name] = _validated_layer(layer, f"nodes.{name}", source)
        # Resolve everything once so cross-field mistakes (infra vs region,
        # Lambda limits) in the defaults, any profile or node surface now, not at launch; each
        # names the layer that set the bad field.
        self._resolve_layers([self.defaults], "defaults", paths=["defaults"])
        for name in self.profiles:
            self._resolve_layers([self.defaults, self.profiles[name]], f"profiles.{name}", paths=["defaults", f"profiles.{name}"])
        for name in self.nodes:
            self.resolve(name)

    def _section(self, data: Mapping[str, Any], key: str) -> dict[str, Any]:
        section = data.get(key) or {}
        if not isinstance(section, Mapping):
            raise SettingsError([(key, f"expected a mapping of NAME: settings, got {type(section).__name__}")], self.source)
        return {str(k): v for k, v in section.items()}

    def _check_profile(self, profile: Any, path: str) -> str:
        if profile not in self.profiles:
            known = ", ".join(sorted(self.profiles)) or "none defined"
            raise SettingsError([(path, f"unknown profile {profile!r}{_suggest(str(profile), self.profiles)}; profiles in this file: {known}")], self.source)
        return profile

    @classmethod
    def load(cls, path: Union[str, os.PathLike, None] = None) -> "SkyVMConfig":
        """Load the explicit path, else ``$SKYVM_CONFIG``, else ``./skyvm.yaml``, else built-in defaults."""
        if path is None:
            path = os.environ.get("SKYVM_CONFIG") or None
            if path is None and Path("skyvm.yaml").is_file():
                path = "skyvm.yaml"
        if path is None:
            return cls({}, source=None)
        file = Path(path)
        if not file.is_file():
            raise SettingsError([("", "settings file not found")], str(file))
        try:
            data = yaml.safe_load(file.read_text())
        except yaml.YAMLError as exc:
            raise SettingsError([("", f"not valid YAML: {exc}")], str(file)) from None
        return cls(data, source=str(file))

    def _resolve_layers(self, layers: list[Mapping[str, Any]], path: str, extra_connectors: Optional[dict] = None, paths: Optional[list[str]] = None) -> NodeSettings:
        defs = {name: c.public_dump() for name, c in {**self.connectors, **(extra_connectors or {})}.items()}
        try:
            return NodeSettings.model_validate({**merge_layers(*layers), "connector_defs": defs})
        except ValidationError as exc:
            raise SettingsError([(_layer_of(where, layers, paths, path), msg) for where, msg in _problems(exc, "")], self.source) from None

    def resolve(
        self,
        node: str,
        *,
        profile: Optional[str] = None,
        code: Optional[Mapping[str, Any]] = None,
        override: Optional[Mapping[str, Any]] = None,
    ) -> NodeSettings:
        """The settings of one node, all layers applied."""
        code = dict(code or {})
        override = dict(override or {})
        # Connector objects given in code join the file's, under their names.
        extra: dict[str, Any] = {}
        for layer in (code, override):
            if "connector" in layer:
                layer["connector"], found = _connector_objects(layer["connector"])
                extra.update(found)
        # A profile named in code or in the per-call override beats the node entry's.
        for layer in (code, override):
            if "profile" in layer:
                profile = layer.pop("profile") or profile
        chosen = profile or self.node_profiles.get(node)
        profile_layer = self.profiles[self._check_profile(chosen, "profile")] if chosen else {}
        layers = [
            self.defaults,
            profile_layer,
            self.nodes.get(node, {}),
            _validated_layer(code, "arguments", "code"),
            _validated_layer(override, "override", "code"),
        ]
        paths = ["defaults", f"profiles.{chosen}", f"nodes.{node}", "arguments", "override"]
        return self._resolve_layers(layers, f"nodes.{node}", extra, paths=paths)


def _layer_of(where: str, layers: list[Mapping[str, Any]], paths: Optional[list[str]], default: str) -> str:
    """``where`` (a field path inside a node) under the last layer that set its field: an error
    points at the line to change, not at the node that merely inherited it."""
    field = where.split(".")[0]
    if field and paths:
        for layer, layer_path in reversed(list(zip(layers, paths))):
            if field in layer:
                return f"{layer_path}.{where}"
    return f"{default}.{where}" if where else default


def _connector_objects(value: Any) -> tuple[Any, dict]:
    """``connector=`` in code may hold Connector objects: their names, and the objects by name."""
    from skyvm.connectors.base import Connector

    items = value if isinstance(value, (list, tuple)) else [value]
    if not any(isinstance(v, Connector) for v in items):
        return value, {}
    names, found = [], {}
    for item in items:
        if isinstance(item, Connector):
            name = item.name or f"{item.type}-{item.fingerprint()[:6]}"
            found[name] = item.model_copy(update={"name": name})
            names.append(name)
        else:
            names.append(item)
    return (names if isinstance(value, (list, tuple)) else names[0]), found


def as_config(settings: Union[None, str, os.PathLike, Mapping[str, Any], SkyVMConfig]) -> SkyVMConfig:
    """Accept what users pass as ``settings=``: a path, a dict shaped like the file, a config, or None."""
    if isinstance(settings, SkyVMConfig):
        return settings
    if isinstance(settings, Mapping):
        return SkyVMConfig(settings, source="<settings dict>")
    return SkyVMConfig.load(settings)
