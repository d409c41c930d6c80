"""Core-suite fixtures: an AWS that checks signatures (moto with IAM authentication on)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest

import emulators
from netutil import stop_group

ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})


@dataclass
class AwsAccount:
    endpoint: str
    access_key: str
    secret_key: str


@pytest.fixture(scope="session")
def aws_iam_server(tmp_path_factory):
    """moto's server with authentication enforced after the four calls that make one IAM user.

    Unlike ``s3_server`` (which accepts any key), a wrong key or secret fails here as on AWS.
    """
    log = tmp_path_factory.mktemp("moto-iam") / "log"
    proc, endpoint = emulators.start_moto(log, env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        import boto3

        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="skyvm-ci")
        key = iam.create_access_key(UserName="skyvm-ci")["AccessKey"]
        arn = iam.create_policy(PolicyName="all", PolicyDocument=ALLOW_ALL)["Policy"]["Arn"]
        iam.attach_user_policy(UserName="skyvm-ci", PolicyArn=arn)
        yield AwsAccount(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        stop_group(proc)
