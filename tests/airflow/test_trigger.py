"""SkyVMTrigger in a triggerer: restarts keep the node, a user's kill stops it, faults are ridden out.

The DAGs run with dag.test() against the real metadata DB. Where dag.test() would run the trigger
inline, these tests run it the way `airflow triggerer` does: Airflow's own TriggerRunner of the
installed version (3.3: a user's action cancels with a message and calls the trigger's on_kill;
3.1: a plain cancel, then cleanup), with the in-process supervisor comms dag.test() gives a trigger,
and the task instance in the state a real deferral leaves it in (deferred).
"""

from __future__ import annotations

import asyncio
import datetime
import importlib
import json
import os
import subprocess
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from skyvm.api import NodeHandle
from skyvm.backends.base import JobState
from skyvm.backends.local import home_id, list_managed
from test_operator import run_dag, xcom


def running_containers(**match):
    """Running skyvm containers of this test run's SKYVM_HOME (`docker ps --filter label=dev.skyvm.managed=1`)."""
    out = subprocess.run(["docker", "ps", "--filter", "label=dev.skyvm.managed=1", "--filter", f"label=dev.skyvm.home={home_id()}", "--format", "{{json .}}"], capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    return [r["Names"] for r in rows if all(v in r.get(k, "") for k, v in match.items())]


def containers_of(dag_id):
    return [r for r in list_managed() if r["run_id"].startswith(f"af-{dag_id}-") and r["home"] == home_id()]


# -- a triggerer, as Airflow runs one ----------------------------------------------------------


def set_ti_state(key, state):
    """Set a task instance's state in the metadata DB; returns the triggerer's view of it (its workload DTO)."""
    from airflow.executors import workloads
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        ti = session.scalars(
            select(TaskInstance).where(
                TaskInstance.dag_id == key.dag_id, TaskInstance.task_id == key.task_id, TaskInstance.run_id == key.run_id, TaskInstance.map_index == key.map_index
            )
        ).one()
        ti.state = state
        session.flush()
        return workloads.TaskInstance.model_validate(ti, from_attributes=True)


@contextmanager
def supervisor_comms(task_sdk_ti):
    """The comms a trigger has for asking Airflow things (task states): in-process, as dag.test() sets them up."""
    import psutil
    import structlog
    from airflow.sdk.execution_time.supervisor import InProcessSupervisorComms, InProcessTestSupervisor, set_supervisor_comms

    supervisor = InProcessTestSupervisor(
        id=task_sdk_ti.id,
        pid=os.getpid(),
        process=psutil.Process(),
        process_log=structlog.get_logger(logger_name="task").bind(),
        client=InProcessTestSupervisor._api_client(),
    )
    supervisor.comms = InProcessSupervisorComms(supervisor=supervisor)
    with set_supervisor_comms(supervisor.comms):
        yield


class Triggerer:
    """One triggerer process: Airflow's TriggerRunner, driven the way its supervisor drives it."""

    def __init__(self):
        from airflow.jobs.triggerer_job_runner import TriggerRunner

        self.runner = TriggerRunner()

    def start(self, trigger_id, classpath, kwargs, ti, timeout_after=None):
        """Build the trigger from its stored (JSON) kwargs and run it, as for a RunTrigger workload."""
        module, name = classpath.rsplit(".", 1)
        trigger = getattr(importlib.import_module(module), name)(**json.loads(json.dumps(kwargs)))
        trigger.trigger_id = trigger_id
        trigger.task_instance = ti
        trigger.timeout_after = timeout_after
        task = asyncio.create_task(self.runner.run_trigger(trigger_id, trigger, timeout_after))
        self.runner.triggers[trigger_id] = {"task": task, "name": f"test/{ti.task_id} (ID {trigger_id})", "events": 0, "is_watcher": False}
        return task, trigger

    async def shut_down(self):
        """A triggerer stopping (restart, deploy, handing over): its trigger tasks are cancelled, no user action."""
        tasks = [d["task"] for d in self.runner.triggers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def user_action(self, trigger_id):
        """The task instance left deferred by a user's hand: the trigger row is gone, the triggerer cancels it."""
        task = self.runner.triggers[trigger_id]["task"]
        self.runner.to_cancel.append(trigger_id)
        await self.runner.cancel_triggers()
        await asyncio.gather(task, return_exceptions=True)

    def events(self):
        return [getattr(e, "event", None) or e[1] for e in self.runner.events]


@pytest.fixture
def inline_trigger(monkeypatch):
    """Replace dag.test()'s inline trigger run with a function of (trigger, task_sdk_ti) -> event."""
    import airflow.sdk.definitions.dag as dag_module

    def install(fn):
        monkeypatch.setattr(dag_module, "_run_inline_trigger", fn)

    return install


def run_deferred(dag, inline_trigger, scenario):
    """Run ``dag`` with dag.test(); where its task is deferred, ``await scenario(ctx)`` takes the place of the
    inline trigger run, with the task instance deferred as a real deferral leaves it. The scenario returns the
    event that resumes the task, or None: the task ended while deferred (dag.test() then records it failed)."""
    from airflow.utils.state import TaskInstanceState

    def run_inline(trigger, task_sdk_ti):
        classpath, kwargs = trigger.serialize()
        ti = set_ti_state(task_sdk_ti, TaskInstanceState.DEFERRED)
        ctx = SimpleNamespace(classpath=classpath, kwargs=kwargs, cluster=kwargs["node"]["cluster"], ti=ti, sdk_ti=task_sdk_ti)
        with supervisor_comms(task_sdk_ti):
            event = asyncio.run(scenario(ctx))
        if event is None:
            raise RuntimeError("the task ended while deferred")
        set_ti_state(task_sdk_ti, TaskInstanceState.QUEUED)  # where dag.test() expects it
        return event

    inline_trigger(run_inline)
    return run_dag(dag)


def node_state(kwargs):
    return NodeHandle.attach(kwargs["node"]).status().state


def wait_for_log(node: dict, text: str, timeout: float = 120) -> None:
    """Until the node's log shows ``text`` (its body runs), polling with a deadline."""
    deadline = time.monotonic() + timeout
    while text not in NodeHandle.attach(node).read_log(0)[0]:
        assert time.monotonic() < deadline, f"the node never printed {text!r}"
        time.sleep(0.2)


async def safe_to_cancel(trigger):
    """Airflow < 3.3's check, asked directly (None where the trigger has none)."""
    return await trigger.safe_to_cancel() if hasattr(trigger, "safe_to_cancel") else None


# -- (1) a triggerer restart mid-wait keeps the node; a fresh trigger finishes the task -------------


def test_triggerer_restart_keeps_the_node_and_a_fresh_trigger_completes_the_task(dags, inline_trigger):
    seen = {}

    async def restart_mid_wait(ctx):
        first = Triggerer()
        task, trigger = first.start(1, ctx.classpath, ctx.kwargs, ctx.ti)
        await asyncio.to_thread(wait_for_log, ctx.kwargs["node"], "restart-marker")
        seen["waiting"] = not task.done()
        await first.shut_down()  # run_trigger's finally calls cleanup(), as on every stop
        seen["after_stop"] = (running_containers(Names=ctx.cluster), await asyncio.to_thread(node_state, ctx.kwargs))
        seen["safe_to_cancel"] = await safe_to_cancel(trigger)
        second = Triggerer()  # the trigger row is still there: another triggerer starts it afresh
        task, _ = second.start(2, ctx.classpath, ctx.kwargs, ctx.ti)
        await asyncio.wait_for(task, timeout=120)
        seen["events"] = second.events()
        return seen["events"][0] if seen["events"] else None

    dag = dags.deferred_restart_dag
    dr, states = run_deferred(dag, inline_trigger, restart_mid_wait)
    assert seen["waiting"]
    containers, state = seen["after_stop"]
    assert containers and state is JobState.RUNNING, f"the triggerer's stop touched the node: {containers} {state}"
    assert seen["safe_to_cancel"] is False  # (Airflow < 3.3's check) the task is still deferred
    assert len(seen["events"]) == 1 and seen["events"][0].payload["status"] == "succeeded"
    assert states == {"waits": "success"}
    assert xcom(dr, "waits") == 42
    assert containers_of(dag.dag_id) == []


# -- (2) a user marking the deferred task failed stops the node; so does a deferral's timeout -----------


@pytest.mark.parametrize("ending", ["marked failed", "timed out"])
def test_a_deferred_task_marked_failed_or_timed_out_stops_the_node(dags, inline_trigger, ending):
    """Marked failed: Airflow 3.3 cancels the trigger for a user's action and calls its on_kill; 3.1 just
    cancels it, and the trigger asks for the task's state. Timed out (execution_timeout): the trigger is
    cancelled past its deadline (3.3 calls no on_kill then) and the task fails on a worker without
    execute_complete, so the trigger stops the node itself."""
    from airflow.utils.state import TaskInstanceState

    seen = {}
    timed_out = ending == "timed out"

    async def end_while_deferred(ctx):
        deadline = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=2) if timed_out else None
        triggerer = Triggerer()
        task, trigger = triggerer.start(1, ctx.classpath, ctx.kwargs, ctx.ti, timeout_after=deadline)
        await asyncio.to_thread(wait_for_log, ctx.kwargs["node"], "started")
        if timed_out:
            await asyncio.sleep(max(0.0, (deadline - datetime.datetime.now(datetime.timezone.utc)).total_seconds()))  # the deferral's deadline passes
        seen["before"] = (not task.done(), running_containers(Names=ctx.cluster))
        # The UI's "mark failed", or the scheduler's check_trigger_timeouts.
        set_ti_state(ctx.sdk_ti, TaskInstanceState.SCHEDULED if timed_out else TaskInstanceState.FAILED)
        seen["safe_to_cancel"] = await safe_to_cancel(trigger)
        await triggerer.user_action(1)  # the trigger row is gone: the triggerer cancels the trigger
        seen["after"] = running_containers(Names=ctx.cluster)

    dag = dags.deferred_marked_failed_dag
    dr, states = run_deferred(dag, inline_trigger, end_while_deferred)
    waiting, before = seen["before"]
    assert waiting and before, "the node was not running while deferred"
    assert seen["after"] == [], f"the deferred task ended ({ending}) but its node still runs: {seen['after']}"
    assert seen["safe_to_cancel"] in (True, None)  # Airflow says the task left deferred
    assert states == {"sleeper": "failed"}
    assert running_containers() == [], "skyvm containers still running"
    assert containers_of(dag.dag_id) == []


def test_which_hook_stops_the_node_matches_the_airflow_version():
    import airflow
    from packaging.version import Version

    from airflow_skyvm.triggers.skyvm import AIRFLOW_CALLS_TRIGGER_ON_KILL

    # 3.3 added BaseTrigger.on_kill (a user's action); before it, the trigger asks for the task's state.
    assert AIRFLOW_CALLS_TRIGGER_ON_KILL == (Version(airflow.__version__).release >= (3, 3))


# -- (3) execute_complete logs only what the trigger did not ---------------------------------------


def test_execute_complete_does_not_log_again_what_the_trigger_logged(dags, capfd, caplog):
    caplog.set_level("INFO")
    dr, states = run_dag(dags.deferred_log_once_dag)
    assert states == {"chatty": "success"}
    assert str(xcom(dr, "chatty")) == "5"
    out = capfd.readouterr()
    captured = {"stdout": out.out, "stderr": out.err, "logging": caplog.text}
    counts = {k: sum("skyvm-log-once-marker" in line and "echo" not in line for line in v.splitlines()) for k, v in captured.items()}
    # Each channel carries the line once (the trigger logged it); execute_complete must not log it again.
    assert max(counts.values()) == 1, counts


# -- (4) a cluster that does not answer for a moment does not end the task ------------------------


def test_a_briefly_unreachable_cluster_does_not_end_the_task(dags, inline_trigger):
    """A real fault: for 4 s the node's container cannot be reached by its name (`docker rename`), as a
    cluster whose address does not answer (the backend reads it unreachable or gone); the node itself
    runs on. (`docker pause` is no use here: a `docker exec` racing a pause can wedge this Docker engine.)"""
    import airflow.sdk.definitions.dag as dag_module

    original = dag_module._run_inline_trigger
    seen = {}

    def hide(trigger):
        cluster = trigger.node["cluster"]
        wait_for_log(trigger.node, "unreachable-marker")
        subprocess.run(["docker", "rename", cluster, f"{cluster}-away"], check=True, capture_output=True)
        hidden_at = time.time()
        try:
            seen["status while away"] = NodeHandle.attach(trigger.node).status()
            time.sleep(max(0.0, 4.0 - (time.time() - hidden_at)))
        finally:
            subprocess.run(["docker", "rename", f"{cluster}-away", cluster], check=True, capture_output=True)
            seen["away for"] = time.time() - hidden_at

    def with_an_unreachable_cluster(trigger, task_sdk_ti):
        thread = threading.Thread(target=hide, args=(trigger,))
        thread.start()
        try:
            seen["event"] = original(trigger, task_sdk_ti)
            return seen["event"]
        finally:
            thread.join()

    inline_trigger(with_an_unreachable_cluster)
    dag = dags.deferred_unreachable_dag
    dr, states = run_dag(dag)
    away = seen["status while away"]  # the fault was real: the backend could not reach the cluster
    assert seen["away for"] >= 4 and (away.state.name == "GONE" or "unreachable" in away.detail), away
    assert seen["event"].payload["status"] == "succeeded"
    assert seen["event"].payload["unanswered_checks"] >= 2  # the trigger met it, and rode it out
    assert states == {"unreachable": "success"}
    assert xcom(dr, "unreachable") == 8
    assert containers_of(dag.dag_id) == []


# -- errors are events: a cluster that stays gone fails the task with the node and the fix ----------


def test_a_gone_cluster_fails_the_task_with_the_node_and_the_fix(dags, inline_trigger, caplog, capfd, monkeypatch):
    import airflow.sdk.definitions.dag as dag_module

    from airflow_skyvm.triggers.skyvm import SkyVMTrigger

    caplog.set_level("INFO")
    monkeypatch.setattr(SkyVMTrigger, "status_backoff", (0.2, 1.0), raising=False)  # five checks in a row, sooner
    original = dag_module._run_inline_trigger
    events = []

    def remove_cluster_then_wait(trigger, task_sdk_ti):
        def remove():
            wait_for_log(trigger.node, "here")
            subprocess.run(["docker", "rm", "-f", trigger.node["cluster"]], check=True, capture_output=True)

        thread = threading.Thread(target=remove)
        thread.start()
        try:
            event = original(trigger, task_sdk_ti)  # a trigger exception would propagate from here
        finally:
            thread.join()
        events.append(event)
        return event

    inline_trigger(remove_cluster_then_wait)
    dag = dags.deferred_gone_dag
    dr, states = run_dag(dag)
    assert states == {"vanishes": "failed"}
    assert len(events) == 1 and events[0].payload["status"] == "error"
    message = events[0].payload["message"]
    assert "node 'vanishes'" in message and "did not answer 5 status checks in a row" in message and "Fix:" in message
    out = capfd.readouterr()
    assert "counts as gone" in out.out + out.err + caplog.text  # execute_complete raised it into the task log
    assert containers_of(dag.dag_id) == []
