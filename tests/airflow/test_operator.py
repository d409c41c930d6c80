"""SkyVMOperator, @task.skyvm and the deferrable trigger, run with dag.test() against a real metadata DB."""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_skyvm import get_provider_info
from airflow_skyvm.exceptions import AirflowException, SkyVMNodeFailedException
from airflow_skyvm.operators.skyvm import SkyVMOperator
from skyvm.backends.local import home_id, list_managed
from skyvm.errors import NodeFailed, SettingsError

def run_dag(dag):
    dr = dag.test()
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    return dr, states


def xcom(dr, task_id, key="return_value"):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    query = dict(run_id=dr.run_id, dag_ids=dr.dag_id, task_ids=task_id, key=key)
    with create_session() as session:
        try:  # Airflow 3.3: a Select to run
            rows = session.scalars(XComModel.get_many(**query)).all()
        except TypeError:  # Airflow 3.1: a Query bound to a session
            rows = XComModel.get_many(**query, session=session).all()
        assert rows, f"no XCom {key!r} from {task_id}"
        return XComModel.deserialize_value(rows[0])


def af_containers(dag_id):
    # This run's containers only (its skyvm home): another run on the same engine is not ours to judge.
    return [r for r in list_managed() if r["run_id"].startswith(f"af-{dag_id}-") and r["home"] == home_id()]


def double(x):
    return 2 * int(x)


def test_provider_info_lists_everything():
    info = get_provider_info()
    assert info["connection-types"][0]["connection-type"] == "skyvm"
    assert info["task-decorators"] == [{"name": "skyvm", "class-name": "airflow_skyvm.decorators.skyvm.skyvm_task"}]
    assert info["executors"] == ["airflow_skyvm.executors.skyvm_executor.SkyVMExecutor"]
    from airflow.providers_manager import ProvidersManager

    assert "skyvm" in ProvidersManager().providers


def test_xcom_between_two_tasks_and_templates(dags):
    dag = dags.xcom_dag
    dr, states = run_dag(dag)
    assert states == {"first": "success", "second": "success", "shout": "success"}
    assert xcom(dr, "first") == 42 and xcom(dr, "second") == 84
    assert xcom(dr, "shout") == f"run {dag.dag_id} got 84"  # a command's XCom is its last line
    assert af_containers(dag.dag_id) == []


def test_per_task_limits_seen_inside(dags):
    dr, states = run_dag(dags.limits_dag)
    assert set(states.values()) == {"success"}
    seen = {t: xcom(dr, t) for t in ("from_yaml", "profiled", "inline")}
    assert (seen["from_yaml"]["cpus"], seen["from_yaml"]["memory_gib"]) == (0.75, 0.25)
    assert (seen["profiled"]["cpus"], seen["profiled"]["memory_gib"]) == (1.5, 0.75)
    assert (seen["inline"]["cpus"], seen["inline"]["memory_gib"]) == (1.25, 0.5)
    assert all(s["cluster"] for s in seen.values())


def test_failure_fails_the_task_with_the_remote_traceback_and_honours_retries(dags, capfd, caplog):
    import shutil

    counter = Path(dags.COUNTER_DIR)
    shutil.rmtree(counter, ignore_errors=True)
    counter.mkdir()
    dr, states = run_dag(dags.fails_dag)
    assert states == {"flaky": "failed"}
    attempts = (counter / "attempts").read_text().split()
    assert len(attempts) == 2 and len(set(attempts)) == 2  # the first try and one retry, each a fresh node
    out = capfd.readouterr()
    text = out.out + out.err + caplog.text
    assert "ValueError: remote failure number 2" in text
    assert "in count_and_fail" in text  # the remote traceback reached the task log
    assert af_containers(dags.fails_dag.dag_id) == []


def test_deferrable_mode_completes(dags):
    dr, states = run_dag(dags.deferred_dag)
    assert states == {"deferred": "success", "deferred_py": "success"}
    # (the metadata DB keeps XComs as JSON text: a digit string reads back as a number here)
    assert str(xcom(dr, "deferred")) == "99" and xcom(dr, "deferred_py") == 10
    assert af_containers(dags.deferred_dag.dag_id) == []


def test_execution_timeout_kills_the_node_and_leaves_no_container(dags):
    dr, states = run_dag(dags.killed_dag)
    assert states == {"sleeper": "failed"}
    assert af_containers(dags.killed_dag.dag_id) == []


def test_task_skyvm_decorator(dags):
    dr, states = run_dag(dags.decorated_dag)
    assert set(states.values()) == {"success"}
    assert xcom(dr, "add") == {"sum": 5, "cpus": 1.25}
    assert xcom(dr, "report") == "5 on 1.5 CPUs"


def test_bad_settings_fail_at_parse_time():
    with pytest.raises(SettingsError, match="sky_settings.cpu: unknown field 'cpu'"):
        SkyVMOperator(task_id="typo", python_callable=double, sky_settings={"cpu": 2})
    with pytest.raises(ValueError, match="exactly one of python_callable or bash_command"):
        SkyVMOperator(task_id="neither")


def fail_loudly():
    raise ValueError("This task is expected to fail")


def test_a_failed_node_raises_an_airflow_exception_carrying_the_remote_traceback(dags):
    """As the Docker provider's test_failing_task: an AirflowException, the error line in the task log."""
    from types import SimpleNamespace

    from structlog.testing import capture_logs

    op = SkyVMOperator(task_id="fails_loudly", python_callable=fail_loudly)
    ti = SimpleNamespace(dag_id="skyvm_direct", run_id="manual-1", task_id=op.task_id, map_index=-1)
    with capture_logs() as records, pytest.raises(AirflowException) as info:
        op.execute({"ti": ti})
    err = info.value
    assert isinstance(err, SkyVMNodeFailedException) and isinstance(err, NodeFailed)  # `except NodeFailed` still catches it
    assert err.exc_type == "ValueError" and err.exit_code is None
    assert "in fail_loudly" in err.remote_traceback and "in fail_loudly" in str(err)
    assert "ValueError: This task is expected to fail" in err.logs
    # Streamed to the task log line by line, as the operator's own records.
    assert "ValueError: This task is expected to fail" in [r["event"] for r in records]
    assert af_containers("skyvm_direct") == []


def test_a_node_that_cannot_run_raises_an_airflow_exception_naming_the_cause(dags):
    """Not the user's code but the node's infrastructure (here: an image this engine lacks): still
    Airflow's kind of exception, and still skyvm's InfrastructureError, naming the node and the image."""
    from types import SimpleNamespace

    from airflow_skyvm.exceptions import SkyVMInfrastructureException
    from skyvm.errors import InfrastructureError

    op = SkyVMOperator(task_id="no_image", python_callable=double, op_args=[1], image="skyvm-no-such-image:404")
    ti = SimpleNamespace(dag_id="skyvm_direct_infra", run_id="manual-1", task_id=op.task_id, map_index=-1)
    with pytest.raises(AirflowException) as info:
        op.execute({"ti": ti})
    err = info.value
    assert isinstance(err, SkyVMInfrastructureException) and isinstance(err, InfrastructureError)
    assert "no_image" in str(err) and "skyvm-no-such-image:404" in str(err)
    assert af_containers("skyvm_direct_infra") == []


def test_skip_on_exit_code_as_the_docker_provider_has_it(dags, capfd):
    dr, states = run_dag(dags.skip_dag)
    expected = {task_id: state for task_id, (_, _, state) in dags.SKIP_CASES.items()}
    expected.update(command_skipped="skipped", command_failed="failed", deferred_skipped="skipped", deferred_failed="failed")
    assert states == expected
    out = capfd.readouterr()
    text = out.out + out.err
    assert "exited with code 42, listed in skip_on_exit_code [42, 43]" in text
    assert "SkyVMNodeFailedException" in text  # the failed ones raised Airflow's kind of exception
    assert af_containers(dags.skip_dag.dag_id) == []


def test_a_node_raising_keyboard_interrupt_or_system_exit_fails_only_its_task(dags, capfd, caplog):
    dr, states = run_dag(dags.base_exceptions_dag)  # returns: the process that ran the DAG is not stopped
    assert states == {
        "keyboard_interrupt": "failed",
        "system_exit": "failed",
        "system_exit_skipped": "skipped",
        "interrupted_deferred": "failed",
        "after": "success",  # trigger_rule all_done: the run went on
    }
    assert dr.state == "success"  # decided by its leaf, which ran: nothing stopped the run
    out = capfd.readouterr()
    text = out.out + out.err + caplog.text
    assert "KeyboardInterrupt: interrupted on the node" in text and "in interrupted" in text  # the remote traceback
    assert "SystemExit: 3" in text
    assert af_containers(dags.base_exceptions_dag.dag_id) == []


def test_bad_skip_on_exit_code_fails_at_parse_time():
    with pytest.raises(TypeError, match=r"task 'typo': skip_on_exit_code: expected an exit code \(an int\) or a list of them, e.g. 100 or \[100, 101\]; got '100'"):
        SkyVMOperator(task_id="typo", bash_command="true", skip_on_exit_code="100")
    from airflow.sdk import DAG, task

    with DAG("skyvm_bad_skip", schedule=None), pytest.raises(TypeError, match=r"task 'listed': skip_on_exit_code: .*got \[1, 2.5\]"):

        @task.skyvm(skip_on_exit_code=[1, 2.5])
        def listed():
            return 1

        listed()
