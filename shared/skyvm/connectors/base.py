"""What every connector is: a named way to authenticate to one cloud, through that cloud's own SDK.

A connector's settings hold only names, regions and *references* to secrets
(:mod:`skyvm.connectors.refs`), so it can be dumped, stored in a trigger row
or sent to a node's launcher without leaking anything. Its methods resolve
the references in the engine's process when they are needed:

- ``identity()``: prove the credentials work (``skyvm check``).
- ``skypilot_env(private_dir)``: the environment (and 0600 files in a private
  directory) that SkyPilot's own process needs to use this account.
- ``fs_options(url, endpoint)``: fsspec storage options for the launching host.
- ``node_store_access(url, node, ttl_s, endpoint)``: short-lived credentials scoped
  to one store, for a node; never the launcher's long-lived secret. What the node
  reads (``skyvm.payloads`` on the node side):
    s3://  secrets AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN;
           envs AWS_DEFAULT_REGION, AWS_ENDPOINT_URL_S3 (when not AWS itself)
    gs://  secret SKYVM_GCS_TOKEN (an OAuth2 access token); envs SKYVM_GCS_PROJECT,
           STORAGE_EMULATOR_HOST (when not GCS itself)
    az://  secret AZURE_STORAGE_CONNECTION_STRING holding BlobEndpoint=...;SharedAccessSignature=...
           (a SAS limited to the container, with an expiry; never the account key)
  ``endpoint`` is the store's endpoint when it is not the cloud's own (payload_store_endpoint,
  else the connector's, else the standard variable: AWS_ENDPOINT_URL[_S3], STORAGE_EMULATOR_HOST,
  the connection string's BlobEndpoint).
- ``registry_credentials(server)``: a username and a fresh token for a registry.

A connector is its cloud's shared fields (region, endpoints, a storage account) and ``auth``: one
small strategy per auth method (a :class:`Method`: its fields, its checks, what it mints and writes),
chosen by a pydantic discriminated union on ``method``. Settings stay flat
(``{type: aws, method: iam-role, role_arn: ...}``): the connector hands each field to the method
that owns it and dumps them flat again, so references, fingerprints and error texts read as before.
Fields every method accepts stay on the connector; a method's own fields default to empty.

May import: pydantic, skyvm.errors and skyvm.validation (the one formatter of pydantic's errors).
The clouds' modules are imported by name (``CONNECTOR_TYPES``) when a connector of that type is
first used; they import this one.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional, get_args

from pydantic import BaseModel, ConfigDict, SerializationInfo, SerializerFunctionWrapHandler, model_serializer, model_validator

from skyvm.errors import InfrastructureError, SettingsError

# How long a node's store credentials live unless the node's timeout asks for longer.
DEFAULT_NODE_TTL_S = 3600
# Temporary credentials are renewed this long before they expire at the latest
# ($SKYVM_CREDENTIALS_REFRESH_MARGIN_S), and at 80% of their lifetime at the earliest.
REFRESH_MARGIN_S = 300
REFRESH_FRACTION = 0.8
MARGIN_ENV = "SKYVM_CREDENTIALS_REFRESH_MARGIN_S"
# What a method needs: (fields of which at least one is set, what to write) for each thing.
Needs = tuple[tuple[tuple[str, ...], str], ...]
# What an unset field holds: a dump carries other methods' fields so, and they are dropped.
EMPTY: tuple[Any, ...] = (None, "", [], {})


def refresh_margin_s() -> float:
    return float(os.environ.get(MARGIN_ENV) or REFRESH_MARGIN_S)


def renewal_time(issued_at: float, expires_at: float) -> float:
    """When credentials valid from ``issued_at`` to ``expires_at`` are renewed: at 80% of their
    lifetime or the refresh margin before they expire, whichever comes first."""
    return min(issued_at + REFRESH_FRACTION * (expires_at - issued_at), expires_at - refresh_margin_s())


def due(issued_at: Optional[float], expires_at: Optional[float]) -> bool:
    if expires_at is None:
        return False
    return time.time() >= renewal_time(issued_at if issued_at is not None else expires_at, expires_at)


@dataclass
class NodeAccess:
    """What a node is given to reach one store: plain envs (endpoints) and secrets (tokens)."""

    envs: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    expires_at: Optional[float] = None
    scope: str = ""  # said in logs and by `skyvm check`: what the credentials allow


class ConnectorError(InfrastructureError):
    """A connector could not authenticate or reach its cloud: names the connector and the fix."""


class SecretReferenceError(InfrastructureError):
    """A reference that cannot be resolved at launch: names the field, the reference and the fix."""

    def __init__(self, where: str, ref: str, problem: str):
        self.where, self.ref = where, ref
        super().__init__(f"cannot resolve {where}: {problem} (reference {ref!r})")


def require(module: str, extra: str, what: str):
    """Import a cloud SDK, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConnectorError(f"{what} needs {module.split('.')[0]}, which is not installed here: pip install 'skyvm[{extra}]'") from None


class CredentialCache:
    """What connectors minted or built, per connector (by fingerprint) and kind, while it is good.

    One per process (``CREDENTIALS``): AWS temporary keys, google-auth credentials, Azure token
    credentials. ``clear()`` forgets them all (a test starting afresh).
    """

    def __init__(self) -> None:
        self._items: dict[tuple[str, str], Any] = {}
        # Held while a value is made, so two threads never mint twice; re-entrant for a refresh in place.
        self.lock = threading.RLock()

    def get(self, kind: str, conn: "Connector") -> Any:
        return self._items.get((kind, conn.fingerprint()))

    def put(self, kind: str, conn: "Connector", value: Any) -> Any:
        self._items[(kind, conn.fingerprint())] = value
        return value

    def fetch(self, kind: str, conn: "Connector", make: Callable[[], Any], stale: Callable[[Any], bool] = lambda _: False) -> Any:
        """The cached value, made again when there is none or it is ``stale``."""
        with self.lock:
            value = self.get(kind, conn)
            if value is None or stale(value):
                value = self.put(kind, conn, make())
            return value

    def clear(self) -> None:
        with self.lock:
            self._items.clear()


CREDENTIALS = CredentialCache()


class Method(BaseModel):
    """One auth method of one cloud: its fields, its checks and what it does with them.

    ``method`` is the union's tag (a ``Literal`` per subclass). Each cloud's methods share the
    operations that cloud's connector asks of them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str

    NEEDS: ClassVar[Needs] = ()

    @model_validator(mode="after")
    def _needs(self) -> "Method":
        for group, what in self.NEEDS:
            if all(getattr(self, name, None) in EMPTY for name in group):
                raise ValueError(f"method {self.method} needs {what}")
        return self

    @classmethod
    def tag(cls) -> str:
        return cls.model_fields["method"].default

    @classmethod
    def foreign(cls, name: str, owners: list[str]) -> str:
        """The error for a field of other methods given to this one."""
        return f"{name} is for method {' or '.join(owners)}; this connector's method is {cls.tag()}"

    def check(self, conn: "Connector") -> None:
        """Checks that need the connector's shared fields: raise ValueError (pydantic's way)."""

    def skypilot_env(self, conn: "Connector", private_dir: Path) -> dict[str, Optional[str]]:
        """What SkyPilot's process is given (None: unset it), files 0600 in ``private_dir``;
        nothing by default: SkyPilot finds the cloud's ambient credentials itself."""
        return {}


def _methods_of(cls: type["Connector"]) -> dict[str, type[Method]]:
    annotation = cls.model_fields["auth"].annotation
    members = get_args(annotation) or (annotation,)
    return {m.tag(): m for m in members if isinstance(m, type) and issubclass(m, Method) and isinstance(m.tag(), str)}


class Connector(BaseModel):
    """Base of the per-cloud connectors (``type`` names the cloud, ``method`` the auth method)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    name: str = ""
    auth: Method

    METHODS: ClassVar[tuple[str, ...]] = ()
    METHOD_CLASSES: ClassVar[dict[str, type[Method]]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls.METHOD_CLASSES = _methods_of(cls)
        cls.METHODS = tuple(cls.METHOD_CLASSES)

    @model_validator(mode="before")
    @classmethod
    def _route(cls, data: Any) -> Any:
        """Flat settings to ``auth``: each field to the chosen method when it owns it; another
        method's field, when set, is an error naming its methods; an unknown one is left for pydantic."""
        if not isinstance(data, Mapping) or "auth" in data:
            return data
        data = dict(data)
        method = data.pop("method", "implicit")
        chosen = cls.METHOD_CLASSES.get(method)
        auth: dict[str, Any] = {"method": method}
        if chosen is not None:
            for key in [k for k in data if k not in cls.model_fields]:
                if key in chosen.model_fields:
                    auth[key] = data.pop(key)
                    continue
                owners = [tag for tag, m in cls.METHOD_CLASSES.items() if key in m.model_fields]
                if owners and data.pop(key) not in EMPTY:
                    raise ValueError(chosen.foreign(key, owners))
        data["auth"] = auth
        return data

    @model_validator(mode="after")
    def _method_checks(self) -> "Connector":
        self.auth.check(self)
        return self

    @model_serializer(mode="wrap")
    def _flat(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        """Dumped flat, as written: every method's fields (empty but this one's), as one model had them."""
        data = handler(self)
        auth = dict(data.pop("auth", None) or {})
        out: dict[str, Any] = {"type": data.pop("type", self.type), "method": auth.pop("method", self.method)}
        out.update(data)
        for m in self.METHOD_CLASSES.values():
            for key, spec in m.model_fields.items():
                default = spec.get_default(call_default_factory=True)
                if key != "method" and key not in out and not (info.exclude_none and default is None):
                    out[key] = default
        out.update(auth)
        return out

    @classmethod
    def field_names(cls) -> list[str]:
        """Every field the settings may give a connector of this type, sorted."""
        names = {f for f in cls.model_fields if f not in ("name", "auth")} | {"method"}
        for m in cls.METHOD_CLASSES.values():
            names |= set(m.model_fields)
        return sorted(names)

    @property
    def method(self) -> str:
        return self.auth.method

    @property
    def label(self) -> str:
        return f"connector {self.name!r} ({self.type}/{self.method})" if self.name else f"{self.type} ({self.method})"

    @property
    def where(self) -> str:
        """The settings path of this connector's fields, as errors name them."""
        return f"connectors.{self.name or self.type}"

    def fingerprint(self) -> str:
        """A stable hash of the settings (references, not values): one SkyPilot server state per distinct one."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]

    def public_dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    # -- what each cloud implements -------------------------------------------

    def identity(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def skypilot_env(self, private_dir: Path) -> dict[str, Optional[str]]:
        """What SkyPilot's process needs to use this account (None: unset it): the method's."""
        return self.auth.skypilot_env(self, Path(private_dir))

    def renew_at(self) -> Optional[float]:
        """When what ``skypilot_env`` wrote is due to be written again with fresh credentials
        (None: nothing it gave SkyPilot expires, or SkyPilot's SDK renews it by itself)."""
        return None

    def fs_options(self, url: str, endpoint: Optional[str] = None) -> dict[str, Any]:
        raise ConnectorError(f"{self.label} cannot open {url}: it is not a {self.type} store")

    def renewing_fs_options(self, url: str, endpoint: Optional[str] = None) -> Callable[[], tuple[dict[str, Any], Optional[float]]]:
        """For a store open for long (a node's whole run): a function giving ``fs_options`` and when
        the credentials in them are due for renewal (None: never), asked again once they are."""
        return lambda: (self.fs_options(url, endpoint), self.store_renew_at())

    def store_renew_at(self) -> Optional[float]:
        """When the credentials ``fs_options`` gives now are due for renewal (None: they do not expire
        or the SDK renews them by itself)."""
        return None

    def node_store_access(self, url: str, *, node: str, ttl_s: int = DEFAULT_NODE_TTL_S, endpoint: Optional[str] = None) -> NodeAccess:
        raise ConnectorError(f"{self.label} cannot give node {node!r} access to {url}: it is not a {self.type} store")

    def registry_credentials(self, server: str) -> tuple[str, str]:
        raise ConnectorError(f"{self.label} cannot log in to registry {server}: use registry.username and registry.password instead")


# type -> "module:Class", imported only when a connector of that type is used,
# so an engine environment needs only the SDKs of the clouds it uses.
CONNECTOR_TYPES = {
    "aws": "skyvm.connectors.aws:AwsConnector",
    "gcp": "skyvm.connectors.gcp:GcpConnector",
    "azure": "skyvm.connectors.azure:AzureConnector",
    "lambda": "skyvm.connectors.lambda_cloud:LambdaConnector",
    "kubernetes": "skyvm.connectors.kubernetes:KubernetesConnector",
}


def connector_class(kind: str) -> type[Connector]:
    module, _, cls = CONNECTOR_TYPES[kind].partition(":")
    return getattr(importlib.import_module(module), cls)


def parse_connector(name: str, data: Any, path: str, source: Optional[str] = None) -> Connector:
    """One entry of the ``connectors:`` map, validated; errors name the entry, the field and what is accepted."""
    from pydantic import ValidationError

    if isinstance(data, Connector):
        return data if data.name == name else data.model_copy(update={"name": name})
    if not isinstance(data, dict):
        raise SettingsError([(path, f"a connector is a mapping with type and method; got {type(data).__name__}")], source)
    kind = data.get("type")
    if kind not in CONNECTOR_TYPES:
        raise SettingsError([(f"{path}.type", f"got {kind!r}; accepted connector types: {', '.join(CONNECTOR_TYPES)}")], source)
    cls = connector_class(kind)
    method = data.get("method", "implicit")
    if method not in cls.METHODS:
        raise SettingsError([(f"{path}.method", f"got {method!r}; accepted {kind} methods: {', '.join(cls.METHODS)}")], source)
    try:
        return cls.model_validate({**data, "name": name})
    except ValidationError as exc:
        # skyvm.validation is the one formatter of pydantic errors (issue 18): keep using it here.
        from skyvm.validation import any_input, problems

        def flat(loc: list[str]) -> list[str]:
            # A method's field is reported as ``auth.<method>.<field>``: the settings spell it flat.
            return loc[2:] if loc[:1] == ["auth"] else loc

        def unknown(loc) -> str:
            return f"unknown field; {kind} connectors accept: {', '.join(cls.field_names())}"

        raise SettingsError(problems(exc, path, unknown=unknown, note=any_input, spelled=flat), source) from None


def implicit(kind: str) -> Connector:
    """The cloud's ambient credentials (environment, instance role, ADC, ~/.kube/config)."""
    return connector_class(kind)(type=kind, method="implicit", name="")
