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
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from pydantic import BaseModel, ConfigDict

from skyvm.errors import InfrastructureError, SettingsError

# How long a node's store credentials live unless the node's timeout asks for longer.
DEFAULT_NODE_TTL_S = 3600
# Temporary credentials are renewed this long before they expire at the latest
# ($SKYVM_CREDENTIALS_REFRESH_MARGIN_S), and at 80% of their lifetime at the earliest.
REFRESH_MARGIN_S = 300
REFRESH_FRACTION = 0.8
MARGIN_ENV = "SKYVM_CREDENTIALS_REFRESH_MARGIN_S"


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


def require(module: str, extra: str, what: str):
    """Import a cloud SDK, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConnectorError(f"{what} needs {module.split('.')[0]}, which is not installed here: pip install 'skyvm[{extra}]'") from None


class Connector(BaseModel):
    """Base of the per-cloud connectors (``type`` names the cloud, ``method`` the auth method)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    method: str = "implicit"
    name: str = ""

    METHODS: ClassVar[tuple[str, ...]] = ("implicit",)
    STORE_SCHEMES: ClassVar[tuple[str, ...]] = ()

    @property
    def label(self) -> str:
        return f"connector {self.name!r} ({self.type}/{self.method})" if self.name else f"{self.type} ({self.method})"

    def fingerprint(self) -> str:
        """A stable hash of the settings (references, not values): one SkyPilot server state per distinct one."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]

    def public_dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    # -- what each cloud implements -------------------------------------------

    def identity(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def skypilot_env(self, private_dir: Path) -> dict[str, Optional[str]]:  # pragma: no cover - interface (None: unset it)
        raise NotImplementedError

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
# Which connector type serves a payload store URL.
STORE_TYPES = {"s3": "aws", "gs": "gcp", "gcs": "gcp", "az": "azure", "abfs": "azure"}


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
        from skyvm.validation import any_input, problems

        def unknown(loc) -> str:
            return f"unknown field; {kind} connectors accept: {', '.join(sorted(f for f in cls.model_fields if f != 'name'))}"

        raise SettingsError(problems(exc, path, unknown=unknown, note=any_input), source) from None


def implicit(kind: str) -> Connector:
    """The cloud's ambient credentials (environment, instance role, ADC, ~/.kube/config)."""
    return connector_class(kind)(type=kind, method="implicit", name="")
