"""Google Cloud's auth methods, one small strategy each: implicit, service-account, user-account, oauth2-token, impersonation.

Each holds its own fields and checks, how it builds its google-auth credentials, how it keeps their
token fresh, what it says it is (``skyvm check``), the hint its failures carry, and the environment
and key files SkyPilot's process (and the gcloud it runs) is given. The connector
(:mod:`skyvm.connectors.gcp`) holds the shared fields (project, scopes, endpoints), the cache of
built credentials and the interface.

A method's operations take ``conn``, the GcpConnector that holds it (typed as the base
``Connector``: this module does not import the connector's, which imports it).

May import: google-auth (through ``require``), skyvm.redact and skyvm.connectors' base, common, refs and files.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from pydantic import Field, field_validator, model_validator

from skyvm import redact
from skyvm.connectors import refs
from skyvm.connectors.base import Connector, ConnectorError, Method, Needs, refresh_margin_s, require
from skyvm.connectors.common import parse_json_secret, register_key_file, until
from skyvm.connectors.files import write_private

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
IAM_ENDPOINT = "https://iamcredentials.googleapis.com"


@dataclass
class Auth:
    """The google-auth credentials of a connector, and what resolving them told."""

    creds: Any
    project: Optional[str] = None
    info: Optional[dict[str, Any]] = None  # the key file (service-account, user-account) or the source's (impersonation)
    email: Optional[str] = None
    expires_at: Optional[float] = None  # oauth2-token: when tokeninfo said it expires


def expiry_ts(creds: Any) -> Optional[float]:
    expiry = getattr(creds, "expiry", None)
    return None if expiry is None else expiry.replace(tzinfo=datetime.timezone.utc).timestamp()


def _stale(creds: Any) -> bool:
    expires = expiry_ts(creds)
    return not getattr(creds, "token", None) or (expires is not None and expires - time.time() < refresh_margin_s())


class GcpMethod(Method):
    """What every GCP method answers; the defaults serve the methods whose tokens refresh."""

    # What tokeninfo refusing the token means.
    REFUSED: ClassVar[str] = "the access token was refused"

    def build(self, conn: Connector) -> Auth:  # pragma: no cover - each method's
        raise NotImplementedError

    def keep_fresh(self, conn: Connector, auth: Auth) -> None:
        """Refresh the token when it is within the refresh margin of its expiry."""
        if _stale(auth.creds):
            transport = require("google.auth.transport.requests", "gcp", conn.label)
            conn.call("refreshing the access token", auth.creds.refresh, transport.Request())
            redact.register(auth.creds.token)

    def hint(self) -> Optional[str]:
        """The fix a failed call names for this method (None: by the error alone)."""
        return None

    def who(self, conn: Connector, auth: Auth, email: Optional[str]) -> str:
        return email or "application default credentials"

    def identity(self, conn: Connector, auth: Auth, project: str) -> str:
        email = auth.email or getattr(auth.creds, "service_account_email", None)
        if not email or email == "default":
            # ADC of a user, or the metadata server before its first call: ask whose token this is.
            try:
                email = conn.tokeninfo(auth.creds.token).get("email")
            except ConnectorError:
                email = None
        return f"{self.who(conn, auth, email)} (project {project}); token valid until {until(expiry_ts(auth.creds))}"

    def skypilot_env(self, conn: Connector, private_dir: Path) -> dict[str, str]:
        """Environment for SkyPilot's process (and the gcloud it runs); key files 0600 in ``private_dir``.

        SkyPilot checks GCP with ``gcloud auth list`` and google.auth.default(), and mounts
        GOOGLE_APPLICATION_CREDENTIALS' file onto its VMs. With a key, gcloud is pointed at a
        config directory of its own (CLOUDSDK_CONFIG) and the key (CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE),
        so neither touches ``~/.config/gcloud``. oauth2-token gives gcloud CLOUDSDK_AUTH_ACCESS_TOKEN
        only: google.auth.default() in SkyPilot cannot use a bare token, so SkyPilot's GCP check
        fails with it (it serves gcloud-driven steps only). impersonation with ADC as the source
        embeds the ADC file when there is one; on a VM's metadata server only gcloud impersonates.
        """
        auth = conn.auth_now()
        env = conn.project_env(conn.project_of(auth))
        env.update(self.credential_env(conn, auth, private_dir))
        if "CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE" in env:
            gcloud_dir = private_dir / "gcloud"
            gcloud_dir.mkdir(mode=0o700, exist_ok=True)
            env["CLOUDSDK_CONFIG"] = str(gcloud_dir)
        return env

    def credential_env(self, conn: Connector, auth: Auth, files: Path) -> dict[str, str]:  # pragma: no cover - each method's
        raise NotImplementedError


class Implicit(GcpMethod):
    method: Literal["implicit"] = "implicit"

    def build(self, conn: Connector) -> Auth:
        creds, project = conn.default_credentials(conn.scope_list())
        return Auth(creds, project)

    def skypilot_env(self, conn: Connector, private_dir: Path) -> dict[str, str]:
        # SkyPilot finds ADC itself; only a project the settings name is passed on.
        return conn.project_env(conn.project)


class _KeySource(GcpMethod):
    """A service-account key: ``service_account_json``, or a credential set holding one."""

    credentials: refs.Reference = None
    service_account_json: refs.Reference = None


    @model_validator(mode="after")
    def _one_source(self) -> "_KeySource":
        if self.service_account_json and self.credentials:
            raise ValueError("give service_account_json or credentials, not both")
        return self

    def service_account_info(self, conn: Connector) -> tuple[dict[str, Any], Optional[str]]:
        """The service-account key JSON the settings point at, and the project that came with it."""
        project = None
        if self.service_account_json:
            where, ref = f"{conn.where}.service_account_json", self.service_account_json
            info = parse_json_secret(refs.resolve(ref, where), where, ref, "a service-account key JSON")
        else:
            where, ref = f"{conn.where}.credentials", self.credentials
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

    def service_account_creds(self, conn: Connector, info: dict[str, Any], scopes: list[str]):
        service_account = require("google.oauth2.service_account", "gcp", conn.label)
        return conn.call("reading the service-account key", service_account.Credentials.from_service_account_info, info, scopes=scopes)


class ServiceAccount(_KeySource):
    method: Literal["service-account"] = "service-account"

    NEEDS: ClassVar[Needs] = ((("service_account_json", "credentials"), "service_account_json (a reference to the key JSON, e.g. file:/secrets/sa.json) or credentials: airflow:CONN_ID / prefect:gcp-credentials/NAME"),)

    def build(self, conn: Connector) -> Auth:
        info, project = self.service_account_info(conn)
        return Auth(self.service_account_creds(conn, info, conn.scope_list()), project, info, info.get("client_email"))

    def credential_env(self, conn: Connector, auth: Auth, files: Path) -> dict[str, str]:
        key_file = str(write_private(files / "gcp-service-account.json", json.dumps(auth.info)))
        return {"GOOGLE_APPLICATION_CREDENTIALS": key_file, "CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE": key_file}


class UserAccount(GcpMethod):
    method: Literal["user-account"] = "user-account"

    user_account_json: refs.Reference = None


    NEEDS: ClassVar[Needs] = ((("user_account_json",), "user_account_json (a reference to an authorized_user JSON, e.g. file:~/.config/gcloud/application_default_credentials.json)"),)

    def hint(self) -> Optional[str]:
        return "the refresh token may be revoked or expired: run `gcloud auth application-default login` again and point user_account_json at the new file"

    def _info(self, conn: Connector) -> dict[str, Any]:
        where, ref = f"{conn.where}.user_account_json", self.user_account_json
        info = parse_json_secret(refs.resolve(ref, where), where, ref, "an authorized_user JSON (gcloud auth application-default login)")
        if info.get("type", "authorized_user") != "authorized_user":
            raise refs.SecretReferenceError(where, ref, f"holds a key of type {info.get('type')!r}, not an authorized_user file; for a service-account key use method service-account")
        missing = [k for k in ("client_id", "client_secret", "refresh_token") if not info.get(k)]
        if missing:
            raise refs.SecretReferenceError(where, ref, f"lacks {', '.join(missing)}: an authorized_user file has client_id, client_secret and refresh_token")
        return info

    def build(self, conn: Connector) -> Auth:
        oauth2 = require("google.oauth2.credentials", "gcp", conn.label)
        info = self._info(conn)
        # Built by hand rather than from_authorized_user_info, which ignores the file's token_uri.
        creds = oauth2.Credentials(
            token=None,
            refresh_token=info["refresh_token"],
            token_uri=info.get("token_uri") or GOOGLE_TOKEN_URI,
            client_id=info["client_id"],
            client_secret=info["client_secret"],
            scopes=conn.scopes,
            quota_project_id=info.get("quota_project_id"),
        )
        return Auth(creds, info.get("quota_project_id"), info, info.get("account") or None)

    def who(self, conn: Connector, auth: Auth, email: Optional[str]) -> str:
        return f"{email or 'user account of OAuth client ' + str(auth.info.get('client_id'))} (user account)"

    def credential_env(self, conn: Connector, auth: Auth, files: Path) -> dict[str, str]:
        return {"GOOGLE_APPLICATION_CREDENTIALS": str(write_private(files / "gcp-user-account.json", json.dumps(auth.info)))}


class OAuth2Token(GcpMethod):
    """A bare access token: it cannot be refreshed, and every error says so."""

    method: Literal["oauth2-token"] = "oauth2-token"
    REFUSED: ClassVar[str] = "the access token was refused (expired or revoked); method oauth2-token cannot refresh it: mint a new one"

    token: refs.Reference = None


    NEEDS: ClassVar[Needs] = ((("token",), "token (a reference to an access token, e.g. env:GOOGLE_OAUTH_ACCESS_TOKEN)"),)

    def build(self, conn: Connector) -> Auth:
        oauth2 = require("google.oauth2.credentials", "gcp", conn.label)
        return Auth(oauth2.Credentials(token=refs.resolve(self.token, f"{conn.where}.token")))

    def keep_fresh(self, conn: Connector, auth: Auth) -> None:
        if auth.expires_at is not None and auth.expires_at <= time.time():
            raise ConnectorError(
                f"{conn.label}: its access token expired at {until(auth.expires_at)}, and method oauth2-token cannot refresh one: "
                "mint a new token (gcloud auth print-access-token) or use method service-account or user-account"
            )

    def hint(self) -> Optional[str]:
        return "method oauth2-token holds an access token that cannot be refreshed: it may have expired; mint a new one (gcloud auth print-access-token) or use method service-account"

    def identity(self, conn: Connector, auth: Auth, project: str) -> str:
        info = conn.tokeninfo(auth.creds.token)
        expires = time.time() + int(info["expires_in"]) if str(info.get("expires_in", "")).isdigit() else None
        auth.expires_at = expires  # what keep_fresh checks from now on
        who = info.get("email") or info.get("azp") or "an access token"
        return f"{who} (project {project}); a bare access token valid until {until(expires)}, which cannot be refreshed"

    def credential_env(self, conn: Connector, auth: Auth, files: Path) -> dict[str, str]:
        # gcloud takes a bare token; google.auth.default() in SkyPilot cannot (see GcpMethod.skypilot_env).
        return {"CLOUDSDK_AUTH_ACCESS_TOKEN": auth.creds.token}


class Impersonation(_KeySource):
    """``target_principal``'s tokens, minted through the IAM Credentials API from a key or ADC."""

    method: Literal["impersonation"] = "impersonation"

    target_principal: Optional[str] = None
    delegates: list[str] = Field(default_factory=list)

    @field_validator("target_principal", "delegates")
    @classmethod
    def _emails(cls, value: Any, info) -> Any:
        for email in [value] if isinstance(value, str) else value or []:
            if "@" not in email:
                raise ValueError(f"{info.field_name} takes a service account's email (NAME@PROJECT.iam.gserviceaccount.com); got {email!r}")
        return value

    NEEDS: ClassVar[Needs] = ((("target_principal",), "target_principal (the email of the service account to impersonate)"),)

    def hint(self) -> Optional[str]:
        return f"the source credentials need roles/iam.serviceAccountTokenCreator on {self.target_principal}"

    def delegate_names(self) -> list[str]:
        """The delegation chain as the IAM Credentials API names service accounts."""
        return [f"projects/-/serviceAccounts/{email}" for email in self.delegates]

    def url(self, conn: Connector) -> str:
        base = (conn.iam_endpoint or IAM_ENDPOINT).rstrip("/")
        return f"{base}/v1/projects/-/serviceAccounts/{self.target_principal}:generateAccessToken"

    def build(self, conn: Connector) -> Auth:
        impersonated = require("google.auth.impersonated_credentials", "gcp", conn.label)
        if self.service_account_json or self.credentials:
            info, project = self.service_account_info(conn)
            source = self.service_account_creds(conn, info, [CLOUD_PLATFORM])
        else:
            info = None
            source, project = conn.default_credentials([CLOUD_PLATFORM])
        creds = impersonated.Credentials(
            source_credentials=source,
            target_principal=self.target_principal,
            target_scopes=conn.scope_list(),
            delegates=self.delegate_names() or None,
            lifetime=conn.lifetime_s,
            iam_endpoint_override=self.url(conn) if conn.iam_endpoint else None,
        )
        return Auth(creds, project, info, self.target_principal)

    def who(self, conn: Connector, auth: Auth, email: Optional[str]) -> str:
        return f"{self.target_principal} (impersonated)"

    def credential_env(self, conn: Connector, auth: Auth, files: Path) -> dict[str, str]:
        # With ADC as the source, its file is embedded when there is one; on a VM's metadata server only gcloud impersonates.
        env = {"CLOUDSDK_AUTH_IMPERSONATE_SERVICE_ACCOUNT": ",".join([*self.delegates, self.target_principal])}
        source = auth.info or adc_file_info()
        if source is not None:
            content = {"type": "impersonated_service_account", "service_account_impersonation_url": self.url(conn), "delegates": self.delegate_names(), "source_credentials": source}
            env["GOOGLE_APPLICATION_CREDENTIALS"] = str(write_private(files / "gcp-impersonation.json", json.dumps(content)))
        if auth.info is not None:
            env["CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE"] = str(write_private(files / "gcp-impersonation-source.json", json.dumps(auth.info)))
        return env


def adc_file_info() -> Optional[dict[str, Any]]:
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
