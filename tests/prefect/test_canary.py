"""Canary: every secret of a Prefect run is a unique marker, and none may surface where people look.

The settings file holds only references: the connector's keys (env: and prefect:secret/), the
registry password (prefect:secret/), node secrets (a literal value, env:, prefect:secret/). A node
prints its secrets and its AWS credentials, then raises an exception that quotes one. After the
run no marker may be in the test's captured logs, the Prefect API's logs, flow run and task run
records (states and their messages included), any row of the Prefect database, ``skyvm settings``,
a TaskSpec's printable form, or ``ps`` and ``docker inspect`` taken while the node ran; what the
node printed must reach the task run's log as ``***``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import yaml
from prefect import flow, task

from engine_checks import Watch, canary_markers, leaked, marker
from prefect_skyvm import SkyVMTaskRunner

PRINTED = ("CANARY_LITERAL", "CANARY_FROM_ENV", "CANARY_FROM_BLOCK", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@task
def boom(port: int):
    import os
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=300) as watch:
        watch.recv(16)  # the test looks at ps and docker inspect now, then lets the node go on
    for name in PRINTED:
        print(f"{name}={os.environ.get(name)}", flush=True)
    raise RuntimeError(f"boom: the literal secret is {os.environ['CANARY_LITERAL']}")


def prefect_records(flow_run_id) -> dict[str, str]:
    """What the Prefect API holds about the run, and every row of its database, as text."""
    import sqlalchemy
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    APILogWorker.drain_all(timeout=30)  # the run's logs are in the API before they are read
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        states = [s for tr in task_runs for s in client.read_task_run_states(tr.id)] + client.read_flow_run_states(flow_run_id)
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    engine = sqlalchemy.create_engine(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().replace("+aiosqlite", ""))
    rows = []
    with engine.connect() as db:
        for table in sqlalchemy.inspect(db).get_table_names():
            rows += [f"{table}: {tuple(r)}" for r in db.execute(sqlalchemy.text(f'SELECT * FROM "{table}"'))]
    engine.dispose()
    return {
        "api_records": "\n".join(x.model_dump_json() for x in [flow_run, *task_runs, *states]),
        "api_logs": "\n".join(log.message for log in logs),
        "database": "\n".join(rows),
    }


@pytest.fixture(params=[False, True], ids=["body", "engine"])
def engine(request):
    """Both modes: in engine mode Prefect's engine on the node makes and sends the states, logs and events."""
    return request.param


def test_no_secret_of_a_failing_node_surfaces_anywhere(s3_server, registry, tmp_path, monkeypatch, caplog, capfd, engine):
    from prefect.blocks.system import Secret

    from skyvm.api import backend_for, prepare
    from skyvm.settings import SkyVMConfig

    tag = uuid.uuid4().hex[:8]
    markers = canary_markers("aws_secret_key", "node_literal", "node_env", "node_block", registry_password=os.environ["SKYVM_TEST_REGISTRY_PASSWORD"])
    monkeypatch.setenv("CANARY_AWS_KEY_ID", "AKIACANARY" + tag.upper())
    monkeypatch.setenv("CANARY_NODE_ENV", markers["node_env"])
    for name, key in ((f"canary-aws-{tag}", "aws_secret_key"), (f"canary-node-{tag}", "node_block"), (f"canary-reg-{tag}", "registry_password")):
        Secret(value=markers[key]).save(name)
    settings = {
        "connectors": {
            "team": {"type": "aws", "method": "secret-key", "aws_access_key_id": "env:CANARY_AWS_KEY_ID", "aws_secret_access_key": f"prefect:secret/canary-aws-{tag}"}
        },
        "defaults": {
            "connector": "team",
            "cpus": 0.5,
            "memory": 0.5,
            "prefect_engine": engine,
            "payload_store": f"s3://skyvm-test/prefect-canary-{tag}",
            "payload_store_endpoint": s3_server,
            "registry": {"server": registry.server, "username": registry.username, "password": f"prefect:secret/canary-reg-{tag}"},
        },
        "nodes": {
            "boom": {
                "secrets": {"CANARY_LITERAL": markers["node_literal"], "CANARY_FROM_ENV": "env:CANARY_NODE_ENV", "CANARY_FROM_BLOCK": f"prefect:secret/canary-node-{tag}"}
            }
        },
    }
    path = tmp_path / "skyvm.yaml"
    path.write_text(yaml.safe_dump(settings))

    watch = Watch()

    @flow(task_runner=SkyVMTaskRunner(str(path)))
    def canary(port: int):
        return boom.submit(port)

    flow_state = canary(watch.port, return_state=True)
    task_state = flow_state.result(raise_on_failure=False)
    assert flow_state.is_failed() and task_state.is_failed(), (flow_state, task_state)

    records = prefect_records(flow_state.state_details.flow_run_id)
    assert str(flow_state.state_details.flow_run_id) in records["api_records"] and str(task_state.state_details.task_run_id) in records["database"]
    for name in PRINTED:
        assert f"{name}=***" in records["api_logs"], name  # printed by the node, redacted on its way to Prefect
    assert "RuntimeError: boom: the literal secret is ***" in records["api_logs"]  # the remote traceback

    # The printable forms: `skyvm settings` and a TaskSpec of the same node (which does carry the values).
    cli = subprocess.run([sys.executable, "-m", "skyvm.cli", "settings", str(path), "--node", "boom"], capture_output=True, text=True)
    assert cli.returncode == 0 and "CANARY_LITERAL" in cli.stdout, cli.stderr  # the secret's name is shown, not its value
    s = SkyVMConfig.load(path).resolve("boom")
    _, spec = prepare("prefect-canary", "boom", f"boom-{tag}", s, b"payload", backend_for(s))
    assert {markers[k] for k in ("node_literal", "node_env", "node_block")} <= set(spec.secrets.values())
    assert spec.registry_auth == (registry.username, markers["registry_password"])

    running = watch.result()
    # The node was seen: its exec's command, or the cluster's agent that forked it; never its values.
    assert "skyvm.node run" in running or "skyvm.agent" in running
    out = capfd.readouterr()
    found = leaked(
        markers,
        running=running,
        captured=caplog.text + out.out + out.err,
        state_message=str(task_state.message) + str(flow_state.message),
        skyvm_settings=cli.stdout + cli.stderr,
        task_spec=json.dumps(spec.public_dict()),
        **records,
    )
    assert not found, f"secret markers surfaced: {found}"
    assert "boom: the literal secret is ***" in task_state.message  # the exception the engine recorded, redacted


LATE_LOGGERS = ("skyvm", "skyvm.local", "skyvm.skypilot", "skyvm.api", "skyvm.connectors.aws")


@task
def prints_and_raises():
    import os

    print(f"the node's token is {os.environ['CANARY_TOKEN']}", flush=True)
    raise RuntimeError(f"failing with {os.environ['CANARY_TOKEN']}")


def test_late_handlers_on_every_logger_send_no_secret_to_the_prefect_api(tmp_path, engine):
    """Prefect's API handler put on ``skyvm`` after the secret was read (as PREFECT_LOGGING_EXTRA_LOGGERS
    does for a user who wants skyvm's logs in the UI), records with the secret on skyvm's loggers and
    on the run logger, exceptions quoting it, a node printing it: the API's logs hold each, masked."""
    import logging

    from prefect.logging import get_run_logger
    from prefect.logging.handlers import APILogHandler

    secret = marker("late")
    path = tmp_path / "skyvm.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"cpus": 0.5, "memory": 0.5, "prefect_engine": engine, "secrets": {"CANARY_TOKEN": secret}}}))
    @flow(task_runner=SkyVMTaskRunner(str(path)))
    def late_handlers():
        api = APILogHandler()  # made here: a flow holding a lock in its closure runs its tasks in body mode
        node = prints_and_raises.submit()  # the runner reads the secret here
        node.wait()
        skyvm_log = logging.getLogger("skyvm")
        skyvm_log.addHandler(api)
        try:
            for name in LATE_LOGGERS:
                logging.getLogger(name).warning("late %s on %s", secret, name)
            try:
                raise ValueError(f"an SDK error quoting {secret}")
            except ValueError:
                logging.getLogger("skyvm.connectors.aws").exception("late exception on skyvm.connectors.aws")
                get_run_logger().exception("late exception on the run logger")
            get_run_logger().info(f"run logger {secret}")
        finally:
            skyvm_log.removeHandler(api)
        return node.state.is_failed()

    flow_state = late_handlers(return_state=True)
    assert flow_state.is_completed() and flow_state.result() is True, flow_state  # the node failed, the flow went on

    logs = prefect_records(flow_state.state_details.flow_run_id)["api_logs"]
    assert secret not in logs, logs[-3000:]
    for name in LATE_LOGGERS:
        assert f"late *** on {name}" in logs, name
    assert logs.count("ValueError: an SDK error quoting ***") == 2 and "late exception on the run logger" in logs
    assert "run logger ***" in logs
    assert "the node's token is ***" in logs and "RuntimeError: failing with ***" in logs  # printed by the node
