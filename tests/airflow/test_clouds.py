"""Airflow DAGs with payload stores on the three clouds' storage protocols, and credentials kept in Airflow.

Real servers on loopback (moto for S3 and STS, a GCS emulator, Azurite), the real metadata DB,
dag.test(), real containers. XCom crosses two nodes through each store, and the nodes report what
they were given: short-lived, scoped credentials, never the launcher's. Then Airflow connections
drive a run: an ``aws`` connection behind a connector (``credentials: airflow:team_aws``) and the
``skyvm`` connection's password as the registry password the node image is pulled with.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from skyvm import redact
from test_operator import run_dag, xcom

from engine_checks import check_round_trip, cloud_store  # noqa: E402 - tests/, the checks both engine suites share

DAGS = Path(__file__).resolve().parent / "dags"


@pytest.fixture(scope="module")
def cloud_dags(airflow_db):
    spec = importlib.util.spec_from_file_location("skyvm_cloud_dags", DAGS / "skyvm_cloud_dags.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["skyvm_cloud_dags"] = module  # its functions travel by value to the nodes
    spec.loader.exec_module(module)
    return module


def put_connections(*connections) -> None:
    """Connection rows in the metadata DB (replacing ones of the same id)."""
    from airflow.models import Connection
    from airflow.utils.session import create_session

    with create_session() as session:
        for fields in connections:
            session.query(Connection).filter(Connection.conn_id == fields["conn_id"]).delete()
            session.add(Connection(**fields))


def environment_changes(before: dict) -> set[str]:
    """Variables of this process set, changed or removed since ``before``, but Airflow's own task context."""
    return {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k) and not k.startswith(("AIRFLOW_CTX_", "_AIRFLOW_"))}


@pytest.mark.parametrize("scheme", ["s3", "gs", "az"])
def test_xcom_crosses_two_nodes_through_each_clouds_store_with_scoped_node_credentials(scheme, request, cloud_dags):
    store = cloud_store(scheme, request, f"airflow-{scheme}-{uuid.uuid4().hex[:8]}")

    dr = cloud_dags.clouds_dag.test(run_conf={"store": store.url, "endpoint": store.endpoint})

    assert {ti.task_id: ti.state for ti in dr.get_task_instances()} == {"produce": "success", "consume": "success"}
    first, second = xcom(dr, "produce"), xcom(dr, "consume")
    assert first["n"] == 21 and second["doubled"] == 42
    check_round_trip(store, first["env"], second["env"])


def test_airflow_connections_drive_the_connector_and_the_registry_login(s3_server, registry, cloud_dags, caplog, capfd):
    from skyvm.api import node_image
    from skyvm.settings import NodeSettings

    tag = uuid.uuid4().hex[:8]
    key_id, secret = f"AKIA{tag.upper()}CONN", f"conn-secret-{uuid.uuid4().hex}"
    # The node image in the registry (pushed with the fixture's own login), then gone from this engine:
    # the node must log in with the skyvm connection's password and pull it.
    image = node_image(NodeSettings(registry=registry))
    subprocess.run(["docker", "rmi", image], check=True, capture_output=True)
    settings = {
        "connectors": {"team": {"type": "aws", "method": "secret-key", "credentials": "airflow:team_aws"}},
        "defaults": {
            "connector": "team",
            "cpus": 0.5,
            "memory": 0.5,
            "payload_store": f"s3://skyvm-test/airflow-conns-{tag}",
            "payload_store_endpoint": s3_server,
            "image": image,
            "registry": {"server": registry.server},  # username and password: the skyvm connection's
        },
    }
    put_connections(
        {"conn_id": "team_aws", "conn_type": "aws", "login": key_id, "password": secret, "extra": '{"region_name": "us-east-1"}'},
        {"conn_id": "skyvm_team", "conn_type": "skyvm", "login": registry.username, "password": os.environ["SKYVM_TEST_REGISTRY_PASSWORD"], "extra": json.dumps({"settings": settings})},
    )
    before = dict(os.environ)

    dr, states = run_dag(cloud_dags.connections_dag)

    assert states == {"where_am_i": "success"}
    seen = xcom(dr, "where_am_i")
    assert seen["image_ok"] and seen["secret"] and seen["secret"] != secret  # a federation token minted from the connection's key
    assert redact.redact(f"x {secret} y") == "x *** y"  # the launcher read the connection (and hides its secret from now on)
    assert subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0  # pulled again
    # The registry password went by reference, not through the environment (Airflow sets only its AIRFLOW_CTX_*).
    assert environment_changes(before) == set() and os.environ["SKYVM_TEST_REGISTRY_PASSWORD"] not in [v for k, v in os.environ.items() if k != "SKYVM_TEST_REGISTRY_PASSWORD"]

    # The connection is what is used: a wrong registry password fails the task at its registry login.
    put_connections({"conn_id": "skyvm_team", "conn_type": "skyvm", "login": registry.username, "password": "not-the-password-" + tag, "extra": json.dumps({"settings": settings})})
    capfd.readouterr()
    dr, states = run_dag(cloud_dags.connections_dag)
    assert states == {"where_am_i": "failed"}
    out = capfd.readouterr()
    assert "refused the login" in out.out + out.err + caplog.text
