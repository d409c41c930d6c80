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
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional
from urllib.parse import parse_qs, urlparse

from pydantic import field_validator, model_validator

from skyvm import redact
from skyvm.connectors import refs
from skyvm.connectors.base import DEFAULT_NODE_TTL_S, Connector, ConnectorError, NodeAccess, require
from skyvm.connectors.common import check_method_fields, http_json, jwt_claims, references, sdk_call, until

MANAGEMENT_SCOPE = "https://management.azure.com/.default"
# The username ACR takes with a refresh token from its /oauth2/exchange.
ACR_TOKEN_USER = "00000000-0000-0000-0000-000000000000"
ACR_SUFFIXES = (".azurecr.io", ".azurecr.cn", ".azurecr.us")
# A user delegation key lives at most seven days.
MAX_DELEGATION_S = 7 * 24 * 3600

_NEEDS = {
    "service-principal": [
        (("client_secret", "credentials"), "client_secret (a reference) with tenant_id and client_id, or credentials: airflow:CONN_ID / prefect:BLOCK-TYPE/NAME"),
    ],
    "access-token": [(("token",), "token (a reference to a Microsoft Entra access token, e.g. env:AZURE_ACCESS_TOKEN)")],
}
_OWNERS = {
    "client_secret": ("service-principal",),
    "credentials": ("service-principal",),
    "token": ("access-token",),
}


@dataclass
class _Storage:
    """Where a storage account is and what opens it (resolved values: never dumped)."""

    account: Optional[str]
    endpoint: Optional[str]
    key: Optional[str] = None
    connection_string: Optional[str] = None
    sas: Optional[str] = None


_credentials: dict[str, Any] = {}
_credentials_lock = threading.Lock()


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
    if parsed.scheme not in ("az", "abfs", "abfss") or not parsed.netloc:
        raise ConnectorError(f"{url} is not an Azure Blob URL (az://CONTAINER/PREFIX)")
    container, _, host = parsed.netloc.partition("@")
    return container, (host.split(".")[0] or None) if host else None, parsed.path.strip("/")


def is_acr(server: str) -> bool:
    return server.split("/")[0].endswith(ACR_SUFFIXES)


def acr_refresh_token(registry_url: str, service: str, aad_token: str, tenant: Optional[str], label: str) -> str:
    """Exchange a Microsoft Entra access token for an ACR refresh token (what `az acr login --expose-token` does)."""
    form = {"grant_type": "access_token", "service": service, "access_token": aad_token}
    if tenant:
        form["tenant"] = tenant
    answer = http_json(
        f"{registry_url.rstrip('/')}/oauth2/exchange",
        label=label,
        what=f"the ACR token exchange at {service}",
        hint="the token's identity needs AcrPull on the registry, and the token an audience ACR accepts (https://management.azure.com or https://containerregistry.azure.net)",
        form=form,
    )
    token = answer.get("refresh_token")
    if not token:
        raise ConnectorError(f"{label}: the ACR token exchange at {service} answered no refresh_token")
    redact.register(token)
    return token


class _StaticToken:
    """A TokenCredential of one bare access token: no refresh; an expired token is refused with the fix."""

    def __init__(self, token: str, label: str):
        self.token, self.label = token, label
        claims = jwt_claims(token)
        self.claims = claims
        self.expires_on = int(claims["exp"]) if isinstance(claims.get("exp"), (int, float)) else None

    def _check(self):
        from azure.core.credentials import AccessToken

        if self.expires_on is not None and self.expires_on <= time.time():
            raise ConnectorError(
                f"{self.label}: its access token expired at {until(self.expires_on)}, and method access-token cannot refresh one: "
                "get a new one (az account get-access-token --resource https://storage.azure.com) or use method service-principal"
            )
        # Unknown expiry (an opaque token): said to be good for an hour, so SDKs do not ask again at once.
        return AccessToken(self.token, self.expires_on or int(time.time()) + 3600)

    def get_token(self, *scopes: str, **kwargs: Any):
        return self._check()

    def close(self) -> None:
        pass


class _AsyncStaticToken(_StaticToken):
    """The same for async clients (adlfs opens its file system with azure.storage.blob.aio)."""

    async def get_token(self, *scopes: str, **kwargs: Any):  # type: ignore[override]
        return self._check()

    async def close(self) -> None:  # type: ignore[override]
        pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: Any) -> None:
        pass


class AzureConnector(Connector):
    """An Azure identity and/or storage account. Secret fields take references (env:, file:, airflow:, prefect:)."""

    type: str = "azure"
    METHODS: ClassVar[tuple[str, ...]] = ("implicit", "service-principal", "access-token")
    STORE_SCHEMES: ClassVar[tuple[str, ...]] = ("az", "abfs")

    tenant_id: Optional[str] = None
    client_id: Optional[str] = None
    client_secret: Optional[str] = None
    credentials: Optional[str] = None
    token: Optional[str] = None
    subscription_id: Optional[str] = None
    account_name: Optional[str] = None
    account_key: Optional[str] = None
    connection_string: Optional[str] = None
    blob_endpoint: Optional[str] = None
    authority_host: Optional[str] = None

    _references = references("client_secret", "credentials", "token", "account_key", "connection_string")

    @field_validator("authority_host", "blob_endpoint")
    @classmethod
    def _urls(cls, value: Optional[str], info) -> Optional[str]:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError(f"{info.field_name} is a URL (https://...); got {value!r}")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _method_fields(self) -> "AzureConnector":
        check_method_fields(self.method, self.__dict__, _NEEDS, _OWNERS)
        if self.method == "service-principal" and self.client_secret and not (self.tenant_id and self.client_id):
            raise ValueError("method service-principal needs tenant_id and client_id beside client_secret")
        if self.account_key and self.connection_string:
            raise ValueError("give account_key (with account_name) or connection_string, not both")
        if self.account_key and not self.account_name:
            raise ValueError("account_key needs account_name (the storage account it is the key of)")
        return self

    # -- credentials -------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"connectors.{self.name or 'azure'}"

    def _hint(self, exc: BaseException, text: str) -> str:
        kind = type(exc).__name__
        if kind == "ClientAuthenticationError" or "AADSTS" in text:
            if self.method == "service-principal":
                return "check tenant_id, client_id and the client secret (secrets expire: create a new one with `az ad sp credential reset`)"
            if self.method == "access-token":
                return "the access token was refused (expired, or for another audience); method access-token cannot refresh it"
            return "no Azure credentials found here: run `az login`, set AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET, or define a connector with method service-principal"
        if "AuthorizationPermissionMismatch" in text or "AuthorizationFailure" in text or "403" in text:
            return "the identity lacks a role on the storage account (Storage Blob Data Contributor; Storage Blob Delegator for a user delegation SAS)"
        if kind in ("ServiceRequestError", "ServiceRequestTimeoutError"):
            return "the endpoint cannot be reached from here: check the network, blob_endpoint and authority_host"
        return "check the connector's settings and the identity's permissions"

    def _call(self, what: str, fn, *args, **kwargs):
        return sdk_call(self.label, what, self._hint, fn, *args, **kwargs)

    def _credential_set(self) -> dict[str, Any]:
        if not self.credentials:
            return {}
        data = refs.resolve_credential_set(self.credentials, "azure", f"{self._where}.credentials")
        # A prefect-azure blob storage block names its endpoint account_url.
        if data.get("account_url") and not data.get("account_name"):
            data["account_name"] = urlparse(str(data["account_url"])).netloc.split(".")[0]
        return data

    def _principal(self) -> tuple[str, str, str]:
        """(tenant_id, client_id, client_secret) of a service principal."""
        data = self._credential_set()
        tenant = self.tenant_id or data.get("tenant_id")
        client = self.client_id or data.get("client_id")
        if self.client_secret:
            secret = refs.resolve(self.client_secret, f"{self._where}.client_secret")
        else:
            secret = data.get("client_secret")
        missing = [n for n, v in (("tenant_id", tenant), ("client_id", client), ("client_secret", secret)) if not v]
        if missing:
            raise refs.SecretReferenceError(f"{self._where}.credentials", str(self.credentials), f"holds no {', '.join(missing)}; set them on the connector or in the connection")
        return str(tenant), str(client), str(secret)

    def _authority(self) -> dict[str, Any]:
        # A host of one's own (a test's, a private one) has no instance discovery behind it.
        return {"authority": self.authority_host, "disable_instance_discovery": True} if self.authority_host else {}

    def token_credential(self, asynchronous: bool = False):
        """The method's azure-core TokenCredential. The sync one is cached per connector (it caches its
        tokens); an async one is made per call, since its user (adlfs) closes it with its file system."""
        key = self.fingerprint()
        with _credentials_lock:
            if not asynchronous and key in _credentials:
                return _credentials[key]
            if self.method == "access-token":
                cred: Any = (_AsyncStaticToken if asynchronous else _StaticToken)(refs.resolve(self.token, f"{self._where}.token"), self.label)
            else:
                identity = require("azure.identity.aio" if asynchronous else "azure.identity", "azure", self.label)
                if self.method == "service-principal":
                    tenant, client, secret = self._principal()
                    cred = identity.ClientSecretCredential(tenant, client, secret, **self._authority())
                else:
                    cred = identity.DefaultAzureCredential(exclude_interactive_browser_credential=True, **self._authority())
            if not asynchronous:
                _credentials[key] = cred
            return cred

    def _token(self, scope: str):
        token = self._call(f"getting a token for {scope}", self.token_credential().get_token, scope)
        redact.register(token.token)
        return token

    def _storage(self, url: Optional[str] = None, endpoint: Optional[str] = None) -> _Storage:
        data = self._credential_set()
        connection = None
        if self.connection_string:
            connection = refs.resolve(self.connection_string, f"{self._where}.connection_string")
        elif data.get("connection_string"):
            connection = str(data["connection_string"])
        elif self.method == "implicit" and not self.account_name and os.environ.get("AZURE_STORAGE_CONNECTION_STRING"):
            connection = os.environ["AZURE_STORAGE_CONNECTION_STRING"]
        parts = parse_connection_string(connection) if connection else {}
        account = self.account_name or data.get("account_name") or parts.get("AccountName") or (container_of(url)[1] if url else None)
        key = refs.resolve(self.account_key, f"{self._where}.account_key") if self.account_key else data.get("account_key") or parts.get("AccountKey")
        endpoint = endpoint or self.blob_endpoint or parts.get("BlobEndpoint")
        if not endpoint and account:
            endpoint = f"https://{account}.blob.{parts.get('EndpointSuffix', 'core.windows.net')}"
        sas = parts.get("SharedAccessSignature")
        redact.register(connection, key, sas)
        return _Storage(account, endpoint.rstrip("/") if endpoint else None, key, connection, sas)

    def _has_storage(self) -> bool:
        if self.account_name or self.connection_string:
            return True
        if self.method == "implicit":
            return bool(os.environ.get("AZURE_STORAGE_CONNECTION_STRING"))
        data = self._credential_set()
        return bool(data.get("connection_string") or data.get("account_name"))

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
        if self.method == "access-token":
            cred = self.token_credential()
            cred.get_token()  # refuses an expired token
            said.append(_describe(cred.claims, cred.expires_on) + ", a bare token that cannot be refreshed")
        elif self.method == "service-principal" or storage is None:
            token = self._token(MANAGEMENT_SCOPE)
            said.append(_describe(jwt_claims(token.token), token.expires_on))
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
        if self.method == "service-principal":
            tenant, client, secret = self._principal()
            env.update(AZURE_TENANT_ID=tenant, AZURE_CLIENT_ID=client, AZURE_CLIENT_SECRET=secret)
            if self.authority_host:
                env["AZURE_AUTHORITY_HOST"] = self.authority_host
        return env

    def fs_options(self, url: str, endpoint: Optional[str] = None) -> dict[str, Any]:
        """adlfs storage options: a connection string with a key or SAS, else the account and the method's credential."""
        storage = self._storage(url, endpoint)
        if storage.key or (storage.sas and self.method == "implicit"):
            if storage.connection_string and not endpoint:
                return {"connection_string": storage.connection_string}
            return {"connection_string": self._connection_string(storage, storage.sas)}
        if not storage.account:
            raise ConnectorError(f"{self.label} cannot open {url}: it names no storage account; set account_name or connection_string (or AZURE_STORAGE_CONNECTION_STRING)")
        options: dict[str, Any] = {"account_name": storage.account}
        if storage.endpoint and storage.endpoint != f"https://{storage.account}.blob.core.windows.net":
            # adlfs reaches https://{account_host}: a path-style endpoint (Azurite's) keeps its path.
            options["account_host"] = storage.endpoint.split("://", 1)[1]
        if self.method == "implicit":
            options["anon"] = False  # adlfs then makes its own DefaultAzureCredential
        else:
            options["credential"] = self.token_credential(asynchronous=True)
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
        elif storage.sas and self.method == "implicit":
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
        if self.method == "service-principal":
            _, client, secret = self._principal()
            return client, secret
        if self.method == "access-token":
            cred = self.token_credential()
            aad, tenant = cred.get_token().token, cred.claims.get("tid")
        else:
            token = self._token(MANAGEMENT_SCOPE)
            aad, tenant = token.token, jwt_claims(token.token).get("tid")
        host = server.split("/")[0]
        return ACR_TOKEN_USER, acr_refresh_token(f"https://{host}", host, aad, tenant, self.label)


def _describe(claims: dict[str, Any], expires_on: Optional[float]) -> str:
    """Whose token this is, from its claims."""
    user = claims.get("upn") or claims.get("unique_name") or claims.get("preferred_username")
    app = claims.get("appid") or claims.get("azp")
    who = f"user {user}" if user else f"service principal {app}" if app else f"object {claims.get('oid', 'unknown')}"
    tenant = f" in tenant {claims['tid']}" if claims.get("tid") else ""
    audience = f" for {claims['aud']}" if claims.get("aud") else ""
    return f"{who}{tenant}: token{audience} valid until {until(expires_on)}"
