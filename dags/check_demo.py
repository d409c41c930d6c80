"""`skyvm check` on the examples' settings (profile on-s3), against an S3 server on loopback.

No cloud is reachable here, so the demo starts moto's S3/STS server, gives the team connector's
references (env:TEAM_AWS_*) values, and runs the check a user would run before a launch; then it
runs it once more with a wrong secret to show a failing row and its fix.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from skyvm.cli import main as skyvm

SETTINGS = str(Path(__file__).with_name("skyvm.yaml"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    port = free_port()
    # Signatures are checked after the five calls that make the team's IAM user and bucket.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "5"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        import boto3

        admin = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="team")
        key = iam.create_access_key(UserName="team")["AccessKey"]
        allow = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:*", "sts:*"], "Resource": "*"}]}'
        iam.attach_user_policy(UserName="team", PolicyArn=iam.create_policy(PolicyName="skyvm", PolicyDocument=allow)["Policy"]["Arn"])
        boto3.client("s3", **admin).create_bucket(Bucket="skyvm-demo")
        os.environ.update(AWS_ENDPOINT_URL=endpoint, TEAM_AWS_ACCESS_KEY_ID=key["AccessKeyId"], TEAM_AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
        args = ["check", "--config", SETTINGS, "--profile", "on-s3", "--no-skypilot"]
        print("$ skyvm " + " ".join(args), flush=True)
        good = skyvm(args)
        os.environ["TEAM_AWS_SECRET_ACCESS_KEY"] = "not-the-team-secret"
        print("\n$ TEAM_AWS_SECRET_ACCESS_KEY=<wrong> skyvm " + " ".join(args), flush=True)
        bad = skyvm(args)
        print(f"\nexit codes: {good} with the right key, {bad} with a wrong one")
        return 0 if (good, bad) == (0, 1) else 1
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
