"""Google Cloud through google-auth: implicit, service-account, user-account, oauth2-token, impersonation.

    implicit         Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud's ADC
                     file, the metadata server)
    service-account  a key JSON: ``service_account_json`` (a reference), or ``credentials:``
                     an Airflow google_cloud_platform connection / a prefect-gcp gcp-credentials block
                     (service_account_info, service_account_file, project)
    user-account     an authorized_user JSON with a refresh token: ``user_account_json``
    oauth2-token     a bare access token: ``token``. It cannot be refreshed: once it expires every
                     call fails, and the errors say so
    impersonation    ``target_principal`` (a service account's email), its tokens minted through the
                     IAM Credentials API from ``service_account_json``/``credentials`` or, with
                     neither, from ADC; ``delegates`` for a delegation chain

Access tokens are cached per connector and refreshed the refresh margin (``base.refresh_margin_s``) before
they expire. A node gets an access token narrowed by a Credential Access
Boundary to the payload store's bucket and prefix (an STS token exchange), so
the launcher's key never leaves it; with a storage emulator (``endpoint_url``,
STORAGE_EMULATOR_HOST) the node gets no token at all, since an emulator takes
anonymous requests and has no STS.

The token endpoints come from the key files (``token_uri``), and ``sts_endpoint``,
``iam_endpoint`` and ``tokeninfo_endpoint`` replace Google's (Private Service
Connect, or a test's server on loopback).

Each auth method is a strategy in :mod:`skyvm.connectors.gcp_methods`; this module holds the
connector: the fields every method takes, the credentials cache, the node's downscoped token and
the interface.

May import: google-auth (through ``require``), skyvm.redact, skyvm.clouds and skyvm.connectors'
base, common and gcp_methods.
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Any, Optional, Union
from urllib.parse import quote, urlparse

from pydantic import Field, field_validator

from skyvm import clouds, redact
from skyvm.connectors.base import CREDENTIALS, DEFAULT_NODE_TTL_S, Connector, ConnectorError, NodeAccess, require
from skyvm.connectors.common import http_json, sdk_call, until
from skyvm.connectors.gcp_methods import (
    CLOUD_PLATFORM,
    GOOGLE_TOKEN_URI,
    Auth,
    Implicit,
    Impersonation,
    OAuth2Token,
    ServiceAccount,
    UserAccount,
    expiry_ts,
)

__all__ = ["GcpConnector", "CLOUD_PLATFORM", "GOOGLE_TOKEN_URI", "bucket_of", "access_boundary", "is_google_registry"]

STS_ENDPOINT = "https://sts.googleapis.com/v1/token"
TOKENINFO_ENDPOINT = "https://oauth2.googleapis.com/tokeninfo"
# gcsfs (2026.x, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT on by default) asks the gRPC Storage Control API
# for each bucket's layout, retrying for 60 s; an emulator has no such API: give up at once instead.
EMULATOR_GCSFS_OPTIONS = {"retry_timeout": 0.5, "retry_initial": 0.05, "retry_maximum": 0.1}
# The role a node's downscoped token is bounded by (read, write, delete and list objects).
NODE_ROLE = "inRole:roles/storage.objectAdmin"

GcpAuth = Annotated[Union[Implicit, ServiceAccount, UserAccount, OAuth2Token, Impersonation], Field(discriminator="method")]


def bucket_of(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if parsed.scheme not in clouds.schemes_of("gcp") or not parsed.netloc:
        raise ConnectorError(f"{url} is not a GCS URL (gs://BUCKET/PREFIX)")
    return parsed.netloc, parsed.path.strip("/")


def access_boundary(bucket: str, prefix: str) -> dict[str, Any]:
    """A Credential Access Boundary: objects under one prefix of one bucket (and listing that prefix)."""
    rule: dict[str, Any] = {"availablePermissions": [NODE_ROLE], "availableResource": f"//storage.googleapis.com/projects/_/buckets/{bucket}"}
    if prefix:
        p = prefix.replace("\\", "\\\\").replace("'", "\\'")
        rule["availabilityCondition"] = {
            "title": "skyvm payload prefix",
            "expression": (
                f"resource.name.startsWith('projects/_/buckets/{bucket}/objects/{p}/') || "
                f"api.getAttribute('storage.googleapis.com/objectListPrefix', '').startsWith('{p}/')"
            ),
        }
    return {"accessBoundary": {"accessBoundaryRules": [rule]}}


def is_google_registry(server: str) -> bool:
    host = server.split("/")[0]
    return host == "gcr.io" or host.endswith((".gcr.io", "-docker.pkg.dev"))


class GcpConnector(Connector):
    """A Google Cloud identity. Secret fields take references (env:, file:, airflow:, prefect:)."""

    type: str = "gcp"
    auth: GcpAuth

    project: Optional[str] = None
    # Default: cloud-platform (user-account: the scopes the refresh token was granted).
    scopes: Optional[list[str]] = None
    # A GCS emulator (fake-gcs-server, gcp-storage-emulator): anonymous, no token minted.
    endpoint_url: Optional[str] = None
    # impersonation: how long a minted token lives
    lifetime_s: int = Field(default=3600, ge=60, le=43200)
    # A node's token narrowed to the store's bucket and prefix (Credential Access Boundary).
    downscope: bool = True
    sts_endpoint: Optional[str] = None
    iam_endpoint: Optional[str] = None
    tokeninfo_endpoint: Optional[str] = None

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        if value is not None and (not value or any(not s.startswith("https://") for s in value)):
            raise ValueError(f"scopes are OAuth scope URLs (e.g. {CLOUD_PLATFORM}); got {value!r}")
        return value

    # -- credentials -------------------------------------------------------------

    def scope_list(self) -> list[str]:
        return list(self.scopes or [CLOUD_PLATFORM])

    def _hint(self, exc: BaseException, text: str) -> str:
        kind = type(exc).__name__
        if kind == "DefaultCredentialsError":
            return "no application default credentials here: run `gcloud auth application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, or define a connector with method service-account"
        if kind == "TransportError":
            return "Google's token endpoint cannot be reached from here: check the network, a proxy, or the key file's token_uri"
        said = self.auth.hint()
        if said:
            return said
        if "invalid_grant" in text or "account not found" in text.lower():
            return "the key was refused (deleted, disabled, or of another project): create a new key for the service account"
        return "check the connector's credentials and the account's permissions"

    def call(self, what: str, fn, *args, **kwargs):
        return sdk_call(self.label, what, self._hint, fn, *args, **kwargs)

    def default_credentials(self, scopes: list[str]):
        google_auth = require("google.auth", "gcp", self.label)
        return self.call("finding application default credentials", google_auth.default, scopes=scopes)

    def auth_now(self) -> Auth:
        """The connector's credentials holding a token valid for the refresh margin more (built once, cached)."""
        with CREDENTIALS.lock:
            auth = CREDENTIALS.fetch("gcp", self, lambda: self.auth.build(self))
            self.auth.keep_fresh(self, auth)
            return auth

    def credentials_now(self):
        """google-auth credentials with a fresh token (what gcsfs and google-cloud clients take)."""
        return self.auth_now().creds

    def project_of(self, auth: Optional[Auth] = None) -> Optional[str]:
        found = auth.project if auth is not None else None
        return self.project or found or os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("CLOUDSDK_CORE_PROJECT")

    @staticmethod
    def project_env(project: Optional[str]) -> dict[str, str]:
        return {"GOOGLE_CLOUD_PROJECT": project, "CLOUDSDK_CORE_PROJECT": project} if project else {}

    def tokeninfo(self, token: str) -> dict[str, Any]:
        url = f"{self.tokeninfo_endpoint or TOKENINFO_ENDPOINT}?access_token={quote(token)}"
        return http_json(url, label=self.label, what="tokeninfo", hint=self.auth.REFUSED)

    def _emulator(self, endpoint: Optional[str]) -> Optional[str]:
        return endpoint or self.endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST") or None

    # -- the interface ------------------------------------------------------------

    def identity(self) -> str:
        auth = self.auth_now()
        return self.auth.identity(self, auth, self.project_of(auth) or "no project set")

    def fs_options(self, url: str, endpoint: Optional[str] = None) -> dict[str, Any]:
        """gcsfs storage options: the credentials object and project; an emulator is reached anonymously."""
        emulator = self._emulator(endpoint)
        if emulator:
            options: dict[str, Any] = {"token": "anon", "endpoint_url": emulator if "://" in emulator else f"http://{emulator}", **EMULATOR_GCSFS_OPTIONS}
            if self.project:
                options["project"] = self.project
            return options
        auth = self.auth_now()
        options = {"token": auth.creds}
        project = self.project_of(auth)
        if project:
            options["project"] = project
        return options

    def node_store_access(self, url: str, *, node: str, ttl_s: int = DEFAULT_NODE_TTL_S, endpoint: Optional[str] = None) -> NodeAccess:
        """A node's access token, narrowed to the bucket and prefix; it lives as long as the source token (at most an hour).

        The node's ``ttl_s`` cannot lengthen a GCS access token: ``expires_at`` says when it ends,
        and the launcher mints another for a node that outlives it.
        """
        bucket, prefix = bucket_of(url)
        where = f"gs://{bucket}/{prefix}".rstrip("/")
        envs: dict[str, str] = {}
        emulator = self._emulator(endpoint)
        if emulator:
            if self.project:
                envs["SKYVM_GCS_PROJECT"] = self.project
            envs["STORAGE_EMULATOR_HOST"] = emulator
            return NodeAccess(envs=envs, scope=f"{where} on the storage emulator at {emulator} (anonymous: no token)")
        auth = self.auth_now()
        project = self.project_of(auth)
        if project:
            envs["SKYVM_GCS_PROJECT"] = project
        if self.downscope:
            token, expires = self._downscoped(auth.creds, bucket, prefix, node)
            scope = f"{where}/* (downscoped access token until {until(expires)})"
        else:
            token, expires = auth.creds.token, expiry_ts(auth.creds) or auth.expires_at
            scope = f"gs://{bucket} (the connector's own access token, not narrowed, until {until(expires)})"
        redact.register(token)
        return NodeAccess(envs=envs, secrets={"SKYVM_GCS_TOKEN": token}, expires_at=expires, scope=scope)

    def _downscoped(self, creds: Any, bucket: str, prefix: str, node: str) -> tuple[str, Optional[float]]:
        """Exchange the connector's token for one bounded by ``access_boundary`` (what google.auth.downscoped does)."""
        sts = require("google.oauth2.sts", "gcp", self.label)
        requests_transport = require("google.auth.transport.requests", "gcp", self.label)
        client = sts.Client(self.sts_endpoint or STS_ENDPOINT)
        answer = self.call(
            f"downscoping a token to gs://{bucket}/{prefix} for node {node!r} (STS token exchange)",
            client.exchange_token,
            request=requests_transport.Request(),
            grant_type="urn:ietf:params:oauth:grant-type:token-exchange",
            subject_token=creds.token,
            subject_token_type="urn:ietf:params:oauth:token-type:access_token",
            requested_token_type="urn:ietf:params:oauth:token-type:access_token",
            additional_options=access_boundary(bucket, prefix),
        )
        token = answer.get("access_token")
        if not token:
            raise ConnectorError(f"{self.label}: the STS token exchange for node {node!r} answered no access_token; check sts_endpoint")
        expires = time.time() + int(answer["expires_in"]) if answer.get("expires_in") else expiry_ts(creds)
        return token, expires

    def registry_credentials(self, server: str) -> tuple[str, str]:
        """Artifact Registry / Container Registry: the user ``oauth2accesstoken`` and a fresh access token."""
        if not is_google_registry(server):
            raise ConnectorError(f"{self.label} logs in to Artifact Registry (*-docker.pkg.dev) and gcr.io only, not {server}: use registry.username and registry.password")
        return "oauth2accesstoken", self.auth_now().creds.token
