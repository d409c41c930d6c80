"""prefect-dask's own task-runner suite, run against SkyVMTaskRunner (issue 19).

Upstream: PrefectHQ/prefect, src/integrations/prefect-dask/tests/test_task_runners.py at commit
06e9d5f0d9173c8dab4c6de5a14161759759fc55 (the 3.x line the installed Prefect 3.9 belongs to).
Each test keeps upstream's name, tasks, flows and assertions; the runner under test is
``SkyVMTaskRunner`` on the local Docker backend, every task a node in a container, against the
session's real Prefect API (tests/prefect/conftest.py). One runner serves the module, as upstream's
fixture gives every test a runner of the same kind; flows share warm clusters (tests/prefect/peer_suite.py).
The tests that prefect-ray's suite has with the same body run here only (see test_peer_ray_suite.py).

Changed from upstream, and why:
- the ``task_runner`` fixture: upstream parametrizes four Dask clusters (default, an existing
  cluster's address, processes, threads), which are Dask's own ways to start; here it is one runner.
- PYTEST_DONT_REWRITE: pytest rewrites a test module's asserts into calls of ``_pytest``, and the
  tasks and flows below travel to the node by value (a node's image has no pytest), as they travel
  to Dask's and Ray's workers, which have it. Plain asserts here, for that reason only.
- async tests run on anyio's pytest plugin (upstream: pytest-asyncio's auto mode); not installed here.
- test_wait_captures_exceptions_as_crashed_state: upstream skips it for a Dask cluster of processes
  (the interrupt aborts the run there); a node is its own process, so it always runs.
- test_worker_loss_exhaustion_marks_task_run_crashed: upstream loses its Dask worker to an OOM with
  ``allowed-failures`` 1. Here the node's own container is killed mid-task (found as one of this
  session's running skyvm clusters, by the name the task reports from inside it; no other container
  is touched). Its runner asks for 0.25 GiB (upstream: ``memory_limit="256 MiB"``), its own cluster,
  with ``down: true``; beyond upstream, the test asserts the lost cluster is not left behind.
- test_nested_task_submission: upstream asserts ``PrefectDaskFuture`` for both futures; here any
  ``PrefectFuture`` (the outer one is the runner's, the nested one the node's own task runner's).

Dropped (about Dask itself, not about a task runner):
- test_dask_task_key_has_prefect_task_name: the key of a Dask future.
- test_dask_cluster_adapt_is_properly_called: Dask's ``adapt_kwargs`` and cluster classes.
- test_string_cluster_class_is_properly_instantiated: ``DaskTaskRunner(cluster_class=...)``.
- test_successful_dataframe_flow_run: dask.dataframe collections computed across tasks.
- test_performance_report_generation: Dask's performance report file.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from typing import List

import pytest
from prefect import flow, task
from prefect.assets import Asset, materialize
from prefect.client.orchestration import get_client
from prefect.context import get_run_context
from prefect.futures import PrefectFuture, as_completed
from prefect.server.schemas.states import StateType

import peer_suite
from peer_suite import warm_clusters_removed  # noqa: F401 - the session's warm clusters go at its end
from prefect_skyvm import SkyVMTaskRunner
from skyvm.backends.local import list_managed

# Upstream runs its coroutine tests with pytest-asyncio's auto mode; anyio's plugin does it here.
pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def task_runner() -> SkyVMTaskRunner:
    return peer_suite.runner()


@task
def task_c(b: str):
    """Upstream's task_c of the successful and the failing flow (in the failing one it must not run)."""
    return b + "c"


@task
def stamp():
    """Upstream's task_a, task_b and task_c of the wait_for tests, one body: when the node ran it."""
    return time.time()


class TestDaskTaskRunner:
    async def test_duplicate(self, task_runner: SkyVMTaskRunner):
        copy = task_runner.duplicate()
        assert copy == task_runner
        assert copy is not task_runner

    async def test_successful_flow_run(self, task_runner: SkyVMTaskRunner):
        @task
        def task_a():
            return "a"

        @task
        def task_b():
            return "b"

        @flow(version="test", task_runner=task_runner)
        def test_flow():
            a = task_a.submit()
            b = task_b.submit()
            c = task_c.submit(b)
            return a, b, c

        a, b, c = test_flow()
        assert await a.result() == "a"
        assert await b.result() == "b"
        assert await c.result() == "bc"

    async def test_failing_flow_run(self, task_runner: SkyVMTaskRunner):
        @task
        def task_a():
            raise RuntimeError("This task fails!")

        @task
        def task_b():
            raise ValueError("This task fails and passes data downstream!")

        @flow(version="test", task_runner=task_runner)
        def test_flow():
            a = task_a.submit()
            b = task_b.submit()
            c = task_c.submit(b)
            d = task_c.submit(c)
            return a, b, c, d

        state = test_flow(return_state=True)

        assert state.is_failed()
        a, b, c, d = await state.result(raise_on_failure=False)
        with pytest.raises(RuntimeError, match="This task fails!"):
            await a.result()
        with pytest.raises(ValueError, match="This task fails and passes data downstream"):
            await b.result()
        for upstream, downstream in ((b, c), (c, d)):
            assert downstream.is_pending()
            assert downstream.name == "NotReady"
            assert f"Upstream task run '{upstream.state_details.task_run_id}' did not reach a 'COMPLETED' state" in downstream.message

    async def test_async_tasks(self, task_runner: SkyVMTaskRunner):
        @task
        async def task_a():
            return "a"

        @task
        async def task_b():
            return "b"

        @task
        async def task_c(b):
            return b + "c"

        @flow(version="test", task_runner=task_runner)
        async def test_flow():
            a = task_a.submit()
            b = task_b.submit()
            c = task_c.submit(b)
            return a, b, c

        a, b, c = await test_flow()
        assert await a.result() == "a"
        assert await b.result() == "b"
        assert await c.result() == "bc"

    async def test_submit_and_wait(self, task_runner: SkyVMTaskRunner):
        @task
        async def task_a():
            return "a"

        with task_runner:
            future = task_runner.submit(task_a, parameters={}, wait_for=[])
            future.wait()
            assert await future.state.result() == "a"

    async def test_async_task_timeout(self, task_runner: SkyVMTaskRunner):
        @task(timeout_seconds=0.1)
        async def my_timeout_task():
            await asyncio.sleep(2)
            return 42

        @task
        async def my_dependent_task(task_res):
            return 1764

        @task
        async def my_independent_task():
            return 74088

        @flow(version="test", task_runner=task_runner)
        async def test_flow():
            a = my_timeout_task.submit()
            b = my_dependent_task.submit(a)
            c = my_independent_task.submit()
            return a, b, c

        state = await test_flow(return_state=True)

        assert state.is_failed()
        ax, bx, cx = await state.result(raise_on_failure=False)
        assert ax.type == StateType.FAILED
        assert bx.type == StateType.PENDING
        assert cx.type == StateType.COMPLETED

    async def test_sync_task_timeout(self, task_runner: SkyVMTaskRunner):
        @task(timeout_seconds=1)
        def my_timeout_task():
            time.sleep(2)
            return 42

        @task
        def my_dependent_task(task_res):
            return 1764

        @task
        def my_independent_task():
            return 74088

        @flow(version="test", task_runner=task_runner)
        def test_flow():
            a = my_timeout_task.submit()
            b = my_dependent_task.submit(a)
            c = my_independent_task.submit()
            return a, b, c

        state = test_flow(return_state=True)

        assert state.is_failed()
        ax, bx, cx = await state.result(raise_on_failure=False)
        assert ax.type == StateType.FAILED
        assert bx.type == StateType.PENDING
        assert cx.type == StateType.COMPLETED

    def test_as_completed_yields_correct_order(self, task_runner: SkyVMTaskRunner):
        sleep_task = peer_suite.sleep_task
        timings = [1, 5, 10]
        with task_runner:
            futures = [task_runner.submit(sleep_task, parameters={"seconds": s}, wait_for=[]) for s in reversed(timings)]
            done = [future.result() for future in as_completed(futures=futures)]
            assert done == timings

    async def test_wait_captures_exceptions_as_crashed_state(self, task_runner: SkyVMTaskRunner):
        """An interrupt raised by the task's code is the task's crash, not the caller's: wait() does not re-raise."""

        @task
        def task_a():
            raise KeyboardInterrupt()

        with task_runner:
            future = task_runner.submit(task=task_a, parameters={}, wait_for=[])
            future.wait()
            assert future.state.type == StateType.CRASHED

    def test_worker_loss_exhaustion_marks_task_run_crashed(self):
        @task
        def lost_worker_task(port: int):
            import os
            import socket
            import time

            # Tells the test which cluster runs it, then works on until that cluster is killed.
            with socket.create_connection(("127.0.0.1", port), timeout=300) as conn:
                conn.sendall(os.environ["SKYVM_CLUSTER"].encode())
                time.sleep(600)

        task_runner = peer_suite.runner(memory=0.25, down=True)

        with task_runner, socket.create_server(("127.0.0.1", 0)) as server:
            server.settimeout(300)
            future = task_runner.submit(lost_worker_task, parameters={"port": server.getsockname()[1]}, wait_for=[])
            conn, _ = server.accept()
            with conn:
                conn.settimeout(300)
                cluster = conn.recv(256).decode()
                running = {row["name"] for row in list_managed() if row["state"] == "running"}
                assert cluster in running, f"the task ran in {cluster!r}, not in one of this session's clusters {sorted(running)}"
                subprocess.run(["docker", "kill", cluster], check=True, capture_output=True)
            future.wait()
            assert future.state.type == StateType.CRASHED
        # Beyond upstream: the lost cluster is not left behind (down: true) once the runner is left.
        assert cluster not in {row["name"] for row in list_managed()}

    class TestInputArguments:
        async def test_dataclasses_can_be_passed_to_task_runners(self, task_runner: SkyVMTaskRunner):
            """Regression test of https://github.com/PrefectHQ/prefect/issues/6905."""
            from dataclasses import dataclass

            @dataclass
            class Foo:
                value: int

            @task
            def get_dataclass_values(n: int):
                return [Foo(value=i) for i in range(n)]

            @task
            def print_foo(x: Foo) -> Foo:
                print(x)
                return x

            @flow(task_runner=task_runner)
            def test_dask_flow(n: int = 3) -> List[Foo]:
                foos = get_dataclass_values(n)
                future = print_foo.submit(foos[0])
                futures = print_foo.map(foos)
                return [fut.result() for fut in futures + [future]]

            assert test_dask_flow() == [Foo(value=i) for i in range(3)] + [Foo(value=0)]

    def test_nested_task_submission(self, task_runner: SkyVMTaskRunner):
        @task
        def nested_task():
            return "nested task"

        @task
        def parent_task():
            nested_task_future = nested_task.submit()
            assert isinstance(nested_task_future, PrefectFuture)
            return nested_task_future.result()

        @flow(task_runner=task_runner)
        def umbrella_flow():
            future = parent_task.submit()
            assert isinstance(future, PrefectFuture)
            return future.result()

        assert umbrella_flow() == "nested task"

    def test_state_dependencies_via_wait_for(self, task_runner: SkyVMTaskRunner):
        task_a, task_b = stamp.with_options(name="task_a"), stamp.with_options(name="task_b")

        @flow(task_runner=task_runner)
        def test_flow() -> tuple[float, float]:
            a = task_a.submit()
            b = task_b.submit(wait_for=[a])
            return a.result(), b.result()

        a_time, b_time = test_flow()

        assert b_time > a_time, "task_b timestamp should be after task_a timestamp"

    def test_state_dependencies_via_wait_for_disparate_upstream_tasks(self, task_runner: SkyVMTaskRunner):
        task_a, task_b, task_c = (stamp.with_options(name=name) for name in ("task_a", "task_b", "task_c"))

        @flow(task_runner=task_runner)
        def test_flow() -> tuple[float, float, float]:
            a = task_a.submit()
            b = task_b.submit()
            c = task_c.submit(wait_for=[a, b])
            return a.result(), b.result(), c.result()

        a_time, b_time, c_time = test_flow()

        assert c_time > a_time and c_time > b_time

    async def test_assets_with_task_runner(self, task_runner: SkyVMTaskRunner):
        upstream = Asset(key="s3://data/dask_raw")
        downstream = Asset(key="s3://data/dask_processed")

        @materialize(upstream)
        async def extract():
            return {"rows": 50}

        @materialize(downstream)
        async def load(d):
            return {"rows": d["rows"] * 2}

        @flow(version="test", task_runner=task_runner)
        async def pipeline():
            run_context = get_run_context()
            raw_data = extract.submit()
            processed = load.submit(raw_data)
            processed.wait()
            return run_context.flow_run.id

        flow_run_id = await pipeline()

        async with get_client() as client:
            for _ in range(5):
                response = await client._client.post(
                    "/events/filter",
                    json={"filter": {"event": {"prefix": ["prefect.asset."]}, "related": {"id": [f"prefect.flow-run.{flow_run_id}"]}}},
                )
                response.raise_for_status()
                asset_events = response.json().get("events", [])
                if len(asset_events) >= 3:
                    break
                await asyncio.sleep(2)  # the server may not have stored the events yet
            else:
                raise RuntimeError("Unable to get any events from server!")

        assert len(asset_events) == 3

        def about(key):
            return [e for e in asset_events if e.get("resource", {}).get("prefect.resource.id") == key]

        upstream_events, downstream_events = about(upstream.key), about(downstream.key)
        # The upstream asset: one materialization and one reference (by load); the downstream one: its materialization.
        assert len(upstream_events) == 2
        assert len(downstream_events) == 1
        upstream_mat = [e for e in upstream_events if e["event"] == "prefect.asset.materialization.succeeded"]
        upstream_ref = [e for e in upstream_events if e["event"] == "prefect.asset.referenced"]
        assert len(upstream_mat) == 1
        assert len(upstream_ref) == 1
        assert upstream_mat[0]["resource"]["prefect.resource.id"] == upstream.key
        assert upstream_ref[0]["resource"]["prefect.resource.id"] == upstream.key

        (downstream_event,) = downstream_events
        assert downstream_event["event"] == "prefect.asset.materialization.succeeded"
        assert downstream_event["resource"]["prefect.resource.id"] == downstream.key
        related_assets = [r for r in downstream_event["related"] if r.get("prefect.resource.role") == "asset"]
        assert len(related_assets) == 1
        assert related_assets[0]["prefect.resource.id"] == upstream.key
