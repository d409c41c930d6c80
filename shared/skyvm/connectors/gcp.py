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
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional
from urllib.parse import quote, urlparse

from pydantic import Field, field_validator, model_validator

from skyvm import redact
from skyvm.connectors import refs
from skyvm.connectors.base import DEFAULT_NODE_TTL_S, Connector, ConnectorError, NodeAccess, refresh_margin_s, require
from skyvm.connectors.common import check_method_fields, http_json, parse_json_secret, references, register_key_file, sdk_call, until
from skyvm.connectors.files import write_private

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
STS_ENDPOINT = "https://sts.googleapis.com/v1/token"
IAM_ENDPOINT = "https://iamcredentials.googleapis.com"
TOKENINFO_ENDPOINT = "https://oauth2.googleapis.com/tokeninfo"
# gcsfs (2026.x, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT on by default) asks the gRPC Storage Control API
# for each bucket's layout, retrying for 60 s; an emulator has no such API: give up at once instead.
EMULATOR_GCSFS_OPTIONS = {"retry_timeout": 0.5, "retry_initial": 0.05, "retry_maximum": 0.1}
# The role a node's downscoped token is bounded by (read, write, delete and list objects).
NODE_ROLE = "inRole:roles/storage.objectAdmin"

_NEEDS = {
    "service-account": [(("service_account_json", "credentials"), "service_account_json (a reference to the key JSON, e.g. file:/secrets/sa.json) or credentials: airflow:CONN_ID / prefect:gcp-credentials/NAME")],
    "user-account": [(("user_account_json",), "user_account_json (a reference to an authorized_user JSON, e.g. file:~/.config/gcloud/application_default_credentials.json)")],
    "oauth2-token": [(("token",), "token (a reference to an access token, e.g. env:GOOGLE_OAUTH_ACCESS_TOKEN)")],
    "impersonation": [(("target_principal",), "target_principal (the email of the service account to impersonate)")],
}
_OWNERS = {
    "service_account_json": ("service-account", "impersonation"),
    "credentials": ("service-account", "impersonation"),
    "user_account_json": ("user-account",),
    "token": ("oauth2-token",),
    "target_principal": ("impersonation",),
    "delegates": ("impersonation",),
}


@dataclass
class _Auth:
    """The google-auth credentials of a connector, and what resolving them told."""

    creds: Any
    project: Optional[str] = None
    info: Optional[dict[str, Any]] = None  # the key file (service-account, user-account) or the source's (impersonation)
    email: Optional[str] = None
    expires_at: Optional[float] = None  # oauth2-token: when tokeninfo said it expires


_cache: dict[str, _Auth] = {}
_cache_lock = threading.Lock()


def _expiry_ts(creds: Any) -> Optional[float]:
    expiry = getattr(creds, "expiry", None)
    return None if expiry is None else expiry.replace(tzinfo=datetime.timezone.utc).timestamp()


def _stale(creds: Any) -> bool:
    expires = _expiry_ts(creds)
    return not getattr(creds, "token", None) or (expires is not None and expires - time.time() < refresh_margin_s())


def bucket_of(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if parsed.scheme not in ("gs", "gcs") or not parsed.netloc:
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
    METHODS: ClassVar[tuple[str, ...]] = ("implicit", "service-account", "user-account", "oauth2-token", "impersonation")
    STORE_SCHEMES: ClassVar[tuple[str, ...]] = ("gs", "gcs")

    project: Optional[str] = None
    # Default: cloud-platform (user-account: the scopes the refresh token was granted).
    scopes: Optional[list[str]] = None
    # A GCS emulator (fake-gcs-server, gcp-storage-emulator): anonymous, no token minted.
    endpoint_url: Optional[str] = None
    credentials: Optional[str] = None
    service_account_json: Optional[str] = None
    user_account_json: Optional[str] = None
    token: Optional[str] = None
    # impersonation
    target_principal: Optional[str] = None
    delegates: list[str] = Field(default_factory=list)
    lifetime_s: int = Field(default=3600, ge=60, le=43200)
    # A node's token narrowed to the store's bucket and prefix (Credential Access Boundary).
    downscope: bool = True
    sts_endpoint: Optional[str] = None
    iam_endpoint: Optional[str] = None
    tokeninfo_endpoint: Optional[str] = None

    _references = references("credentials", "service_account_json", "user_account_json", "token")

    @field_validator("target_principal", "delegates")
    @classmethod
    def _emails(cls, value: Any, info) -> Any:
        for email in [value] if isinstance(value, str) else value or []:
            if "@" not in email:
                raise ValueError(f"{info.field_name} takes a service account's email (NAME@PROJECT.iam.gserviceaccount.com); got {email!r}")
        return value

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        if value is not None and (not value or any(not s.startswith("https://") for s in value)):
            raise ValueError(f"scopes are OAuth scope URLs (e.g. {CLOUD_PLATFORM}); got {value!r}")
        return value

    @model_validator(mode="after")
    def _method_fields(self) -> "GcpConnector":
        check_method_fields(self.method, self.__dict__, _NEEDS, _OWNERS)
        if self.service_account_json and self.credentials:
            raise ValueError("give service_account_json or credentials, not both")
        return self

    # -- credentials -------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"connectors.{self.name or 'gcp'}"

    def _scope_list(self) -> list[str]:
        return list(self.scopes or [CLOUD_PLATFORM])

    def _hint(self, exc: BaseException, text: str) -> str:
        kind = type(exc).__name__
        if kind == "DefaultCredentialsError":
            return "no application default credentials here: run `gcloud auth application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, or define a connector with method service-account"
        if kind == "TransportError":
            return "Google's token endpoint cannot be reached from here: check the network, a proxy, or the key file's token_uri"
        if self.method == "oauth2-token":
            return "method oauth2-token holds an access token that cannot be refreshed: it may have expired; mint a new one (gcloud auth print-access-token) or use method service-account"
        if self.method == "user-account":
            return "the refresh token may be revoked or expired: run `gcloud auth application-default login` again and point user_account_json at the new file"
        if self.method == "impersonation":
            return f"the source credentials need roles/iam.serviceAccountTokenCreator on {self.target_principal}"
        if "invalid_grant" in text or "account not found" in text.lower():
            return "the key was refused (deleted, disabled, or of another project): create a new key for the service account"
        return "check the connector's credentials and the account's permissions"

    def _call(self, what: str, fn, *args, **kwargs):
        return sdk_call(self.label, what, self._hint, fn, *args, **kwargs)

    def _service_account_info(self) -> tuple[dict[str, Any], Optional[str]]:
        """The service-account key JSON the settings point at, and the project that came with it."""
        project = None
        if self.service_account_json:
            where = f"{self._where}.service_account_json"
            ref = self.service_account_json
            info = parse_json_secret(refs.resolve(ref, where), where, ref, "a service-account key JSON")
        else:
            where, ref = f"{self._where}.credentials", self.credentials
            data = refs.resolve_credential_set(ref, "gcp", where)
            project = data.get("project")
            info = data if data.get("private_key") else data.get("service_account_info")
            if isinstance(info, str):
                info = parse_json_secret(info, where, ref, "a service-account key JSON")
            if not info and data.get("service_account_file"):
                path = Path(str(data["service_account_file"])).expanduser()
                try:
                    info = parse_json_secret(path.read_text(), where, ref, "a service-account key JSON")
                except OSError as exc:
                    raise refs.SecretReferenceError(where, ref, f"cannot read its service_account_file {path}: {exc.strerror or exc}") from None
            if not info:
                raise refs.SecretReferenceError(where, ref, "holds no service_account_info or service_account_file (a service-account key)")
            register_key_file(info)
        if info.get("type") != "service_account":
            raise refs.SecretReferenceError(where, ref, f"holds a key of type {info.get('type')!r}, not a service-account key (type service_account)")
        return info, project or info.get("project_id")

    def _user_account_info(self) -> dict[str, Any]:
        where, ref = f"{self._where}.user_account_json", self.user_account_json
        info = parse_json_secret(refs.resolve(ref, where), where, ref, "an authorized_user JSON (gcloud auth application-default login)")
        if info.get("type", "authorized_user") != "authorized_user":
            raise refs.SecretReferenceError(where, ref, f"holds a key of type {info.get('type')!r}, not an authorized_user file; for a service-account key use method service-account")
        missing = [k for k in ("client_id", "client_secret", "refresh_token") if not info.get(k)]
        if missing:
            raise refs.SecretReferenceError(where, ref, f"lacks {', '.join(missing)}: an authorized_user file has client_id, client_secret and refresh_token")
        return info

    def _service_account_creds(self, info: dict[str, Any], scopes: list[str]):
        service_account = require("google.oauth2.service_account", "gcp", self.label)
        return self._call("reading the service-account key", service_account.Credentials.from_service_account_info, info, scopes=scopes)

    def _default(self, scopes: list[str]):
        google_auth = require("google.auth", "gcp", self.label)
        return self._call("finding application default credentials", google_auth.default, scopes=scopes)

    def _build(self) -> _Auth:
        method = self.method
        if method == "implicit":
            creds, project = self._default(self._scope_list())
            return _Auth(creds, project)
        if method == "service-account":
            info, project = self._service_account_info()
            creds = self._service_account_creds(info, self._scope_list())
            return _Auth(creds, project, info, info.get("client_email"))
        if method == "user-account":
            oauth2 = require("google.oauth2.credentials", "gcp", self.label)
            info = self._user_account_info()
            # Built by hand rather than from_authorized_user_info, which ignores the file's token_uri.
            creds = oauth2.Credentials(
                token=None,
                refresh_token=info["refresh_token"],
                token_uri=info.get("token_uri") or GOOGLE_TOKEN_URI,
                client_id=info["client_id"],
                client_secret=info["client_secret"],
                scopes=self.scopes,
                quota_project_id=info.get("quota_project_id"),
            )
            return _Auth(creds, info.get("quota_project_id"), info, info.get("account") or None)
        if method == "oauth2-token":
            oauth2 = require("google.oauth2.credentials", "gcp", self.label)
            return _Auth(oauth2.Credentials(token=refs.resolve(self.token, f"{self._where}.token")))
        if method == "impersonation":
            impersonated = require("google.auth.impersonated_credentials", "gcp", self.label)
            if self.service_account_json or self.credentials:
                info, project = self._service_account_info()
                source = self._service_account_creds(info, [CLOUD_PLATFORM])
            else:
                info = None
                source, project = self._default([CLOUD_PLATFORM])
            creds = impersonated.Credentials(
                source_credentials=source,
                target_principal=self.target_principal,
                target_scopes=self._scope_list(),
                delegates=self._delegate_names() or None,
                lifetime=self.lifetime_s,
                iam_endpoint_override=self._impersonation_url() if self.iam_endpoint else None,
            )
            return _Auth(creds, project, info, self.target_principal)
        raise AssertionError(method)  # pragma: no cover - the model validates the method

    def _delegate_names(self) -> list[str]:
        """The delegation chain as the IAM Credentials API names service accounts."""
        return [f"projects/-/serviceAccounts/{email}" for email in self.delegates]

    def _impersonation_url(self) -> str:
        base = (self.iam_endpoint or IAM_ENDPOINT).rstrip("/")
        return f"{base}/v1/projects/-/serviceAccounts/{self.target_principal}:generateAccessToken"

    def _auth(self) -> _Auth:
        """The connector's credentials holding a token valid for the refresh margin more (built once, cached)."""
        key = self.fingerprint()
        with _cache_lock:
            auth = _cache.get(key)
            if auth is None:
                auth = _cache[key] = self._build()
            if self.method == "oauth2-token":
                if auth.expires_at is not None and auth.expires_at <= time.time():
                    raise ConnectorError(
                        f"{self.label}: its access token expired at {until(auth.expires_at)}, and method oauth2-token cannot refresh one: "
                        "mint a new token (gcloud auth print-access-token) or use method service-account or user-account"
                    )
            elif _stale(auth.creds):
                requests_transport = require("google.auth.transport.requests", "gcp", self.label)
                self._call("refreshing the access token", auth.creds.refresh, requests_transport.Request())
                redact.register(auth.creds.token)
            return auth

    def credentials_now(self):
        """google-auth credentials with a fresh token (what gcsfs and google-cloud clients take)."""
        return self._auth().creds

    def _project(self, auth: Optional[_Auth] = None) -> Optional[str]:
        found = auth.project if auth is not None else None
        return self.project or found or os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("CLOUDSDK_CORE_PROJECT")

    def _tokeninfo(self, token: str) -> dict[str, Any]:
        url = f"{self.tokeninfo_endpoint or TOKENINFO_ENDPOINT}?access_token={quote(token)}"
        hint = (
            "the access token was refused (expired or revoked); method oauth2-token cannot refresh it: mint a new one"
            if self.method == "oauth2-token"
            else "the access token was refused"
        )
        return http_json(url, label=self.label, what="tokeninfo", hint=hint)

    def _emulator(self, endpoint: Optional[str]) -> Optional[str]:
        return endpoint or self.endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST") or None

    # -- the interface ------------------------------------------------------------

    def identity(self) -> str:
        auth = self._auth()
        creds = auth.creds
        project = self._project(auth) or "no project set"
        if self.method == "oauth2-token":
            info = self._tokeninfo(creds.token)
            expires = time.time() + int(info["expires_in"]) if str(info.get("expires_in", "")).isdigit() else None
            with _cache_lock:
                auth.expires_at = expires
            who = info.get("email") or info.get("azp") or "an access token"
            return f"{who} (project {project}); a bare access token valid until {until(expires)}, which cannot be refreshed"
        email = auth.email or getattr(creds, "service_account_email", None)
        if not email or email == "default":
            # ADC of a user, or the metadata server before its first call: ask whose token this is.
            try:
                email = self._tokeninfo(creds.token).get("email")
            except ConnectorError:
                email = None
        who = email or "application default credentials"
        if self.method == "impersonation":
            who = f"{self.target_principal} (impersonated)"
        elif self.method == "user-account":
            who = f"{email or 'user account of OAuth client ' + str(auth.info.get('client_id'))} (user account)"
        return f"{who} (project {project}); token valid until {until(_expiry_ts(creds))}"

    def skypilot_env(self, private_dir: Path) -> dict[str, str]:
        """Environment for SkyPilot's process (and the gcloud it runs); key files 0600 in ``private_dir``.

        SkyPilot checks GCP with ``gcloud auth list`` and google.auth.default(), and mounts
        GOOGLE_APPLICATION_CREDENTIALS' file onto its VMs. With a key, gcloud is pointed at a
        config directory of its own (CLOUDSDK_CONFIG) and the key (CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE),
        so neither touches ``~/.config/gcloud``. oauth2-token gives gcloud CLOUDSDK_AUTH_ACCESS_TOKEN
        only: google.auth.default() in SkyPilot cannot use a bare token, so SkyPilot's GCP check
        fails with it (it serves gcloud-driven steps only). impersonation with ADC as the source
        embeds the ADC file when there is one; on a VM's metadata server only gcloud impersonates.
        """
        env: dict[str, str] = {}
        if self.method == "implicit":
            if self.project:
                env.update(GOOGLE_CLOUD_PROJECT=self.project, CLOUDSDK_CORE_PROJECT=self.project)
            return env
        auth = self._auth()
        project = self._project(auth)
        if project:
            env.update(GOOGLE_CLOUD_PROJECT=project, CLOUDSDK_CORE_PROJECT=project)
        files = Path(private_dir)
        if self.method == "oauth2-token":
            env["CLOUDSDK_AUTH_ACCESS_TOKEN"] = auth.creds.token
            return env
        key_file: Optional[Path] = None
        if self.method in ("service-account", "user-account"):
            key_file = write_private(files / f"gcp-{self.method}.json", json.dumps(auth.info))
            env["GOOGLE_APPLICATION_CREDENTIALS"] = str(key_file)
            if self.method == "service-account":
                env["CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE"] = str(key_file)
        else:  # impersonation
            source = auth.info or _adc_file_info()
            chain = ",".join([*self.delegates, self.target_principal])
            env["CLOUDSDK_AUTH_IMPERSONATE_SERVICE_ACCOUNT"] = chain
            if source is not None:
                content = {
                    "type": "impersonated_service_account",
                    "service_account_impersonation_url": self._impersonation_url(),
                    "delegates": self._delegate_names(),
                    "source_credentials": source,
                }
                key_file = write_private(files / "gcp-impersonation.json", json.dumps(content))
                env["GOOGLE_APPLICATION_CREDENTIALS"] = str(key_file)
            if auth.info is not None:
                source_file = write_private(files / "gcp-impersonation-source.json", json.dumps(auth.info))
                env["CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE"] = str(source_file)
        if "CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE" in env:
            gcloud_dir = files / "gcloud"
            gcloud_dir.mkdir(mode=0o700, exist_ok=True)
            env["CLOUDSDK_CONFIG"] = str(gcloud_dir)
        return env

    def fs_options(self, url: str, endpoint: Optional[str] = None) -> dict[str, Any]:
        """gcsfs storage options: the credentials object and project; an emulator is reached anonymously."""
        emulator = self._emulator(endpoint)
        if emulator:
            options: dict[str, Any] = {"token": "anon", "endpoint_url": emulator if "://" in emulator else f"http://{emulator}", **EMULATOR_GCSFS_OPTIONS}
            if self.project:
                options["project"] = self.project
            return options
        auth = self._auth()
        options = {"token": auth.creds}
        project = self._project(auth)
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
        auth = self._auth()
        project = self._project(auth)
        if project:
            envs["SKYVM_GCS_PROJECT"] = project
        if self.downscope:
            token, expires = self._downscoped(auth.creds, bucket, prefix, node)
            scope = f"{where}/* (downscoped access token until {until(expires)})"
        else:
            token, expires = auth.creds.token, _expiry_ts(auth.creds) or auth.expires_at
            scope = f"gs://{bucket} (the connector's own access token, not narrowed, until {until(expires)})"
        redact.register(token)
        return NodeAccess(envs=envs, secrets={"SKYVM_GCS_TOKEN": token}, expires_at=expires, scope=scope)

    def _downscoped(self, creds: Any, bucket: str, prefix: str, node: str) -> tuple[str, Optional[float]]:
        """Exchange the connector's token for one bounded by ``access_boundary`` (what google.auth.downscoped does)."""
        sts = require("google.oauth2.sts", "gcp", self.label)
        requests_transport = require("google.auth.transport.requests", "gcp", self.label)
        client = sts.Client(self.sts_endpoint or STS_ENDPOINT)
        answer = self._call(
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
        expires = time.time() + int(answer["expires_in"]) if answer.get("expires_in") else _expiry_ts(creds)
        return token, expires

    def registry_credentials(self, server: str) -> tuple[str, str]:
        """Artifact Registry / Container Registry: the user ``oauth2accesstoken`` and a fresh access token."""
        if not is_google_registry(server):
            raise ConnectorError(f"{self.label} logs in to Artifact Registry (*-docker.pkg.dev) and gcr.io only, not {server}: use registry.username and registry.password")
        return "oauth2accesstoken", self._auth().creds.token


def _adc_file_info() -> Optional[dict[str, Any]]:
    """The ADC file's content when it is one impersonation can start from (read, never written)."""
    path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if not path:
        config = os.environ.get("CLOUDSDK_CONFIG") or os.path.join(os.path.expanduser("~"), ".config", "gcloud")
        path = os.path.join(config, "application_default_credentials.json")
    try:
        with open(path) as fh:
            info = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(info, dict) or info.get("type") not in ("service_account", "authorized_user"):
        return None
    register_key_file(info)
    return info
