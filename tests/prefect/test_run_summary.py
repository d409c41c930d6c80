"""What happened, where a Prefect user looks: each flow run on SkyVMTaskRunner gets a table artifact of its
nodes (placement, limits, duration, price, cost) and the run's total, read back through a real API."""

from __future__ import annotations

import asyncio

from prefect import flow, task

from prefect_skyvm import SkyVMTaskRunner


@task
def double(x):
    return 2 * x


def flow_run_artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return asyncio.run(read())


@flow
def earlier():
    from prefect.events import emit_event

    emit_event(event="skyvm.test.earlier", resource={"prefect.resource.id": "skyvm.test.earlier"})


def test_a_flow_run_gets_a_table_artifact_of_its_nodes():
    @flow(task_runner=SkyVMTaskRunner({"defaults": {"cpus": 0.5, "memory": 0.75}}))
    def pipeline():
        return [f.result() for f in double.map([1, 2])]

    earlier()  # this process's events worker is started (and keeps its context) no later than here
    state = pipeline(return_state=True)
    assert state.result() == [2, 4]
    (artifact,) = [a for a in flow_run_artifacts(state.state_details.flow_run_id) if a.key == "skyvm-nodes"]
    assert artifact.type == "table"
    rows = artifact.data if isinstance(artifact.data, list) else __import__("json").loads(artifact.data)
    assert sorted(r["node"] for r in rows) == ["double", "double"]
    for row in rows:
        assert row["placement"].startswith("local (") and row["backend"] == "local"
        assert "cpus=0.5" in row["limits"] and "memory=0.75" in row["limits"]
        assert row["duration_s"] >= 0 and row["cost"] == 0.0
    assert "2 node(s)" in artifact.description and "total $0.000000" in artifact.description

    # Its "created" event names no other flow run: this process's events worker started in an earlier one.
    from prefect.events.filters import EventFilter, EventResourceFilter

    async def created_events():
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            for _ in range(100):
                page = await client.read_events(EventFilter(resource=EventResourceFilter(id=[f"prefect.artifact.{artifact.id}"])), limit=10)
                if page.total:
                    return page.events
                await asyncio.sleep(0.3)
        return []

    (event,) = asyncio.run(created_events())
    assert event.event == "prefect.artifact.created"
    assert {r.id for r in event.related if r.id.startswith("prefect.flow-run.")} <= {f"prefect.flow-run.{state.state_details.flow_run_id}"}


@task
def tiny(x):
    return x + 1


def test_a_first_builds_progress_is_in_the_task_runs_log():
    """A node whose image is new (requirements no other test uses): the build's progress lines reach the
    task run's own log through the API, start and end with its time (their timing is not asserted)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    settings = {"defaults": {"cpus": 0.5, "memory": 0.5, "prefect_engine": False, "requirements": ["six"]}}

    @flow(task_runner=SkyVMTaskRunner(settings))
    def builds():
        future = tiny.submit(1)
        return future.result(), future.task_run_id

    value, task_run_id = builds()
    assert value == 2

    async def read():
        async with get_client() as client:
            for _ in range(50):
                logs = await client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])))
                messages = [log.message for log in logs]
                if any("done in" in m for m in messages):
                    return messages
                await asyncio.sleep(0.3)
            return messages

    messages = asyncio.run(read())
    building = [m for m in messages if m.startswith("building ")]
    assert any(m.endswith(": started") for m in building), messages
    assert any(": done in " in m for m in building), messages
