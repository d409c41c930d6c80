"""AWS through boto3: implicit, secret-key, sts-token, iam-role, session-token, federation-token.

Temporary credentials (AssumeRole, GetSessionToken, GetFederationToken) are
cached per connector and minted again before they expire (``base.renewal_time``:
at 80% of their lifetime, or ``REFRESH_MARGIN_S`` before, whichever is first).
SkyPilot gets minted keys through a ``credential_process`` profile reading a
0600 file that is rewritten at each renewal, so its long-lived process always
finds fresh ones. A node gets its own short-lived credentials, scoped by a session
policy to the payload store's prefix: the launcher's keys never leave it.

Each auth method is a strategy in :mod:`skyvm.connectors.aws_methods`; this module holds the
connector: the fields every method takes, boto3's clients and calls, and the interface.

May import: boto3 (through ``require``), skyvm.redact and skyvm.connectors' base, common, refs
and aws_methods.
"""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Annotated, Any, Optional, Union
from urllib.parse import urlparse

from pydantic import Field

from skyvm import redact
from skyvm.connectors.aws_methods import (
    AwsCredentials,
    FederationToken,
    IamRole,
    Implicit,
    SecretKey,
    SessionToken,
    StsToken,
    frozen_default,
)
from skyvm.connectors.base import DEFAULT_NODE_TTL_S, Connector, NodeAccess, renewal_time, require
from skyvm.connectors.common import sdk_call
from skyvm.connectors.refs import Reference

__all__ = ["AwsConnector", "AwsCredentials", "store_policy", "is_ecr"]

# STS limits: 15 minutes to 12 hours (36 hours for GetFederationToken with keys, but 12 is the common bound).
MIN_DURATION_S, MAX_DURATION_S = 900, 43200
ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_STS", "AWS_ENDPOINT_URL_ECR")

AwsAuth = Annotated[Union[Implicit, SecretKey, StsToken, IamRole, SessionToken, FederationToken], Field(discriminator="method")]


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


def _hint(exc: BaseException, text: str) -> str:
    if "credential" in text.lower() or "signature" in text.lower() or "InvalidClientTokenId" in text:
        return "check the keys the connector references"
    return "check the connector's settings and the account's permissions"


class AwsConnector(Connector):
    """An AWS account. Secret fields take references (env:, file:, airflow:, prefect:)."""

    type: str = "aws"
    auth: AwsAuth

    region: Optional[str] = None
    endpoint_url: Optional[str] = None
    # iam-role (the session's name and the trust policy's external id)
    external_id: Reference = None
    session_name: Optional[str] = None
    # iam-role, session-token, federation-token
    duration_seconds: int = Field(default=3600, ge=MIN_DURATION_S, le=MAX_DURATION_S)
    # federation-token (and a session policy for iam-role)
    federation_name: Optional[str] = None
    policy: Optional[dict[str, Any]] = None


    # -- boto3 -------------------------------------------------------------------

    def _endpoint(self, service: str) -> Optional[str]:
        return self.endpoint_url or os.environ.get(f"AWS_ENDPOINT_URL_{service.upper()}") or os.environ.get("AWS_ENDPOINT_URL")

    def region_name(self) -> str:
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"

    def client(self, service: str, creds: Optional[AwsCredentials], endpoint: Optional[str] = None):
        boto3 = require("boto3", "aws", f"{self.label}")
        kwargs: dict[str, Any] = {"region_name": self.region_name(), "endpoint_url": self._endpoint(service) or endpoint}
        if creds is not None:
            kwargs.update(aws_access_key_id=creds.access_key, aws_secret_access_key=creds.secret_key, aws_session_token=creds.token)
        return boto3.client(service, **kwargs)

    def call(self, what: str, fn, *args, **kwargs):
        """An SDK call whose failure names the connector and the fix, with no secret in it."""
        return sdk_call(self.label, what, _hint, fn, *args, **kwargs)

    def credentials_now(self) -> Optional[AwsCredentials]:
        """Credentials not yet due for renewal (None: the SDK's default chain)."""
        return self.auth.credentials_now(self)

    def frozen(self) -> AwsCredentials:
        """Concrete credentials, the implicit chain's included (for a node's scoped token and for SkyPilot)."""
        return self.credentials_now() or frozen_default(self.label)

    def federate(self, base: AwsCredentials, *, node: str, duration: int, policy: str, endpoint: Optional[str]) -> AwsCredentials:
        """Keys for a node from long-lived ones, bounded by a session policy (GetFederationToken)."""
        sts = self.client("sts", base, endpoint)
        answer = self.call(f"GetFederationToken for node {node!r}", sts.get_federation_token, Name=f"skyvm-{node}"[:32], DurationSeconds=duration, Policy=policy)
        return AwsCredentials.from_sts(answer)

    # -- the interface ------------------------------------------------------------

    def identity(self) -> str:
        sts = self.client("sts", self.credentials_now())
        answer = self.call("sts get-caller-identity", sts.get_caller_identity)
        return f"{answer['Arn']} (account {answer['Account']})"

    def store_renew_at(self) -> Optional[float]:
        creds = self.credentials_now()
        return renewal_time(creds.issued_at or time.time(), creds.expires_at) if creds and creds.expires_at else None

    def renew_at(self) -> Optional[float]:
        # iam-role is left out: SkyPilot's boto3 assumes the role again by itself from the profile.
        return self.store_renew_at() if self.auth.MINTED else None

    def fs_options(self, url: str, endpoint: Optional[str] = None) -> dict[str, Any]:
        creds = self.credentials_now()
        options: dict[str, Any] = {"client_kwargs": {"region_name": self.region_name()}}
        endpoint = endpoint or self._endpoint("s3")
        if endpoint:
            options["endpoint_url"] = endpoint
        if creds is not None:
            options.update(key=creds.access_key, secret=creds.secret_key, token=creds.token)
        return options

    def node_store_access(self, url: str, *, node: str, ttl_s: int = DEFAULT_NODE_TTL_S, endpoint: Optional[str] = None) -> NodeAccess:
        parsed = urlparse(url)
        bucket, prefix = parsed.netloc, parsed.path.strip("/")
        duration = max(MIN_DURATION_S, min(MAX_DURATION_S, int(ttl_s)))
        envs = {"AWS_DEFAULT_REGION": self.region_name()}
        endpoint = endpoint or self._endpoint("s3")
        if endpoint:
            envs["AWS_ENDPOINT_URL_S3"] = endpoint
        policy = json.dumps(store_policy(bucket, prefix))
        creds = self.auth.node_credentials(self, node=node, duration=duration, policy=policy, endpoint=endpoint)
        if creds is None:
            # Already temporary: passed on, bounded by their own expiry; said so.
            own = self.frozen()
            return NodeAccess(envs=envs, secrets=own.secret_vars(), expires_at=own.expires_at, scope=f"s3 (the connector's own temporary credentials; not narrowed to {url})")
        return NodeAccess(envs=envs, secrets=creds.secret_vars(), expires_at=creds.expires_at, scope=f"s3://{bucket}/{prefix}/* for {duration}s")

    def registry_credentials(self, server: str) -> tuple[str, str]:
        """A fresh ECR token (valid 12 hours) for an ECR registry."""
        ecr = self.client("ecr", self.credentials_now())
        answer = self.call(f"ECR GetAuthorizationToken for {server}", ecr.get_authorization_token)
        data = answer["authorizationData"][0]
        user, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
        redact.register(password, data["authorizationToken"])
        return user, password


def is_ecr(server: str) -> bool:
    host = server.split("/")[0]
    return ".dkr.ecr." in host and host.endswith((".amazonaws.com", ".amazonaws.com.cn"))
