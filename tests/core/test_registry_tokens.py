"""Registry credentials are read for every launch: a changed password is used by the next launch,
a wrong one fails naming the registry, and an ECR token minted by the AWS connector (moto) logs in
to a real registry. Docker engine, registries and moto are real."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import boto3
import pytest

from emulators import LocalRegistry
from skyvm.api import Run
from skyvm.errors import InfrastructureError


def where():
    import os

    return os.environ.get("SKYVM_CLUSTER")


def test_a_rotated_password_is_used_by_the_next_launch(registry, tmp_path):
    password_file = tmp_path / "registry-password"
    right = os.environ["SKYVM_TEST_REGISTRY_PASSWORD"]
    password_file.write_text(right + "\n")
    config = {"defaults": {"registry": {"server": registry.server, "username": "skyvm", "password": f"file:{password_file}"}}}
    with Run(config) as run:
        assert run.submit(where, node="first").result(300)
    wrong = "rotated-away-" + uuid.uuid4().hex
    password_file.write_text(wrong)
    with Run(config) as run:
        with pytest.raises(InfrastructureError) as err:
            run.submit(where, node="second").result(300)
    assert f"registry {registry.server} refused the login of skyvm" in str(err.value)
    assert wrong not in str(err.value)
    password_file.write_text(right)
    with Run(config) as run:
        assert run.submit(where, node="third").result(300)


@pytest.fixture
def ecr_like_registry(docker_engine, s3_server, tmp_path):
    """A registry whose one user is AWS with the password moto's ECR hands out, as ECR's tokens work."""
    token = boto3.client("ecr", endpoint_url=s3_server, region_name="us-east-1").get_authorization_token()["authorizationData"][0]
    import base64

    user, _, password = base64.b64decode(token["authorizationToken"]).decode().partition(":")
    server = LocalRegistry(tmp_path, user, password)
    yield server
    server.stop()


def test_an_ecr_token_from_the_aws_connector_pushes_and_pulls_the_node_image(ecr_like_registry, s3_server):
    config = {
        "connectors": {"ecr": {"type": "aws", "method": "secret-key", "aws_access_key_id": "env:AWS_ACCESS_KEY_ID",
                               "aws_secret_access_key": "env:AWS_SECRET_ACCESS_KEY", "endpoint_url": s3_server}},
        "defaults": {"registry": {"server": ecr_like_registry.server, "connector": "ecr"}},
    }
    with Run(config) as run:
        handle = run.submit(where, node="from-ecr")
        assert handle.result(300)
    assert handle.spec.image.startswith(ecr_like_registry.server + "/skyvm-node:")
    assert handle.spec.registry_auth[0] == "AWS"


def test_no_registry_password_stays_on_disk(registry, tmp_path):
    from skyvm.home import Home

    config = {"defaults": {"registry": registry.model_dump()}}
    with Run(config) as run:
        assert run.submit(where, node="no-trace").result(300)
    password = os.environ["SKYVM_TEST_REGISTRY_PASSWORD"]
    import base64

    encoded = base64.b64encode(f"skyvm:{password}".encode()).decode()
    for path in [*Home.current().path.rglob("*"), *(p for p in (Path.home() / ".docker").rglob("*") if (Path.home() / ".docker").exists())]:
        if path.is_file() and path.stat().st_size < 1_000_000:
            text = path.read_text(errors="replace")
            assert password not in text and encoded not in text, path
