"""AWS through boto3: implicit, secret-key, sts-token, iam-role, session-token, federation-token.

Temporary credentials (AssumeRole, GetSessionToken, GetFederationToken) are
cached per connector and minted again before they expire (``base.renewal_time``:
at 80% of their lifetime, or ``REFRESH_MARGIN_S`` before, whichever is first).
SkyPilot gets minted keys through a ``credential_process`` profile reading a
0600 file that is rewritten at each renewal, so its long-lived process always
finds fresh ones. A node gets its own short-lived credentials, scoped by a session
policy to the payload store's prefix: the launcher's keys never leave it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator

from skyvm import redact
from skyvm.connectors import refs
from skyvm.connectors.base import DEFAULT_NODE_TTL_S, Connector, ConnectorError, NodeAccess, due, renewal_time, require
from skyvm.connectors.files import write_private

# STS limits: 15 minutes to 12 hours (36 hours for GetFederationToken with keys, but 12 is the common bound).
MIN_DURATION_S, MAX_DURATION_S = 900, 43200
# Methods whose keys skyvm mints with STS (and must renew for SkyPilot's process).
MINTED = ("session-token", "federation-token")
ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_STS", "AWS_ENDPOINT_URL_ECR")


@dataclass(frozen=True)
class AwsCredentials:
    access_key: str
    secret_key: str = ""
    token: Optional[str] = None
    expires_at: Optional[float] = None  # None: long-lived
    issued_at: Optional[float] = None

    def __repr__(self) -> str:  # never the values
        return f"AwsCredentials(access_key=***, temporary={self.token is not None}, expires_at={self.expires_at})"


_cache: dict[str, AwsCredentials] = {}
_cache_lock = threading.Lock()


def _stale(creds: Optional[AwsCredentials]) -> bool:
    return creds is None or due(creds.issued_at, creds.expires_at)


def store_policy(bucket: str, prefix: str) -> dict[str, Any]:
    """An IAM session policy allowing objects under one prefix of one bucket, nothing else."""
    prefix = prefix.strip("/")
    objects = f"arn:aws:s3:::{bucket}/{prefix}/*" if prefix else f"arn:aws:s3:::{bucket}/*"
    listing: dict[str, Any] = {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": f"arn:aws:s3:::{bucket}"}
    if prefix:
        listing["Condition"] = {"StringLike": {"s3:prefix": [f"{prefix}/*", prefix]}}
    return {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"], "Resource": objects}, listing],
    }


class AwsConnector(Connector):
    """An AWS account. Secret fields take references (env:, file:, airflow:, prefect:)."""

    type: str = "aws"
    METHODS: ClassVar[tuple[str, ...]] = ("implicit", "secret-key", "sts-token", "iam-role", "session-token", "federation-token")
    STORE_SCHEMES: ClassVar[tuple[str, ...]] = ("s3",)

    region: Optional[str] = None
    endpoint_url: Optional[str] = None
    # A whole credential set: an Airflow AWS connection or a Prefect aws-credentials block.
    credentials: Optional[str] = None
    aws_access_key_id: Optional[str] = None
    aws_secret_access_key: Optional[str] = None
    aws_session_token: Optional[str] = None
    # iam-role
    role_arn: Optional[str] = None
    external_id: Optional[str] = None
    session_name: Optional[str] = None
    # iam-role, session-token, federation-token
    duration_seconds: int = Field(default=3600, ge=MIN_DURATION_S, le=MAX_DURATION_S)
    # federation-token (and a session policy for iam-role)
    federation_name: Optional[str] = None
    policy: Optional[dict[str, Any]] = None

    @field_validator("credentials", "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "external_id")
    @classmethod
    def _references(cls, value: Optional[str], info) -> Optional[str]:
        return None if value is None else refs.check_syntax(value, info.field_name)

    @model_validator(mode="after")
    def _method_fields(self) -> "AwsConnector":
        keys = self.credentials or (self.aws_access_key_id and self.aws_secret_access_key)
        m = self.method
        if m in ("secret-key", "sts-token", "session-token", "federation-token") and not keys:
            raise ValueError(f"method {m} needs aws_access_key_id and aws_secret_access_key (references), or credentials: airflow:CONN_ID / prefect:aws-credentials/NAME")
        if m == "sts-token" and not (self.aws_session_token or self.credentials):
            raise ValueError("method sts-token needs aws_session_token (a reference) beside the key pair")
        if m == "iam-role" and not self.role_arn:
            raise ValueError("method iam-role needs role_arn (e.g. arn:aws:iam::123456789012:role/skyvm)")
        if self.role_arn and m != "iam-role":
            raise ValueError(f"role_arn is for method iam-role; this connector's method is {m}")
        if m == "implicit" and (keys or self.aws_session_token):
            raise ValueError("method implicit uses the environment's own credentials; for keys use method secret-key")
        return self

    # -- credentials -------------------------------------------------------------

    def _endpoint(self, service: str) -> Optional[str]:
        return self.endpoint_url or os.environ.get(f"AWS_ENDPOINT_URL_{service.upper()}") or os.environ.get("AWS_ENDPOINT_URL")

    def _given(self) -> Optional[AwsCredentials]:
        """The credentials the settings point at (None for implicit)."""
        where = f"connectors.{self.name or 'aws'}"
        if self.credentials:
            data = refs.resolve_credential_set(self.credentials, "aws", f"{where}.credentials")
            key = data.get("aws_access_key_id") or data.get("access_key")
            secret = data.get("aws_secret_access_key") or data.get("secret_key")
            token = data.get("aws_session_token") or data.get("token")
            if not key or not secret:
                raise refs.SecretReferenceError(f"{where}.credentials", self.credentials, "holds no access key id and secret access key")
            return AwsCredentials(key, secret, token or None)
        if self.aws_access_key_id:
            return AwsCredentials(
                refs.resolve(self.aws_access_key_id, f"{where}.aws_access_key_id"),
                refs.resolve(self.aws_secret_access_key, f"{where}.aws_secret_access_key"),
                refs.resolve_optional(self.aws_session_token, f"{where}.aws_session_token"),
            )
        return None

    def _region(self, data_region: Optional[str] = None) -> str:
        return self.region or data_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"

    def _client(self, service: str, creds: Optional[AwsCredentials], endpoint: Optional[str] = None):
        boto3 = require("boto3", "aws", f"{self.label}")
        kwargs: dict[str, Any] = {"region_name": self._region(), "endpoint_url": self._endpoint(service) or endpoint}
        if creds is not None:
            kwargs.update(aws_access_key_id=creds.access_key, aws_secret_access_key=creds.secret_key, aws_session_token=creds.token)
        return boto3.client(service, **kwargs)

    def _call(self, what: str, fn, *args, **kwargs):
        """An SDK call whose failure names the connector and the fix, with no secret in it."""
        try:
            return fn(*args, **kwargs)
        except ConnectorError:
            raise
        except Exception as exc:  # noqa: BLE001 - botocore's errors are many; the user needs one message
            text = redact.redact(str(exc))
            hint = "check the keys the connector references" if "credential" in text.lower() or "signature" in text.lower() or "InvalidClientTokenId" in text else "check the connector's settings and the account's permissions"
            raise ConnectorError(f"{self.label}: {what} failed: {type(exc).__name__}: {text}; {hint}") from None

    def _source(self) -> Optional[AwsCredentials]:
        """The credentials temporary ones are minted from."""
        return self._given()

    def _mint(self) -> AwsCredentials:
        method = self.method
        source = self._source()
        sts = self._client("sts", source)
        if method == "iam-role":
            kwargs: dict[str, Any] = {"RoleArn": self.role_arn, "RoleSessionName": self.session_name or "skyvm", "DurationSeconds": self.duration_seconds}
            if self.external_id:
                kwargs["ExternalId"] = refs.resolve(self.external_id, f"connectors.{self.name}.external_id")
            if self.policy:
                kwargs["Policy"] = json.dumps(self.policy)
            answer = self._call(f"AssumeRole {self.role_arn}", sts.assume_role, **kwargs)
        elif method == "session-token":
            answer = self._call("GetSessionToken", sts.get_session_token, DurationSeconds=self.duration_seconds)
        elif method == "federation-token":
            kwargs = {"Name": (self.federation_name or "skyvm")[:32], "DurationSeconds": self.duration_seconds}
            if self.policy:
                kwargs["Policy"] = json.dumps(self.policy)
            answer = self._call("GetFederationToken", sts.get_federation_token, **kwargs)
        else:  # pragma: no cover - callers check
            raise AssertionError(method)
        c = answer["Credentials"]
        creds = AwsCredentials(c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"], c["Expiration"].timestamp(), issued_at=time.time())
        redact.register(creds.secret_key, creds.token)
        return creds

    def credentials_now(self) -> Optional[AwsCredentials]:
        """Credentials not yet due for renewal (None: the SDK's default chain)."""
        if self.method in ("implicit",):
            return None
        if self.method in ("secret-key", "sts-token"):
            return self._given()
        key = self.fingerprint()
        with _cache_lock:
            creds = _cache.get(key)
            if _stale(creds):
                creds = _cache[key] = self._mint()
            return creds

    def _frozen(self) -> AwsCredentials:
        """Concrete credentials, the implicit chain's included (for a node's scoped token and for SkyPilot)."""
        creds = self.credentials_now()
        if creds is not None:
            return creds
        boto3 = require("boto3", "aws", self.label)
        found = boto3.Session().get_credentials()
        if found is None:
            raise ConnectorError(
                f"{self.label}: no AWS credentials found in this process (environment, ~/.aws, instance role); "
                "define a connector with method secret-key or iam-role, or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            )
        f = found.get_frozen_credentials()
        redact.register(f.secret_key, f.token)
        return AwsCredentials(f.access_key, f.secret_key, f.token)

    # -- the interface ------------------------------------------------------------

    def identity(self) -> str:
        sts = self._client("sts", self.credentials_now())
        answer = self._call("sts get-caller-identity", sts.get_caller_identity)
        return f"{answer['Arn']} (account {answer['Account']})"

    def skypilot_env(self, private_dir: Path) -> dict[str, str]:
        env = {"AWS_DEFAULT_REGION": self._region()}
        if self.method == "implicit":
            return env
        creds = self.credentials_now()
        files = Path(private_dir)
        if self.method == "iam-role":
            # SkyPilot's boto3 assumes the role itself from a private profile, so it refreshes on its own.
            source = self._source()
            lines = ["[skyvm]", f"role_arn = {self.role_arn}", f"role_session_name = {self.session_name or 'skyvm'}", f"duration_seconds = {self.duration_seconds}"]
            if self.external_id:
                lines.append(f"external_id = {refs.resolve(self.external_id, f'connectors.{self.name}.external_id')}")
            if source is not None:
                lines.append("source_profile = skyvm-source")
                write_private(files / "aws-credentials", _credentials_file("skyvm-source", source))
            else:
                lines.append("credential_source = Environment")
            write_private(files / "aws-config", "[profile skyvm]\n" + "\n".join(lines[1:]) + f"\nregion = {self._region()}\n")
        elif self.method in MINTED:
            # Minted keys expire: SkyPilot's boto3 reads them through a credential_process, which
            # it runs again as they near their expiry; renew_at() says when skyvm rewrites the file.
            write_private(files / "aws-minted.json", _process_output(creds))
            reader = f"{shutil.which('cat') or 'cat'} {files / 'aws-minted.json'}"
            write_private(files / "aws-config", f"[profile skyvm]\ncredential_process = {reader}\nregion = {self._region()}\n")
        else:
            write_private(files / "aws-credentials", _credentials_file("skyvm", creds))
            write_private(files / "aws-config", f"[profile skyvm]\nregion = {self._region()}\n")
        # The engine's own ambient keys would win over the profile in boto3's chain: SkyPilot must not see them.
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
            env[var] = None
        env.update(AWS_CONFIG_FILE=str(files / "aws-config"), AWS_PROFILE="skyvm")
        if (files / "aws-credentials").exists():
            env["AWS_SHARED_CREDENTIALS_FILE"] = str(files / "aws-credentials")
        return env

    def store_renew_at(self) -> Optional[float]:
        creds = self.credentials_now()
        return renewal_time(creds.issued_at or time.time(), creds.expires_at) if creds and creds.expires_at else None

    def renew_at(self) -> Optional[float]:
        # iam-role is left out: SkyPilot's boto3 assumes the role again by itself from the profile.
        return self.store_renew_at() if self.method in MINTED else None

    def fs_options(self, url: str, endpoint: Optional[str] = None) -> dict[str, Any]:
        creds = self.credentials_now()
        options: dict[str, Any] = {"client_kwargs": {"region_name": self._region()}}
        endpoint = endpoint or self._endpoint("s3")
        if endpoint:
            options["endpoint_url"] = endpoint
        if creds is not None:
            options.update(key=creds.access_key, secret=creds.secret_key, token=creds.token)
        return options

    def node_store_access(self, url: str, *, node: str, ttl_s: int = DEFAULT_NODE_TTL_S, endpoint: Optional[str] = None) -> NodeAccess:
        parsed = urlparse(url)
        bucket, prefix = parsed.netloc, parsed.path.strip("/")
        policy = json.dumps(store_policy(bucket, prefix))
        duration = max(MIN_DURATION_S, min(MAX_DURATION_S, int(ttl_s)))
        envs = {"AWS_DEFAULT_REGION": self._region()}
        endpoint = endpoint or self._endpoint("s3")
        if endpoint:
            envs["AWS_ENDPOINT_URL_S3"] = endpoint
        scope = f"s3://{bucket}/{prefix}/* for {duration}s"
        if self.method == "iam-role":
            # The role again, narrowed by a session policy to this prefix.
            # An S3-compatible store with its own endpoint (MinIO, moto) answers STS there too.
            sts = self._client("sts", self._source(), endpoint)
            kwargs: dict[str, Any] = {"RoleArn": self.role_arn, "RoleSessionName": f"skyvm-{node}"[:64], "DurationSeconds": duration, "Policy": policy}
            if self.external_id:
                kwargs["ExternalId"] = refs.resolve(self.external_id, f"connectors.{self.name}.external_id")
            answer = self._call(f"AssumeRole {self.role_arn} for node {node!r}", sts.assume_role, **kwargs)
        else:
            base = self._frozen()
            if base.token and self.method != "session-token":
                # Already temporary (an sts-token, an instance role): STS cannot federate from these.
                # Pass them on, bounded by their own expiry; say so.
                return NodeAccess(envs=envs, secrets=_secret_vars(base), expires_at=base.expires_at, scope=f"s3 (the connector's own temporary credentials; not narrowed to {url})")
            if base.token:  # session-token: federate from the long-lived keys it was minted from
                base = self._source()
            sts = self._client("sts", base, endpoint)
            answer = self._call(
                f"GetFederationToken for node {node!r}", sts.get_federation_token, Name=f"skyvm-{node}"[:32], DurationSeconds=duration, Policy=policy
            )
        c = answer["Credentials"]
        creds = AwsCredentials(c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"], c["Expiration"].timestamp())
        redact.register(creds.secret_key, creds.token)
        return NodeAccess(envs=envs, secrets=_secret_vars(creds), expires_at=creds.expires_at, scope=scope)

    def registry_credentials(self, server: str) -> tuple[str, str]:
        """A fresh ECR token (valid 12 hours) for an ECR registry."""
        ecr = self._client("ecr", self.credentials_now())
        answer = self._call(f"ECR GetAuthorizationToken for {server}", ecr.get_authorization_token)
        data = answer["authorizationData"][0]
        user, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
        redact.register(password, data["authorizationToken"])
        return user, password


def _secret_vars(creds: AwsCredentials) -> dict[str, str]:
    out = {"AWS_ACCESS_KEY_ID": creds.access_key, "AWS_SECRET_ACCESS_KEY": creds.secret_key}
    if creds.token:
        out["AWS_SESSION_TOKEN"] = creds.token
    return out


def _process_output(creds: AwsCredentials) -> str:
    """What a credential_process prints: boto3 renews keys with an Expiration by running it again."""
    out = {"Version": 1, "AccessKeyId": creds.access_key, "SecretAccessKey": creds.secret_key}
    if creds.token:
        out["SessionToken"] = creds.token
    if creds.expires_at:
        out["Expiration"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(creds.expires_at))
    return json.dumps(out)


def _credentials_file(profile: str, creds: AwsCredentials) -> str:
    lines = [f"[{profile}]", f"aws_access_key_id = {creds.access_key}", f"aws_secret_access_key = {creds.secret_key}"]
    if creds.token:
        lines.append(f"aws_session_token = {creds.token}")
    return "\n".join(lines) + "\n"


def is_ecr(server: str) -> bool:
    host = server.split("/")[0]
    return ".dkr.ecr." in host and host.endswith((".amazonaws.com", ".amazonaws.com.cn"))
