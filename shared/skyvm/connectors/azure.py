"""Azure through azure-identity and azure-storage-blob: implicit, service-principal, access-token.

    implicit           DefaultAzureCredential (environment, workload/managed identity, az login);
                       for storage also AZURE_STORAGE_CONNECTION_STRING
    service-principal  tenant_id, client_id and client_secret (a reference), or ``credentials:`` an
                       Airflow azure/wasb connection or a Prefect block holding them
    access-token       ``token``: a bare Microsoft Entra access token (a reference). It cannot be
                       refreshed; its audience decides what it can reach (storage needs
                       https://storage.azure.com, ACR management or containerregistry)

Storage, with any method: ``account_name`` with ``account_key`` (a reference), or
``connection_string`` (a reference); without a key, the method's token (the
identity needs a Storage Blob Data role). ``blob_endpoint`` replaces
https://ACCOUNT.blob.core.windows.net (Azurite, sovereign clouds);
``authority_host`` replaces https://login.microsoftonline.com.

A node never gets the account key nor the principal's secret: it gets a SAS
for the one container (read, add, create, write, delete, list) ending with the
node's ttl, signed with the account key, or a user delegation SAS when the
connector has a token credential. A container SAS cannot be narrowed to a
prefix, so the node can reach the whole container.

Each auth method is a strategy in :mod:`skyvm.connectors.azure_methods`; this module holds the
connector: the fields every method takes (tenant, client id, storage account, endpoints), the
storage account's resolution, the node's SAS and the interface.

May import: azure-identity/azure-storage-blob (through ``require``), skyvm.redact, skyvm.clouds and
skyvm.connectors' base, common, refs and azure_methods.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional, Union
from urllib.parse import parse_qs, urlparse

from pydantic import Field, field_validator, model_validator

from skyvm import clouds, redact
from skyvm.connectors import refs
from skyvm.connectors.azure_methods import MANAGEMENT_SCOPE, AccessToken, Implicit, ServicePrincipal, acr_refresh_token
from skyvm.connectors.base import CREDENTIALS, DEFAULT_NODE_TTL_S, Connector, ConnectorError, NodeAccess, require
from skyvm.connectors.common import sdk_call, until

__all__ = ["AzureConnector", "MANAGEMENT_SCOPE", "acr_refresh_token", "container_of", "is_acr", "parse_connection_string"]

ACR_SUFFIXES = (".azurecr.io", ".azurecr.cn", ".azurecr.us")
# A user delegation key lives at most seven days.
MAX_DELEGATION_S = 7 * 24 * 3600
# What container_of reads: the payload stores' Azure schemes, and abfss (TLS) as fsspec spells it.
URL_SCHEMES = (*clouds.schemes_of("azure"), "abfss")

AzureAuth = Annotated[Union[Implicit, ServicePrincipal, AccessToken], Field(discriminator="method")]


@dataclass
class _Storage:
    """Where a storage account is and what opens it (resolved values: never dumped)."""

    account: Optional[str]
    endpoint: Optional[str]
    key: Optional[str] = None
    connection_string: Optional[str] = None
    sas: Optional[str] = None


def parse_connection_string(text: str) -> dict[str, str]:
    parts = {}
    for part in text.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            parts[key] = value
    return parts


def container_of(url: str) -> tuple[str, Optional[str], str]:
    """(container, account or None, prefix) of az://CONTAINER/PREFIX or abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/PREFIX."""
    parsed = urlparse(url)
    if parsed.scheme not in URL_SCHEMES or not parsed.netloc:
        raise ConnectorError(f"{url} is not an Azure Blob URL (az://CONTAINER/PREFIX)")
    container, _, host = parsed.netloc.partition("@")
    return container, (host.split(".")[0] or None) if host else None, parsed.path.strip("/")


def is_acr(server: str) -> bool:
    return server.split("/")[0].endswith(ACR_SUFFIXES)


class AzureConnector(Connector):
    """An Azure identity and/or storage account. Secret fields take references (env:, file:, airflow:, prefect:)."""

    type: str = "azure"
    auth: AzureAuth

    tenant_id: Optional[str] = None
    client_id: Optional[str] = None
    subscription_id: Optional[str] = None
    account_name: Optional[str] = None
    account_key: refs.Reference = None
    connection_string: refs.Reference = None
    blob_endpoint: Optional[str] = None
    authority_host: Optional[str] = None


    @field_validator("authority_host", "blob_endpoint")
    @classmethod
    def _urls(cls, value: Optional[str], info) -> Optional[str]:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError(f"{info.field_name} is a URL (https://...); got {value!r}")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _storage_fields(self) -> "AzureConnector":
        if self.account_key and self.connection_string:
            raise ValueError("give account_key (with account_name) or connection_string, not both")
        if self.account_key and not self.account_name:
            raise ValueError("account_key needs account_name (the storage account it is the key of)")
        return self

    # -- credentials -------------------------------------------------------------

    def _hint(self, exc: BaseException, text: str) -> str:
        kind = type(exc).__name__
        if kind == "ClientAuthenticationError" or "AADSTS" in text:
            return self.auth.refused_hint()
        if "AuthorizationPermissionMismatch" in text or "AuthorizationFailure" in text or "403" in text:
            return "the identity lacks a role on the storage account (Storage Blob Data Contributor; Storage Blob Delegator for a user delegation SAS)"
        if kind in ("ServiceRequestError", "ServiceRequestTimeoutError"):
            return "the endpoint cannot be reached from here: check the network, blob_endpoint and authority_host"
        return "check the connector's settings and the identity's permissions"

    def _call(self, what: str, fn, *args, **kwargs):
        return sdk_call(self.label, what, self._hint, fn, *args, **kwargs)

    def authority(self) -> dict[str, Any]:
        # A host of one's own (a test's, a private one) has no instance discovery behind it.
        return {"authority": self.authority_host, "disable_instance_discovery": True} if self.authority_host else {}

    def token_credential(self, asynchronous: bool = False):
        """The method's azure-core TokenCredential. The sync one is cached per connector (it caches its
        tokens); an async one is made per call, since its user (adlfs) closes it with its file system."""
        if asynchronous:
            return self.auth.credential(self, True)
        return CREDENTIALS.fetch("azure", self, lambda: self.auth.credential(self, False))

    def token(self, scope: str):
        token = self._call(f"getting a token for {scope}", self.token_credential().get_token, scope)
        redact.register(token.token)
        return token

    def _storage(self, url: Optional[str] = None, endpoint: Optional[str] = None) -> _Storage:
        data = self.auth.credential_set(self)
        connection = None
        if self.connection_string:
            connection = refs.resolve(self.connection_string, f"{self.where}.connection_string")
        elif data.get("connection_string"):
            connection = str(data["connection_string"])
        elif not self.account_name:
            connection = self.auth.ambient_connection_string(self)
        parts = parse_connection_string(connection) if connection else {}
        account = self.account_name or data.get("account_name") or parts.get("AccountName") or (container_of(url)[1] if url else None)
        key = refs.resolve(self.account_key, f"{self.where}.account_key") if self.account_key else data.get("account_key") or parts.get("AccountKey")
        endpoint = endpoint or self.blob_endpoint or parts.get("BlobEndpoint")
        if not endpoint and account:
            endpoint = f"https://{account}.blob.{parts.get('EndpointSuffix', 'core.windows.net')}"
        sas = parts.get("SharedAccessSignature")
        redact.register(connection, key, sas)
        return _Storage(account, endpoint.rstrip("/") if endpoint else None, key, connection, sas)

    def _has_storage(self) -> bool:
        return bool(self.account_name or self.connection_string) or self.auth.has_storage(self)

    def _blob_service(self, storage: _Storage):
        blob = require("azure.storage.blob", "azure", self.label)
        if storage.connection_string and storage.endpoint == parse_connection_string(storage.connection_string).get("BlobEndpoint", storage.endpoint):
            return blob.BlobServiceClient.from_connection_string(storage.connection_string)
        if not storage.endpoint:
            raise ConnectorError(f"{self.label} names no storage account: set account_name (or connection_string)")
        if storage.key:
            return blob.BlobServiceClient(storage.endpoint, credential={"account_name": storage.account, "account_key": storage.key})
        if storage.sas:
            return blob.BlobServiceClient(storage.endpoint, credential=storage.sas)
        return blob.BlobServiceClient(storage.endpoint, credential=self.token_credential())

    # -- the interface ------------------------------------------------------------

    def identity(self) -> str:
        said = []
        storage = self._storage() if self._has_storage() else None
        who = self.auth.identity(self, with_storage=storage is not None)
        if who:
            said.append(who)
        if storage is not None:
            service = self._blob_service(storage)
            names = self._call(f"listing the containers of storage account {storage.account}", lambda: [c.name for c in service.list_containers()])
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            said.append(f"storage account {storage.account} at {storage.endpoint}: {len(names)} container(s){' (' + shown + ')' if names else ''}")
        if self.subscription_id:
            said.append(f"subscription {self.subscription_id}")
        return "; ".join(said)

    def skypilot_env(self, private_dir: Path) -> dict[str, str]:
        """What SkyPilot's process can take from this connector: AZURE_* variables. Nothing is written.

        SkyPilot's Azure goes through the az CLI: `sky check` wants ~/.azure/msal_token_cache.json
        and the CLI's subscription, so a service principal must also be logged in there
        (`az login --service-principal`); the variables below serve DefaultAzureCredential
        (EnvironmentCredential) in SkyPilot's provisioner and in the az CLI's own SDK calls, and
        AZURE_SUBSCRIPTION_ID names the subscription. A bare access-token has no place in either.
        skyvm never writes ~/.azure.
        """
        env: dict[str, str] = {}
        if self.subscription_id:
            env["AZURE_SUBSCRIPTION_ID"] = self.subscription_id
        env.update(self.auth.skypilot_env(self, Path(private_dir)))
        return env

    def fs_options(self, url: str, endpoint: Optional[str] = None) -> dict[str, Any]:
        """adlfs storage options: a connection string with a key or SAS, else the account and the method's credential."""
        storage = self._storage(url, endpoint)
        if storage.key or (storage.sas and self.auth.USES_GIVEN_SAS):
            if storage.connection_string and not endpoint:
                return {"connection_string": storage.connection_string}
            return {"connection_string": self._connection_string(storage, storage.sas)}
        if not storage.account:
            raise ConnectorError(f"{self.label} cannot open {url}: it names no storage account; set account_name or connection_string (or AZURE_STORAGE_CONNECTION_STRING)")
        options: dict[str, Any] = {"account_name": storage.account}
        if storage.endpoint and storage.endpoint != f"https://{storage.account}.blob.core.windows.net":
            # adlfs reaches https://{account_host}: a path-style endpoint (Azurite's) keeps its path.
            options["account_host"] = storage.endpoint.split("://", 1)[1]
        options.update(self.auth.fs_credential(self))
        return options

    @staticmethod
    def _connection_string(storage: _Storage, sas: Optional[str] = None) -> str:
        if sas:
            return f"BlobEndpoint={storage.endpoint};SharedAccessSignature={sas}"
        scheme = urlparse(storage.endpoint or "https://").scheme or "https"
        text = f"DefaultEndpointsProtocol={scheme};AccountName={storage.account};AccountKey={storage.key};BlobEndpoint={storage.endpoint};"
        redact.register(text)
        return text

    def node_store_access(self, url: str, *, node: str, ttl_s: int = DEFAULT_NODE_TTL_S, endpoint: Optional[str] = None) -> NodeAccess:
        """A SAS for the one container, ending with the node's ttl; never the account key."""
        blob = require("azure.storage.blob", "azure", self.label)
        container, _, _prefix = container_of(url)
        storage = self._storage(url, endpoint)
        if not storage.account or not storage.endpoint:
            raise ConnectorError(f"{self.label} cannot give node {node!r} access to {url}: it names no storage account; set account_name or connection_string")
        now = datetime.datetime.now(datetime.timezone.utc)
        start = now - datetime.timedelta(minutes=5)  # clock skew between here and the storage service
        permission = blob.ContainerSasPermissions(read=True, add=True, create=True, write=True, delete=True, list=True)
        if storage.key:
            expiry = now + datetime.timedelta(seconds=int(ttl_s))
            sas = blob.generate_container_sas(storage.account, container, account_key=storage.key, permission=permission, expiry=expiry, start=start)
            kind = "container SAS"
        elif storage.sas and self.auth.USES_GIVEN_SAS:
            # Only a SAS was given: it cannot sign another. Passed on, bounded by its own expiry; said so.
            secret = self._connection_string(storage, storage.sas)
            se = parse_qs(storage.sas.lstrip("?")).get("se", [None])[0]
            expires = datetime.datetime.fromisoformat(se.replace("Z", "+00:00")).timestamp() if se else None
            return NodeAccess(
                secrets={"AZURE_STORAGE_CONNECTION_STRING": secret}, expires_at=expires, scope=f"the connection string's own SAS, until {until(expires)} (not narrowed to {container})"
            )
        else:
            expiry = now + datetime.timedelta(seconds=min(int(ttl_s), MAX_DELEGATION_S))
            service = self._blob_service(storage)
            key = self._call(f"getting a user delegation key for node {node!r}", service.get_user_delegation_key, start, expiry)
            sas = blob.generate_container_sas(storage.account, container, user_delegation_key=key, permission=permission, expiry=expiry, start=start)
            kind = "user delegation SAS"
        secret = self._connection_string(storage, sas)
        redact.register(sas, secret)
        expires = expiry.timestamp()
        return NodeAccess(
            secrets={"AZURE_STORAGE_CONNECTION_STRING": secret},
            expires_at=expires,
            scope=f"az://{container} ({kind}: read, write, delete, list until {until(expires)}; the whole container)",
        )

    def registry_credentials(self, server: str) -> tuple[str, str]:
        """ACR: a service principal logs in with its id and secret; a token is exchanged for an ACR refresh token."""
        if not is_acr(server):
            raise ConnectorError(f"{self.label} logs in to Azure Container Registry (*.azurecr.io) only, not {server}: use registry.username and registry.password")
        return self.auth.registry_login(self, server.split("/")[0])
