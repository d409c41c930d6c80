"""SkyVMTaskRunner with payload stores on the three clouds' storage protocols, and credentials kept in Prefect.

Real servers on loopback: moto (S3 and STS), a GCS emulator and Azurite; a real Prefect API; real
containers. Payloads and results cross a task boundary through each store, and what the node was
given is read from inside its container: short-lived, scoped credentials, never the launcher's.
Then a Prefect block (prefect-aws's ``aws-credentials`` type, made through the API as a deployment
has it without prefect-aws installed here) drives a connector, and a Prefect Secret block is the
registry password the node image is pulled with.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest
from prefect import flow, task

from engine_checks import NODE_VARS, check_round_trip, cloud_store
from prefect_skyvm import SkyVMTaskRunner
from skyvm import redact


@task
def produce(n: int) -> dict:
    import os

    return {"n": n, "env": {k: os.environ.get(k) for k in NODE_VARS}}


@task
def consume(first: dict) -> dict:
    import os

    return {"doubled": 2 * first["n"], "env": {k: os.environ.get(k) for k in NODE_VARS}}


@pytest.mark.parametrize("scheme", ["s3", "gs", "az"])
def test_payloads_and_results_cross_each_clouds_store_with_scoped_node_credentials(scheme, request):
    store = cloud_store(scheme, request, f"prefect-{scheme}-{uuid.uuid4().hex[:8]}")

    @flow(task_runner=SkyVMTaskRunner({"defaults": {"cpus": 0.5, "memory": 0.5, "payload_store": store.url, "payload_store_endpoint": store.endpoint}}))
    def clouds():
        first = produce.submit(21)
        return first.result(), consume.submit(first).result()  # a result as the next node's payload

    first, second = clouds()
    assert first["n"] == 21 and second["doubled"] == 42
    check_round_trip(store, first["env"], second["env"])


# -- credentials kept in Prefect -------------------------------------------------


def save_aws_credentials_block(name: str, key_id: str, secret: str) -> None:
    """An ``aws-credentials`` block as prefect-aws makes one, through the API (prefect-aws is not installed here)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import BlockDocumentCreate, BlockSchemaCreate, BlockTypeCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    fields = {
        "title": "AwsCredentials",
        "type": "object",
        "block_type_slug": "aws-credentials",
        "properties": {
            "aws_access_key_id": {"title": "AWS Access Key ID", "type": "string"},
            "aws_secret_access_key": {"title": "AWS Access Key Secret", "type": "string", "format": "password", "writeOnly": True},
            "region_name": {"title": "Region Name", "type": "string"},
        },
        "secret_fields": ["aws_secret_access_key"],
        "block_schema_references": {},
    }
    with get_client(sync_client=True) as client:
        try:
            block_type = client.read_block_type_by_slug("aws-credentials")
        except ObjectNotFound:
            block_type = client.create_block_type(BlockTypeCreate(name="AWS Credentials", slug="aws-credentials"))
        try:
            schema = client.create_block_schema(BlockSchemaCreate(fields=fields, block_type_id=block_type.id))
        except ObjectAlreadyExists:
            schema = next(s for s in client.read_block_schemas() if s.block_type_id == block_type.id)
        client.create_block_document(
            BlockDocumentCreate(
                name=name,
                data={"aws_access_key_id": key_id, "aws_secret_access_key": secret, "region_name": "us-east-1"},
                block_schema_id=schema.id,
                block_type_id=block_type.id,
            )
        )
        # The API keeps the secret field to itself unless asked.
        shown = client.read_block_document_by_name(name=name, block_type_slug="aws-credentials", include_secrets=False)
        assert secret not in str(shown.data)


@task
def where_am_i() -> dict:
    import os

    return {"secret": os.environ.get("AWS_SECRET_ACCESS_KEY"), "image_ok": os.path.exists("/opt/skyvm")}


def test_prefect_blocks_drive_the_connector_and_the_registry_login(s3_server, registry):
    from prefect.blocks.system import Secret

    from skyvm.api import node_image
    from skyvm.settings import NodeSettings

    tag = uuid.uuid4().hex[:8]
    key_id, secret = f"AKIA{tag.upper()}BLOCK", f"block-secret-{uuid.uuid4().hex}"
    save_aws_credentials_block(f"team-{tag}", key_id, secret)
    Secret(value=os.environ["SKYVM_TEST_REGISTRY_PASSWORD"]).save(f"regpw-{tag}")
    Secret(value="not-the-password-" + tag).save(f"wrongpw-{tag}")

    # The node image in the registry (pushed with the fixture's own login), then gone from this engine:
    # the node must log in with the Prefect secret and pull it.
    image = node_image(NodeSettings(registry=registry))
    assert image.startswith(registry.server + "/")
    subprocess.run(["docker", "rmi", image], check=True, capture_output=True)

    def settings(password_block: str, team: str = f"team-{tag}") -> dict:
        return {
            "connectors": {"team": {"type": "aws", "method": "secret-key", "credentials": f"prefect:aws-credentials/{team}"}},
            "defaults": {
                "connector": "team",
                "cpus": 0.5,
                "memory": 0.5,
                "payload_store": f"s3://skyvm-test/prefect-blocks-{tag}",
                "payload_store_endpoint": s3_server,
                "image": image,
                "registry": {"server": registry.server, "username": registry.username, "password": f"prefect:secret/{password_block}"},
            },
        }

    @flow(task_runner=SkyVMTaskRunner(settings(f"regpw-{tag}")))
    def with_blocks():
        return where_am_i.submit().result()

    seen = with_blocks()
    assert seen["image_ok"] and seen["secret"] and seen["secret"] != secret  # a federation token minted from the block's key
    assert redact.redact(f"x {secret} y") == "x *** y"  # the launcher read the block's secret (and hides it from now on)
    assert subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0  # pulled again

    # The blocks are what is used: a wrong Secret fails the registry login, a missing block names itself.
    for bad, expected in ((settings(f"wrongpw-{tag}"), "refused the login"), (settings(f"regpw-{tag}", team="nope"), "Prefect block aws-credentials/nope cannot be read")):

        @flow(task_runner=SkyVMTaskRunner(bad))
        def broken():
            return where_am_i.submit()

        state = broken(return_state=True)  # the flow ends Crashed with its node's reason
        assert state.is_crashed(), state
        assert expected in state.message and "not-the-password" not in state.message
