"""Prefect's own task engine on the node (engine mode), and body mode beside it, against a real Prefect API
and real containers.

What a Prefect task uses works inside a skyvm task as in Prefect: the run logger, prefect.runtime,
artifacts, nested submissions, variables and events, each checked through the API.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
from prefect import flow, task
from prefect.states import StateType

from prefect_skyvm import SkyVMTaskRunner
from prefect_skyvm.flow_node import node_requirements
from skyvm.errors import SettingsError

SETTINGS = {"defaults": {"cpus": 0.5, "memory": 0.75, "prefect_engine": True}}


def read_from_api(read, ready, attempts=100):
    """What the API holds once ``ready`` says so (its services record logs and events a moment later)."""

    async def poll():
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            for _ in range(attempts):
                found = await read(client)
                if ready(found):
                    return found
                await asyncio.sleep(0.3)
            return found

    return asyncio.run(poll())


def task_run_logs(task_run_id, needle):
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    logs = read_from_api(
        lambda client: client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id]))),
        lambda logs: any(needle in log.message for log in logs),
    )
    return [log.message for log in logs]


@task
def square(x):
    return x * x


@task
def uses_prefect(x, variable_name, event_resource):
    import prefect.runtime.task_run
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact
    from prefect.events import emit_event
    from prefect.variables import Variable

    from skyvm.limits import container_limits

    get_run_logger().info("hello from the node %s", x)
    create_markdown_artifact(key=f"node-{event_resource.rsplit('.', 1)[-1]}", markdown=f"# made on the node for {x}")
    nested = square.submit(x).result()  # the node's own thread pool runs it
    emit_event(event="skyvm.test.on-node", resource={"prefect.resource.id": event_resource})
    return {
        "name": prefect.runtime.task_run.name,
        "nested": nested,
        "variable": Variable.get(variable_name),
        "cluster": container_limits()["cluster"],
    }


@flow
def earlier_flow():
    from prefect.events import emit_event

    emit_event(event="skyvm.test.earlier", resource={"prefect.resource.id": "skyvm.test.earlier"})


def test_prefect_inside_a_task_on_the_node():
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, TaskRunFilter, TaskRunFilterFlowRunId
    from prefect.events.filters import EventFilter, EventResourceFilter
    from prefect.variables import Variable

    token = uuid.uuid4().hex[:12]
    variable_name, event_resource = f"skyvm_var_{token}", f"skyvm.test.{token}"
    Variable.set(variable_name, f"value {token}")
    earlier_flow()  # this process's events worker is started (and keeps its context) no later than here

    @flow(task_runner=SkyVMTaskRunner(SETTINGS))
    def f():
        return uses_prefect.submit(7, variable_name, event_resource)

    state = f(return_state=True)
    task_state = state.result()
    got = task_state.result()
    task_run_id = task_state.state_details.task_run_id
    flow_run_id = state.state_details.flow_run_id

    assert got["cluster"]  # it ran in a skyvm cluster container, not in this process
    assert got["nested"] == 49 and got["variable"] == f"value {token}"

    runs = read_from_api(
        lambda client: client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id]))),
        lambda runs: len(runs) == 2 and all(r.state and r.state.is_final() for r in runs),
    )
    by_id = {r.id: r for r in runs}
    assert by_id[task_run_id].name == got["name"] and by_id[task_run_id].state.type == StateType.COMPLETED
    (nested,) = [r for r in runs if r.id != task_run_id]
    assert nested.name.startswith("square") and nested.state.type == StateType.COMPLETED
    assert task_run_id in {i.id for inputs in nested.task_inputs.values() for i in inputs}  # its parent is the node's task

    assert any("hello from the node 7" == m for m in task_run_logs(task_run_id, "hello from the node 7"))

    artifacts = read_from_api(
        lambda client: client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"node-{token}"]))),
        lambda found: len(found) == 1,
    )
    assert [(a.type, a.data, a.task_run_id) for a in artifacts] == [("markdown", "# made on the node for 7", task_run_id)]

    page = read_from_api(
        lambda client: client.read_events(EventFilter(resource=EventResourceFilter(id=[event_resource])), limit=50),
        lambda page: page.total >= 1,
    )
    assert [e.event for e in page.events] == ["skyvm.test.on-node"]
    related = {r.id for e in page.events for r in e.related}
    assert f"prefect.task-run.{task_run_id}" in related  # emitted inside the task run on the node
    # The flow, which the launcher read once for all its nodes (each node would read it from the API).
    flow_run = read_from_api(lambda client: client.read_flow_run(flow_run_id), lambda run: run is not None)
    assert f"prefect.flow.{flow_run.flow_id}" in related
    # Attached on the node: the launcher forwards events as they come. Only this flow run: the launcher's
    # events worker keeps the context of the flow run that started it (the one before, here), which a relayed
    # event must not pick up.
    assert {r for r in related if r.startswith("prefect.flow-run.")} == {f"prefect.flow-run.{flow_run_id}"}


def test_the_flows_related_objects_given_to_a_node_are_what_its_events_worker_names_without_reading_the_api():
    from prefect.client.schemas.objects import Flow, FlowRun
    from prefect.context import FlowRunContext
    from prefect.events.related import RESOURCE_CACHE, related_resources_from_run_context

    from prefect_skyvm import relay

    class NoAPI:  # the node's client: any read is a round trip the launcher's reading saved
        async def read_flow(self, flow_id):
            raise AssertionError(f"read the flow {flow_id} from the API")

    made = Flow(id=uuid.uuid4(), name="seeded-flow", tags=["from-the-launcher"])
    flow_run = FlowRun(id=uuid.uuid4(), name="seeded-run", flow_id=made.id)
    key = f"flow.{made.id}"
    try:
        relay.seed_related({key: made})
        with FlowRunContext.model_construct(flow_run=flow_run):
            related = asyncio.run(related_resources_from_run_context(NoAPI()))
    finally:
        RESOURCE_CACHE.pop(key, None)
    by_id = {r.id: r for r in related}
    assert by_id[f"prefect.flow.{made.id}"].role == "flow" and by_id[f"prefect.flow.{made.id}"]["prefect.resource.name"] == "seeded-flow"
    assert "prefect.tag.from-the-launcher" in by_id


@task
def logs_at_two_levels(token):
    from prefect import get_run_logger  # Prefect's top-level API: it imports prefect.main

    get_run_logger().info("quiet %s", token)
    get_run_logger().warning("loud %s", token)
    return token


def test_a_nodes_logs_follow_the_flows_logging_level_and_reach_the_task_run_once(monkeypatch):
    # PREFECT_LOGGING_LEVEL=WARNING where the flow runs keeps its tasks' INFO lines out of the API, as with
    # Prefect's own runners, on a warm cluster whose agent configured its logging from its own environment.
    from prefect.settings import PREFECT_LOGGING_LEVEL, temporary_settings

    from skyvm.backends.local import gc

    settings = {"defaults": {**SETTINGS["defaults"], "down": False, "labels": {"test": uuid.uuid4().hex[:12]}}}

    @flow(task_runner=SkyVMTaskRunner(settings))
    def f(token):
        return logs_at_two_levels.submit(token)

    def logged(token):
        task_state = f(token)
        assert task_state.result() == token
        return task_run_logs(task_state.state_details.task_run_id, f"loud {token}")

    try:
        first = uuid.uuid4().hex[:12]
        messages = logged(first)
        assert f"quiet {first}" in messages  # INFO: the agent's own level
        # Once each: not also as a console line in the node's output (which goes to the task run's logs).
        assert [m for m in messages if first in m] == [f"quiet {first}", f"loud {first}"], messages
        token = uuid.uuid4().hex[:12]
        monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "WARNING")  # as a user sets it, for the flow's process
        with temporary_settings(updates={PREFECT_LOGGING_LEVEL: "WARNING"}):
            messages = logged(token)  # the same warm cluster: its agent forks this node too
    finally:
        gc()  # the warm cluster: no run owns it now
    assert [m for m in messages if token in m] == [f"loud {token}"], messages
    assert not any("Finished in state" in m for m in messages), messages


@task
def logs_in_body_mode(x):
    from prefect import get_run_logger

    get_run_logger().warning("body mode says %s", x)
    return os.environ.get("SKYVM_ATTEMPT_ID") is not None


def test_body_mode_runs_the_function_and_its_run_logger_reaches_the_task_run_logs():
    # Body mode with Prefect in the image (the user's requirements): the run logger's records are the node's
    # output, streamed into the task run's logs by this process.
    runner = SkyVMTaskRunner(SETTINGS, prefect_engine=False, requirements=node_requirements())

    @flow(task_runner=runner)
    def f():
        return logs_in_body_mode.submit("hi")

    task_state = f()
    assert task_state.result() is True  # on a node
    messages = task_run_logs(task_state.state_details.task_run_id, "body mode says hi")
    assert [m for m in messages if "body mode says hi" in m], messages
    assert not any("running logs_in_body_mode with Prefect's engine" in m for m in messages)


def test_prefect_engine_true_on_skypilot_with_a_loopback_api_and_agents_off_fails_at_submit(monkeypatch):
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("SKYVM_AGENT", "0")  # no agent, no SSH connection to forward the API over

    runner = SkyVMTaskRunner({"defaults": {"backend": "skypilot", "cloud": "aws", "prefect_engine": True}})

    @flow(task_runner=runner)
    def f():
        square.submit(2)

    with pytest.raises(SettingsError) as info:
        f()
    text = str(info.value)
    assert "task 'square': nodes.square.prefect_engine" in text
    assert PREFECT_API_URL.value() in text
    assert "PREFECT_API_URL" in text and "prefect_engine: false" in text and "SKYVM_AGENT=0" in text


def test_prefect_engine_unset_on_skypilot_with_a_loopback_api_falls_back_to_body_mode_and_says_so():
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    flow_run_ids = []

    @flow(task_runner=SkyVMTaskRunner({"defaults": {"backend": "skypilot", "cloud": "aws"}}))
    def f():
        from prefect.context import FlowRunContext

        flow_run_ids.append(FlowRunContext.get().flow_run.id)
        square.submit(2)

    # Body mode goes on to the backend's own checks: this VM has no payload store it could reach.
    with pytest.raises(SettingsError, match="payload_store"):
        f()
    logs = read_from_api(
        lambda client: client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids))),
        lambda logs: any("body mode" in log.message for log in logs),
    )
    (line,) = [log.message for log in logs if "body mode" in log.message]
    # The URL itself is masked: it travels to nodes as a secret (it may hold a token).
    assert "skyvm: square runs in body mode" in line and "a skypilot node cannot reach the Prefect API at" in line


def test_a_node_that_never_runs_is_crashed_in_the_api():
    runner = SkyVMTaskRunner({"defaults": {"image": "127.0.0.1:1/skyvm-no-such-image:1", "prefect_engine": True}})

    @flow(task_runner=runner)
    def f():
        future = square.submit(3)
        future.wait()
        return future.state.type, future.state.message, future.task_run_id

    state_type, message, task_run_id = f()
    assert state_type == StateType.CRASHED and "skyvm-no-such-image:1" in message
    run = read_from_api(lambda client: client.read_task_run(task_run_id), lambda run: run.state is not None)
    assert run.state.type == StateType.CRASHED and run.name.startswith("square")


def test_a_flow_that_cannot_travel_runs_its_tasks_in_body_mode_and_says_so():
    import threading

    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    lock = threading.Lock()  # in the flow's closure: the flow cannot be pickled into a node's context
    flow_run_ids = []

    @flow(task_runner=SkyVMTaskRunner(SETTINGS))
    def f():
        from prefect.context import FlowRunContext

        flow_run_ids.append(FlowRunContext.get().flow_run.id)
        with lock:
            return square.submit(6).result()

    assert f() == 36  # the task ran all the same
    logs = read_from_api(
        lambda client: client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids))),
        lambda logs: any("body mode" in log.message for log in logs),
    )
    lines = [log.message for log in logs if "body mode" in log.message]
    assert len(lines) == 1 and "the tasks of flow 'f' run in body mode" in lines[0] and "cannot travel" in lines[0], lines
    assert not any("with Prefect's engine" in log.message for log in logs)


def test_a_nodes_api_client_is_made_at_its_first_use_and_closed_with_its_context():
    """A node's run contexts hold a client the engine only makes when the task reaches the API."""
    from prefect.client.orchestration import get_client
    from prefect.context import SettingsContext

    from prefect_skyvm.deferred_client import client_context, deferred_client

    settings_context = SettingsContext.get().serialize()
    unused = deferred_client(settings_context)
    with client_context(unused):
        assert get_client(sync_client=True) is unused  # what the engine and the task's code are handed
    assert unused._deferred is not None  # never used: never made, nothing to close

    used = deferred_client(settings_context)
    with client_context(used):
        assert used._deferred is not None
        assert used.hello().status_code == 200  # made here, against the real API, entered as its context was
        assert used._deferred is None and used._started and not used._closed
    assert used._closed  # closed with its context, as a client Prefect made would be


def test_a_flow_whose_module_imports_functions_of_other_user_modules_runs_its_tasks_on_the_node(tmp_path, monkeypatch):
    """The flow travels in every node's context, and with it what its function names: a plain function
    imported from another of the user's modules must travel by value too (the image has none of them), or
    the node cannot even load its payload (it was Crashed: "No module named ...")."""
    import importlib
    import sys

    tag = uuid.uuid4().hex[:8]
    (tmp_path / f"skyvm_util_{tag}.py").write_text("def plus_one(x):\n    return x + 1\n")
    (tmp_path / f"skyvm_tasks_{tag}.py").write_text("from prefect import task\n\n@task\ndef tenfold(x):\n    return x * 10\n")
    (tmp_path / f"skyvm_flow_{tag}.py").write_text(
        "from prefect import flow\n"
        "from prefect_skyvm import SkyVMTaskRunner\n"
        f"from skyvm_util_{tag} import plus_one\n"
        f"from skyvm_tasks_{tag} import tenfold\n\n"
        f"SETTINGS = {SETTINGS!r}\n\n"
        "@flow(task_runner=SkyVMTaskRunner(SETTINGS))\n"
        "def pipeline(x):\n"
        "    return tenfold.submit(plus_one(x)).result()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert importlib.import_module(f"skyvm_flow_{tag}").pipeline(4) == 50
    finally:
        for name in [m for m in sys.modules if m.endswith(tag)]:
            del sys.modules[name]
