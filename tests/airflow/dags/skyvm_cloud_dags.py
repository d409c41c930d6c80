"""DAGs of test_clouds.py and test_canary.py. Their stores, connections and ports come from the DAG
run's conf and from connections the tests create, so parsing this file needs neither."""

from __future__ import annotations

import datetime

from airflow.sdk import DAG, task

from airflow_skyvm.operators.skyvm import SkyVMOperator

START = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
# What a node reports (as tests/prefect/engine_checks.py's NODE_VARS; this file is parsed where that cannot be imported).
NODE_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AZURE_STORAGE_CONNECTION_STRING",
             "SKYVM_GCS_TOKEN", "STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")
STORE = {"cpus": 0.5, "memory": 0.5, "payload_store": "{{ dag_run.conf['store'] }}", "payload_store_endpoint": "{{ dag_run.conf.get('endpoint') }}"}
PRINTED = ("CANARY_LITERAL", "CANARY_FROM_ENV", "CANARY_FROM_CONN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def node_env() -> dict:
    import os

    return {k: os.environ.get(k) for k in NODE_VARS}


with DAG("skyvm_clouds", schedule=None, start_date=START, render_template_as_native_obj=True) as clouds_dag:

    @task.skyvm(sky_settings=STORE)
    def produce(n: int) -> dict:
        return {"n": n, "env": node_env()}

    @task.skyvm(sky_settings=STORE)
    def consume(first: dict) -> dict:
        return {"doubled": 2 * first["n"], "env": node_env()}

    consume(produce(21))  # the first node's result is the second node's payload, through XCom


with DAG("skyvm_team_connections", schedule=None, start_date=START) as connections_dag:

    @task.skyvm(skyvm_conn_id="skyvm_team")
    def where_am_i() -> dict:
        import os

        return {"secret": os.environ.get("AWS_SECRET_ACCESS_KEY"), "image_ok": os.path.exists("/opt/skyvm")}

    where_am_i()


with DAG("skyvm_canary", schedule=None, start_date=START, render_template_as_native_obj=True) as canary_dag:

    @task.skyvm(skyvm_conn_id="skyvm_canary")
    def boom(port: int):
        import os
        import socket

        with socket.create_connection(("127.0.0.1", port), timeout=300) as watch:
            watch.recv(16)  # the test looks at ps and docker inspect now, then lets the node go on
        for name in PRINTED:
            print(f"{name}={os.environ.get(name)}", flush=True)
        raise RuntimeError(f"boom: the literal secret is {os.environ['CANARY_LITERAL']}")

    boom("{{ dag_run.conf['port'] }}")


with DAG("skyvm_canary_deferred", schedule=None, start_date=START) as canary_deferred_dag:
    # The deferrable path: the trigger reads the node's log from the container, then execute_complete logs it.
    SkyVMOperator(
        task_id="boom_deferred",
        bash_command=" ; ".join(f'echo "{name}=${name}"' for name in PRINTED) + ' ; echo "failing with $CANARY_LITERAL" >&2 ; exit 3',
        skyvm_conn_id="skyvm_canary",
        deferrable=True,
        poll_interval=0.5,
    )
