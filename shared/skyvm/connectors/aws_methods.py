"""AWS's auth methods, one small strategy each: implicit, secret-key, sts-token, iam-role, session-token, federation-token.

Each holds its own fields and checks, the credentials it gives (given keys, or keys it mints with
STS and keeps in ``CREDENTIALS`` until ``base.due``), the profile SkyPilot's boto3 reads, and how a
node's scoped keys are made from it. The connector (:mod:`skyvm.connectors.aws`) holds the shared
fields (region, endpoint, STS durations and policies), the boto3 clients and the interface.

A method's operations take ``conn``, the AwsConnector that holds it (typed as the base
``Connector``: this module does not import the connector's, which imports it).

May import: boto3 (through ``require``), skyvm.redact and skyvm.connectors' base, refs and files.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from pydantic import model_validator

from skyvm import redact
from skyvm.connectors import refs
from skyvm.connectors.base import CREDENTIALS, Connector, ConnectorError, Method, due, require
from skyvm.connectors.files import write_private

KEY_FIELDS = ("credentials", "aws_access_key_id", "aws_secret_access_key", "aws_session_token")


@dataclass(frozen=True)
class AwsCredentials:
    access_key: str
    secret_key: str = ""
    token: Optional[str] = None
    expires_at: Optional[float] = None  # None: long-lived
    issued_at: Optional[float] = None

    def __repr__(self) -> str:  # never the values
        return f"AwsCredentials(access_key=***, temporary={self.token is not None}, expires_at={self.expires_at})"

    @classmethod
    def from_sts(cls, answer: dict[str, Any], issued_at: Optional[float] = None) -> "AwsCredentials":
        """What an STS call answered, its secrets registered for redaction."""
        c = answer["Credentials"]
        creds = cls(c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"], c["Expiration"].timestamp(), issued_at=issued_at)
        redact.register(creds.secret_key, creds.token)
        return creds

    def secret_vars(self) -> dict[str, str]:
        out = {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        if self.token:
            out["AWS_SESSION_TOKEN"] = self.token
        return out

    def profile(self, name: str) -> str:
        """A shared-credentials file's profile holding these keys."""
        lines = [f"[{name}]", f"aws_access_key_id = {self.access_key}", f"aws_secret_access_key = {self.secret_key}"]
        if self.token:
            lines.append(f"aws_session_token = {self.token}")
        return "\n".join(lines) + "\n"

    def process_output(self) -> str:
        """What a credential_process prints: boto3 renews keys with an Expiration by running it again."""
        out = {"Version": 1, "AccessKeyId": self.access_key, "SecretAccessKey": self.secret_key}
        if self.token:
            out["SessionToken"] = self.token
        if self.expires_at:
            out["Expiration"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.expires_at))
        return json.dumps(out)


class AwsMethod(Method):
    """What every AWS method answers; the defaults are implicit's (the SDK's own chain)."""

    # Keys skyvm mints with STS and so renews, for SkyPilot's process too.
    MINTED: ClassVar[bool] = False

    def credentials_now(self, conn: Connector) -> Optional[AwsCredentials]:
        """Credentials not yet due for renewal (None: the SDK's default chain)."""
        return None

    def source(self, conn: Connector) -> Optional[AwsCredentials]:
        """The credentials temporary ones are minted from (None: the SDK's default chain)."""
        return None

    def skypilot_env(self, conn: Connector, private_dir: Path) -> dict[str, Optional[str]]:
        """What SkyPilot's process is given (None: unset it); implicit leaves it to its own chain."""
        return {"AWS_DEFAULT_REGION": conn.region_name()}

    def node_credentials(self, conn: Connector, *, node: str, duration: int, policy: str, endpoint: Optional[str]) -> Optional[AwsCredentials]:
        """A node's keys narrowed by ``policy``; None: the connector's own are already temporary
        (an sts-token, an instance role): STS cannot federate from those, so they are passed on."""
        base = conn.frozen()
        return None if base.token else conn.federate(base, node=node, duration=duration, policy=policy, endpoint=endpoint)


class Implicit(AwsMethod):
    method: Literal["implicit"] = "implicit"

    @classmethod
    def foreign(cls, name: str, owners: list[str]) -> str:
        if name in KEY_FIELDS:
            return "method implicit uses the environment's own credentials; for keys use method secret-key"
        return super().foreign(name, owners)


class _Keys(AwsMethod):
    """Keys the settings point at: a pair (and a session token), or a whole credential set."""

    # A whole credential set: an Airflow AWS connection or a Prefect aws-credentials block.
    credentials: refs.Reference = None
    aws_access_key_id: refs.Reference = None
    aws_secret_access_key: refs.Reference = None
    aws_session_token: refs.Reference = None


    def has_keys(self) -> bool:
        return bool(self.credentials or (self.aws_access_key_id and self.aws_secret_access_key))

    def source(self, conn: Connector) -> Optional[AwsCredentials]:
        where = conn.where
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

    def skypilot_env(self, conn: Connector, private_dir: Path) -> dict[str, Optional[str]]:
        self.write_profile(conn, private_dir, self.credentials_now(conn))
        env: dict[str, Optional[str]] = {"AWS_DEFAULT_REGION": conn.region_name()}
        # The engine's own ambient keys would win over the profile in boto3's chain: SkyPilot must not see them.
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
            env[var] = None
        env.update(AWS_CONFIG_FILE=str(private_dir / "aws-config"), AWS_PROFILE="skyvm")
        if (private_dir / "aws-credentials").exists():
            env["AWS_SHARED_CREDENTIALS_FILE"] = str(private_dir / "aws-credentials")
        return env

    def write_profile(self, conn: Connector, files: Path, creds: Optional[AwsCredentials]) -> None:
        """The ``skyvm`` profile SkyPilot's boto3 reads: ``aws-config`` (and ``aws-credentials``) in ``files``."""
        write_private(files / "aws-credentials", creds.profile("skyvm"))
        write_private(files / "aws-config", f"[profile skyvm]\nregion = {conn.region_name()}\n")


class _NeedsKeys(_Keys):
    @model_validator(mode="after")
    def _needs_keys(self) -> "_NeedsKeys":
        if not self.has_keys():
            raise ValueError(
                f"method {self.method} needs aws_access_key_id and aws_secret_access_key (references), or credentials: airflow:CONN_ID / prefect:aws-credentials/NAME"
            )
        return self


class SecretKey(_NeedsKeys):
    method: Literal["secret-key"] = "secret-key"

    def credentials_now(self, conn: Connector) -> Optional[AwsCredentials]:
        return self.source(conn)


class StsToken(SecretKey):
    method: Literal["sts-token"] = "sts-token"  # type: ignore[assignment]

    @model_validator(mode="after")
    def _needs_token(self) -> "StsToken":
        if not (self.aws_session_token or self.credentials):
            raise ValueError("method sts-token needs aws_session_token (a reference) beside the key pair")
        return self


class _Minted(_Keys):
    """Keys minted with STS from the source ones, cached until due for renewal."""

    def mint(self, conn: Connector, sts) -> dict[str, Any]:  # pragma: no cover - each method's
        raise NotImplementedError

    def credentials_now(self, conn: Connector) -> Optional[AwsCredentials]:
        def make() -> AwsCredentials:
            return AwsCredentials.from_sts(self.mint(conn, conn.client("sts", self.source(conn))), issued_at=time.time())

        return CREDENTIALS.fetch("aws", conn, make, stale=lambda c: due(c.issued_at, c.expires_at))


class _KeysProcess(_Minted, _NeedsKeys):
    MINTED: ClassVar[bool] = True

    def write_profile(self, conn: Connector, files: Path, creds: Optional[AwsCredentials]) -> None:
        # Minted keys expire: SkyPilot's boto3 reads them through a credential_process, which
        # it runs again as they near their expiry; renew_at() says when skyvm rewrites the file.
        write_private(files / "aws-minted.json", creds.process_output())
        reader = f"{shutil.which('cat') or 'cat'} {files / 'aws-minted.json'}"
        write_private(files / "aws-config", f"[profile skyvm]\ncredential_process = {reader}\nregion = {conn.region_name()}\n")


class SessionToken(_KeysProcess):
    method: Literal["session-token"] = "session-token"

    def mint(self, conn: Connector, sts) -> dict[str, Any]:
        return conn.call("GetSessionToken", sts.get_session_token, DurationSeconds=conn.duration_seconds)

    def node_credentials(self, conn: Connector, *, node: str, duration: int, policy: str, endpoint: Optional[str]) -> Optional[AwsCredentials]:
        # Federated from the long-lived keys the session was minted from.
        return conn.federate(self.source(conn), node=node, duration=duration, policy=policy, endpoint=endpoint)


class FederationToken(_KeysProcess):
    method: Literal["federation-token"] = "federation-token"

    def mint(self, conn: Connector, sts) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"Name": (conn.federation_name or "skyvm")[:32], "DurationSeconds": conn.duration_seconds}
        if conn.policy:
            kwargs["Policy"] = json.dumps(conn.policy)
        return conn.call("GetFederationToken", sts.get_federation_token, **kwargs)


class IamRole(_Minted):
    method: Literal["iam-role"] = "iam-role"

    role_arn: Optional[str] = None

    @model_validator(mode="after")
    def _needs_role(self) -> "IamRole":
        if not self.role_arn:
            raise ValueError("method iam-role needs role_arn (e.g. arn:aws:iam::123456789012:role/skyvm)")
        return self

    def _assume(self, conn: Connector, sts, what: str, **kwargs: Any) -> dict[str, Any]:
        kwargs["RoleArn"] = self.role_arn
        if conn.external_id:
            kwargs["ExternalId"] = refs.resolve(conn.external_id, f"connectors.{conn.name}.external_id")
        return conn.call(what, sts.assume_role, **kwargs)

    def mint(self, conn: Connector, sts) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"RoleSessionName": conn.session_name or "skyvm", "DurationSeconds": conn.duration_seconds}
        if conn.policy:
            kwargs["Policy"] = json.dumps(conn.policy)
        return self._assume(conn, sts, f"AssumeRole {self.role_arn}", **kwargs)

    def write_profile(self, conn: Connector, files: Path, creds: Optional[AwsCredentials]) -> None:
        # SkyPilot's boto3 assumes the role itself from a private profile, so it refreshes on its own.
        source = self.source(conn)
        lines = [f"role_arn = {self.role_arn}", f"role_session_name = {conn.session_name or 'skyvm'}", f"duration_seconds = {conn.duration_seconds}"]
        if conn.external_id:
            lines.append(f"external_id = {refs.resolve(conn.external_id, f'connectors.{conn.name}.external_id')}")
        if source is not None:
            lines.append("source_profile = skyvm-source")
            write_private(files / "aws-credentials", source.profile("skyvm-source"))
        else:
            lines.append("credential_source = Environment")
        write_private(files / "aws-config", "[profile skyvm]\n" + "\n".join(lines) + f"\nregion = {conn.region_name()}\n")

    def node_credentials(self, conn: Connector, *, node: str, duration: int, policy: str, endpoint: Optional[str]) -> Optional[AwsCredentials]:
        # The role again, narrowed by a session policy to this prefix.
        # An S3-compatible store with its own endpoint (MinIO, moto) answers STS there too.
        sts = conn.client("sts", self.source(conn), endpoint)
        answer = self._assume(
            conn, sts, f"AssumeRole {self.role_arn} for node {node!r}", RoleSessionName=f"skyvm-{node}"[:64], DurationSeconds=duration, Policy=policy
        )
        return AwsCredentials.from_sts(answer)


def frozen_default(label: str) -> AwsCredentials:
    """The SDK's default chain's credentials now (environment, ~/.aws, instance role), or the fix."""
    boto3 = require("boto3", "aws", label)
    found = boto3.Session().get_credentials()
    if found is None:
        raise ConnectorError(
            f"{label}: no AWS credentials found in this process (environment, ~/.aws, instance role); "
            "define a connector with method secret-key or iam-role, or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        )
    f = found.get_frozen_credentials()
    redact.register(f.secret_key, f.token)
    return AwsCredentials(f.access_key, f.secret_key, f.token)
