"""Canary: every secret of an Airflow run is a unique marker, and none may surface where people look.

The ``skyvm`` connection holds the settings, which hold only references: the connector's keys
(``credentials: airflow:CONN``), node secrets (a literal value, env:, airflow:), and its own
password becomes the registry password. A node prints its secrets and AWS credentials and fails
with an exception that quotes one. After the run no marker may be in the captured logs (dag.test()
writes the task logs there; Airflow's log folder is read too), any row of any table of the metadata
DB (the connections that hold them aside), ``skyvm settings``, a TaskSpec's printable form, or
``ps`` and ``docker inspect`` taken while the node ran; what it printed must reach the log as
``***``; and the process environment is left as it was. A deferrable node does the same, its log
read back from the container by the trigger, a process that never resolved the secrets: the node
masks them at the source (its secret variables' names travel as SKYVM_SECRET_NAMES).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from test_clouds import cloud_dags, environment_changes, put_connections  # noqa: F401 - cloud_dags is a fixture

from engine_checks import Watch, canary_markers, leaked, marker  # noqa: E402 - tests/, shared by both engine suites

PRINTED = ("CANARY_LITERAL", "CANARY_FROM_ENV", "CANARY_FROM_CONN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
OWN_CONNECTIONS = ("canary_aws", "canary_token", "skyvm_canary")


def metadata_db(airflow_home: Path) -> str:
    """Every row of every table of the metadata DB as text, but the connection rows that hold the secrets."""
    import sqlalchemy
    from airflow import settings

    rows = []
    with settings.engine.connect() as db:
        for table in sqlalchemy.inspect(db).get_table_names():
            for row in db.execute(sqlalchemy.text(f'SELECT * FROM "{table}"')).mappings():
                if table == "connection" and row["conn_id"] in OWN_CONNECTIONS:
                    continue
                rows.append(f"{table}: {dict(row)}")
    return "\n".join(rows)


def task_log_files(airflow_home: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((airflow_home / "logs").rglob("*")) if p.is_file())


@pytest.fixture
def canary(s3_server, registry, monkeypatch) -> dict:
    """Unique markers for every secret, and the connections and settings that refer to them: (markers, settings)."""
    tag = uuid.uuid4().hex[:8]
    markers = canary_markers("aws_secret_key", "node_literal", "node_env", "node_conn", registry_password=os.environ["SKYVM_TEST_REGISTRY_PASSWORD"])
    monkeypatch.setenv("CANARY_NODE_ENV", markers["node_env"])
    settings = {
        "connectors": {"team": {"type": "aws", "method": "secret-key", "credentials": "airflow:canary_aws"}},
        "defaults": {
            "connector": "team",
            "cpus": 0.5,
            "memory": 0.5,
            "payload_store": f"s3://skyvm-test/airflow-canary-{tag}",
            "payload_store_endpoint": s3_server,
            "registry": {"server": registry.server},  # username and password: the skyvm connection's
            "secrets": {"CANARY_LITERAL": markers["node_literal"], "CANARY_FROM_ENV": "env:CANARY_NODE_ENV", "CANARY_FROM_CONN": "airflow:canary_token"},
        },
    }
    connections = [
        {"conn_id": "canary_aws", "conn_type": "aws", "login": "AKIACANARY" + tag.upper(), "password": markers["aws_secret_key"]},
        {"conn_id": "canary_token", "conn_type": "generic", "password": markers["node_conn"]},
        {"conn_id": "skyvm_canary", "conn_type": "skyvm", "login": registry.username, "password": markers["registry_password"], "extra": json.dumps({"settings": settings})},
    ]
    put_connections(*connections)
    return {"markers": markers, "settings": settings, "tag": tag, "connections": connections}


def captured_logs(caplog, capfd, airflow_home: Path) -> str:
    out = capfd.readouterr()
    return caplog.text + out.out + out.err + task_log_files(airflow_home)


def test_no_secret_of_a_failing_node_surfaces_anywhere(canary, registry, cloud_dags, airflow_db, tmp_path, monkeypatch, caplog, capfd):
    from airflow_skyvm.hooks.skyvm import SkyVMHook
    from skyvm.api import backend_for, prepare

    markers, settings = canary["markers"], canary["settings"]
    before = dict(os.environ)
    watch = Watch()

    dr = cloud_dags.canary_dag.test(run_conf={"port": watch.port})

    assert {ti.task_id: ti.state for ti in dr.get_task_instances()} == {"boom": "failed"}
    assert environment_changes(before) == set()
    logs = captured_logs(caplog, capfd, airflow_db)
    for name in PRINTED:
        assert f"{name}=***" in logs, name  # printed by the node, redacted on its way to the task log
    assert "boom: the literal secret is ***" in logs  # the exception, in Airflow's log and the remote traceback

    # The printable forms: `skyvm settings` and a TaskSpec of the same node (which does carry the values).
    path = tmp_path / "skyvm.yaml"
    path.write_text(yaml.safe_dump(settings))
    cli = subprocess.run([sys.executable, "-m", "skyvm.cli", "settings", str(path), "--node", "boom"], capture_output=True, text=True)
    assert cli.returncode == 0 and "CANARY_LITERAL" in cli.stdout, cli.stderr  # the secret's name is shown, not its value
    # Outside a task the Task SDK reads connections from the environment only: the same ones, there.
    for conn in canary["connections"]:
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn['conn_id'].upper()}", json.dumps({k: v for k, v in conn.items() if k != "conn_id"}))
    s = SkyVMHook("skyvm_canary").get_config().resolve("boom")
    _, spec = prepare("af-canary", "boom", f"boom-{canary['tag']}", s, b"payload", backend_for(s))
    assert {markers[k] for k in ("node_literal", "node_env", "node_conn")} <= set(spec.secrets.values())
    assert spec.registry_auth == (registry.username, markers["registry_password"])

    running = watch.result()
    # The node was seen: its exec's command, or the cluster's agent that forked it; never its values.
    assert "skyvm.node run" in running or "skyvm.agent" in running
    db = metadata_db(airflow_db)
    assert dr.run_id in db  # the dump reads the run's own DB
    found = leaked(
        markers,
        running=running,
        logs=logs,
        metadata_db=db,
        skyvm_settings=cli.stdout + cli.stderr,
        task_spec=json.dumps(spec.public_dict()),
    )
    assert not found, f"secret markers surfaced: {found}"


def test_a_deferred_node_leaves_no_secret_in_the_metadata_db_nor_in_its_log(canary, cloud_dags, airflow_db, caplog, capfd):
    markers = canary["markers"]

    dr = cloud_dags.canary_deferred_dag.test()

    assert {ti.task_id: ti.state for ti in dr.get_task_instances()} == {"boom_deferred": "failed"}
    # The trigger's row held where the node runs, never its secrets.
    db = metadata_db(airflow_db)
    assert dr.run_id in db and not leaked(markers, metadata_db=db)
    logs = captured_logs(caplog, capfd, airflow_db)
    # The trigger (in the triggerer) and execute_complete (in a resumed worker) log the node's log as the
    # container kept it; neither process resolved the secrets, so the node itself must have masked them.
    assert not leaked(markers, logs=logs)
    for name in PRINTED:
        assert f"{name}=***" in logs, f"{name} not in the log; its end:\n{logs[-3000:]}"


def test_a_supervised_task_writes_no_secret_to_its_task_log_file(airflow_db, tmp_path):
    """The worker's path: the task runs under Airflow's supervisor (supervised.py), which writes the task
    log file. The node prints the secret and fails; then the task logs it on skyvm's loggers, a library's
    and the operator's own (structlog) one, through a handler added only then, and fails quoting it. The
    file holds every one of those lines, masked, as does the late handler's."""
    import runpy

    here = Path(__file__).resolve().parent
    LATE_LOGGERS = runpy.run_path(str(here / "dags" / "skyvm_redact_dags.py"))["LATE_LOGGERS"]
    secret = marker("supervised")
    late_log = tmp_path / "late.log"
    env = {
        **os.environ,
        "CANARY_REDACT": secret,
        "CANARY_LATE_LOG": str(late_log),
        "AIRFLOW__CORE__EXECUTOR": "supervised.SupervisingExecutor",
        "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run([sys.executable, str(here / "supervised.py"), str(here / "dags" / "skyvm_redact_dags.py"), "skyvm_redact"], env=env, capture_output=True, text=True, timeout=600)

    assert 'STATES {"late_leaks": "failed"}' in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    task_log = "\n".join(p.read_text() for p in sorted((airflow_db / "logs" / "dag_id=skyvm_redact").rglob("*.log")))
    assert not leaked({"secret": secret}, task_log=task_log, late_handler=late_log.read_text(), worker_output=out.stdout + out.stderr)
    assert "the node prints ***" in task_log and "and fails with ***" in task_log  # the node's lines, as the operator logs them
    for name in LATE_LOGGERS:
        assert f"late *** on {name}" in task_log and f"{name}|late *** on {name}" in late_log.read_text(), name
    assert "the operator's own logger: ***" in task_log
    assert task_log.count("an SDK error quoting ***") >= 2  # the stdlib record's traceback and the operator's
    assert "the task fails quoting ***" in task_log  # Airflow's own "Task failed with exception"
