"""Azure's auth methods, one small strategy each: implicit, service-principal, access-token.

Each holds its own fields and checks, the azure-core TokenCredential it makes, what it says it is,
what it gives SkyPilot's process, how adlfs is given it, and how it logs in to ACR. The connector
(:mod:`skyvm.connectors.azure`) holds the shared fields (tenant, client id, storage account,
endpoints), the storage account's resolution, the node's SAS and the interface.

A method's operations take ``conn``, the AzureConnector that holds it (typed as the base
``Connector``: this module does not import the connector's, which imports it).

May import: azure-identity/azure-core (through ``require``), skyvm.redact and skyvm.connectors'
base, common and refs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlparse
from typing import Any, ClassVar, Literal, Optional



from skyvm import redact
from skyvm.connectors import refs
from skyvm.connectors.base import Connector, ConnectorError, Method, Needs, require
from skyvm.connectors.common import http_json, jwt_claims, until

MANAGEMENT_SCOPE = "https://management.azure.com/.default"
# The username ACR takes with a refresh token from its /oauth2/exchange.
ACR_TOKEN_USER = "00000000-0000-0000-0000-000000000000"


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


def describe(claims: dict[str, Any], expires_on: Optional[float]) -> str:
    """Whose token this is, from its claims."""
    user = claims.get("upn") or claims.get("unique_name") or claims.get("preferred_username")
    app = claims.get("appid") or claims.get("azp")
    who = f"user {user}" if user else f"service principal {app}" if app else f"object {claims.get('oid', 'unknown')}"
    tenant = f" in tenant {claims['tid']}" if claims.get("tid") else ""
    audience = f" for {claims['aud']}" if claims.get("aud") else ""
    return f"{who}{tenant}: token{audience} valid until {until(expires_on)}"


class AzureMethod(Method):
    """What every Azure method answers; the defaults are implicit's (DefaultAzureCredential)."""

    # Whether a connection string holding only a SAS is used as given (it cannot sign another).
    USES_GIVEN_SAS: ClassVar[bool] = False

    def credential(self, conn: Connector, asynchronous: bool):
        identity = require("azure.identity.aio" if asynchronous else "azure.identity", "azure", conn.label)
        return identity.DefaultAzureCredential(exclude_interactive_browser_credential=True, **conn.authority())

    def refused_hint(self) -> str:
        """The fix when Entra refuses this method's credentials."""
        return "no Azure credentials found here: run `az login`, set AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET, or define a connector with method service-principal"

    def credential_set(self, conn: Connector) -> dict[str, Any]:
        """The engine's credential set the settings point at ({}: none)."""
        return {}

    def ambient_connection_string(self, conn: Connector) -> Optional[str]:
        """A connection string from the environment, when the settings name no storage."""
        return None

    def has_storage(self, conn: Connector) -> bool:
        data = self.credential_set(conn)
        return bool(data.get("connection_string") or data.get("account_name"))

    def identity(self, conn: Connector, with_storage: bool) -> Optional[str]:
        """Whose token this is (None: the storage account says enough)."""
        if with_storage:
            return None
        token = conn.token(MANAGEMENT_SCOPE)
        return describe(jwt_claims(token.token), token.expires_on)

    def fs_credential(self, conn: Connector) -> dict[str, Any]:
        """How adlfs authenticates without a key: the method's credential (async, as adlfs uses it)."""
        return {"credential": conn.token_credential(asynchronous=True)}

    def entra_token(self, conn: Connector) -> tuple[str, Optional[str]]:
        """A Microsoft Entra access token and its tenant (to exchange for an ACR one)."""
        token = conn.token(MANAGEMENT_SCOPE)
        return token.token, jwt_claims(token.token).get("tid")

    def registry_login(self, conn: Connector, host: str) -> tuple[str, str]:
        aad, tenant = self.entra_token(conn)
        return ACR_TOKEN_USER, acr_refresh_token(f"https://{host}", host, aad, tenant, conn.label)


class Implicit(AzureMethod):
    method: Literal["implicit"] = "implicit"
    USES_GIVEN_SAS: ClassVar[bool] = True

    def ambient_connection_string(self, conn: Connector) -> Optional[str]:
        return os.environ.get("AZURE_STORAGE_CONNECTION_STRING") or None

    def has_storage(self, conn: Connector) -> bool:
        return bool(os.environ.get("AZURE_STORAGE_CONNECTION_STRING"))

    def fs_credential(self, conn: Connector) -> dict[str, Any]:
        return {"anon": False}  # adlfs then makes its own DefaultAzureCredential


class ServicePrincipal(AzureMethod):
    method: Literal["service-principal"] = "service-principal"

    client_secret: refs.Reference = None
    # A whole credential set: an Airflow azure/wasb connection or a Prefect block holding the principal.
    credentials: refs.Reference = None


    NEEDS: ClassVar[Needs] = ((("client_secret", "credentials"), "client_secret (a reference) with tenant_id and client_id, or credentials: airflow:CONN_ID / prefect:BLOCK-TYPE/NAME"),)

    def check(self, conn: Connector) -> None:
        if self.client_secret and not (conn.tenant_id and conn.client_id):
            raise ValueError("method service-principal needs tenant_id and client_id beside client_secret")

    def refused_hint(self) -> str:
        return "check tenant_id, client_id and the client secret (secrets expire: create a new one with `az ad sp credential reset`)"

    def credential_set(self, conn: Connector) -> dict[str, Any]:
        if not self.credentials:
            return {}
        data = refs.resolve_credential_set(self.credentials, "azure", f"{conn.where}.credentials")
        # A prefect-azure blob storage block names its endpoint account_url.
        if data.get("account_url") and not data.get("account_name"):
            data["account_name"] = urlparse(str(data["account_url"])).netloc.split(".")[0]
        return data

    def principal(self, conn: Connector) -> tuple[str, str, str]:
        """(tenant_id, client_id, client_secret)."""
        data = self.credential_set(conn)
        tenant = conn.tenant_id or data.get("tenant_id")
        client = conn.client_id or data.get("client_id")
        secret = refs.resolve(self.client_secret, f"{conn.where}.client_secret") if self.client_secret else data.get("client_secret")
        missing = [n for n, v in (("tenant_id", tenant), ("client_id", client), ("client_secret", secret)) if not v]
        if missing:
            raise refs.SecretReferenceError(f"{conn.where}.credentials", str(self.credentials), f"holds no {', '.join(missing)}; set them on the connector or in the connection")
        return str(tenant), str(client), str(secret)

    def credential(self, conn: Connector, asynchronous: bool):
        identity = require("azure.identity.aio" if asynchronous else "azure.identity", "azure", conn.label)
        tenant, client, secret = self.principal(conn)
        return identity.ClientSecretCredential(tenant, client, secret, **conn.authority())

    def identity(self, conn: Connector, with_storage: bool) -> Optional[str]:
        return super().identity(conn, with_storage=False)

    def skypilot_env(self, conn: Connector, private_dir: Path) -> dict[str, Optional[str]]:
        tenant, client, secret = self.principal(conn)
        env = {"AZURE_TENANT_ID": tenant, "AZURE_CLIENT_ID": client, "AZURE_CLIENT_SECRET": secret}
        if conn.authority_host:
            env["AZURE_AUTHORITY_HOST"] = conn.authority_host
        return env

    def registry_login(self, conn: Connector, host: str) -> tuple[str, str]:
        _, client, secret = self.principal(conn)
        return client, secret


class AccessToken(AzureMethod):
    """A bare Microsoft Entra access token: it cannot be refreshed; its audience decides what it reaches."""

    method: Literal["access-token"] = "access-token"

    token: refs.Reference = None


    NEEDS: ClassVar[Needs] = ((("token",), "token (a reference to a Microsoft Entra access token, e.g. env:AZURE_ACCESS_TOKEN)"),)

    def refused_hint(self) -> str:
        return "the access token was refused (expired, or for another audience); method access-token cannot refresh it"

    def credential(self, conn: Connector, asynchronous: bool):
        return (_AsyncStaticToken if asynchronous else _StaticToken)(refs.resolve(self.token, f"{conn.where}.token"), conn.label)

    def identity(self, conn: Connector, with_storage: bool) -> Optional[str]:
        cred = conn.token_credential()
        cred.get_token()  # refuses an expired token
        return describe(cred.claims, cred.expires_on) + ", a bare token that cannot be refreshed"

    def entra_token(self, conn: Connector) -> tuple[str, Optional[str]]:
        cred = conn.token_credential()
        return cred.get_token().token, cred.claims.get("tid")


class _StaticToken:
    """A TokenCredential of one bare access token: no refresh; an expired token is refused with the fix."""

    def __init__(self, token: str, label: str):
        self.token, self.label = token, label
        claims = jwt_claims(token)
        self.claims = claims
        self.expires_on = int(claims["exp"]) if isinstance(claims.get("exp"), (int, float)) else None

    def _check(self):
        from azure.core.credentials import AccessToken as CoreAccessToken

        if self.expires_on is not None and self.expires_on <= time.time():
            raise ConnectorError(
                f"{self.label}: its access token expired at {until(self.expires_on)}, and method access-token cannot refresh one: "
                "get a new one (az account get-access-token --resource https://storage.azure.com) or use method service-principal"
            )
        # Unknown expiry (an opaque token): said to be good for an hour, so SDKs do not ask again at once.
        return CoreAccessToken(self.token, self.expires_on or int(time.time()) + 3600)

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
