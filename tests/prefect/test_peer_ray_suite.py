"""prefect-ray's own task-runner suite, run against SkyVMTaskRunner (issue 19).

Upstream: PrefectHQ/prefect, src/integrations/prefect-ray/tests/test_task_runners.py at commit
0897d82504afccc9fb6fb292dad8c1595633fa82 (the 3.x line the installed Prefect 3.9 belongs to), with
its conftest (a Prefect test harness: tests/prefect/conftest.py's real API here). Each test keeps
upstream's name, tasks, flows and assertions; the runner under test is ``SkyVMTaskRunner`` on the
local Docker backend, sharing the warm clusters of test_peer_dask_suite.py (tests/prefect/peer_suite.py).

Run in test_peer_dask_suite.py, once: the tests whose bodies are the same upstream in both suites,
test_duplicate, test_successful_flow_run, test_failing_flow_run, test_async_tasks,
test_submit_and_wait, test_async_task_timeout, test_sync_task_timeout, test_assets_with_task_runner.

Changed from upstream, and why:
- the ``task_runner`` fixture: upstream parametrizes Ray's ways to start (in-process cluster,
  temporary cluster, a ``ray start`` instance over ``ray://``, the default); here it is one runner.
  ``RayTaskRunner()`` in a test's own flow is ``peer_suite.runner()``.
- PYTEST_DONT_REWRITE: pytest rewrites a test module's asserts into calls of ``_pytest``, and the
  tasks and flows below travel to the node by value (a node's image has no pytest), as they travel
  to Dask's and Ray's workers, which have it. Plain asserts here, for that reason only.
- async tests run on anyio's pytest plugin (upstream: pytest-asyncio); not installed here.
- get_sleep_time: a module function, 1 s, not 5. Upstream widens it because Ray flakes on
  concurrency; no test asserts a duration, and in test_dependencies five waves of nodes sleep it.
- test_flow_and_subflow_both_with_task_runner: the tasks write a file of the test's tmp_path, which
  Ray's workers share with the test process; here the nodes get that folder mounted at the same path.
- test_dependencies: upstream's flow returns nothing, so it passes whatever its tasks do; here it
  returns its 15 futures and the test asserts each completed.

Dropped (about Ray itself, not about a task runner):
- test_ray_options: ``prefect_ray.context.remote_options`` (``@ray.remote`` arguments); skyvm's
  per-task options (``skyvm_options``) are tested in test_task_runner.py.
"""

from __future__ import annotations

import random
import time

import pytest
from prefect import flow, task
from prefect.futures import as_completed
from prefect.states import State

import peer_suite
from peer_suite import warm_clusters_removed  # noqa: F401 - the session's warm clusters go at its end
from prefect_skyvm import SkyVMTaskRunner

# Upstream runs its coroutine tests with pytest-asyncio; anyio's plugin does it here.
pytestmark = pytest.mark.anyio


def get_sleep_time() -> float:
    """How long the concurrency tests' tasks sleep. Upstream's is a method of the test class; the
    flows and tasks that call it travel to the node, and a test class's instance would carry
    pytest's fixture objects with it."""
    return 1.0


@pytest.fixture(scope="module")
def task_runner() -> SkyVMTaskRunner:
    return peer_suite.runner()


class TestRayTaskRunner:
    @pytest.fixture
    def tmp_file(self, tmp_path):
        file_path = tmp_path / "canary.txt"
        file_path.touch()
        return file_path

    def test_as_completed_yields_correct_order(self, task_runner: SkyVMTaskRunner):
        task_a = peer_suite.sleep_task
        timings = [1, 5, 10]

        @flow(version="test", task_runner=task_runner)
        def test_flow():
            futures = [task_a.submit(seconds) for seconds in reversed(timings)]
            done = [future.result() for future in as_completed(futures=futures)]
            assert done[-1] == timings[-1]

        test_flow()

    async def test_wait_captures_exceptions_as_crashed_state(self, task_runner: SkyVMTaskRunner):
        """An interrupt raised by an async task's code is its crash; wait() does not re-raise it."""

        @task
        async def task_a():
            raise KeyboardInterrupt()

        with task_runner:
            future = task_runner.submit(task=task_a, parameters={}, wait_for=[])
            future.wait()
            state = future.state
            assert state is not None, "wait timed out"
            assert isinstance(state, State), "wait should return a state"
            assert state.name == "Crashed"

    def test_flow_and_subflow_both_with_task_runner(self, task_runner: SkyVMTaskRunner, tmp_file):
        # The nodes write the test's file: its folder is mounted in them at the same path.
        mounted = ["--volume", f"{tmp_file.parent}:{tmp_file.parent}"]

        @task
        def some_task(text):
            tmp_file.write_text(text)

        @flow(task_runner=peer_suite.runner(docker_run_args=mounted))
        def subflow():
            a = some_task.submit("a")
            b = some_task.submit("b")
            c = some_task.submit("c")
            return a, b, c

        @flow(task_runner=peer_suite.runner(docker_run_args=mounted))
        def base_flow():
            subflow()
            time.sleep(get_sleep_time())
            d = some_task.submit("d")
            return d

        base_flow()
        assert tmp_file.read_text() == "d"

    def test_dependencies(self):
        @task
        def a():
            time.sleep(get_sleep_time())

        b = c = d = e = a

        @flow(task_runner=peer_suite.runner())
        def flow_with_dependent_tasks():
            futures = []
            for _ in range(3):
                a_future = a.submit(wait_for=[])
                b_future = b.submit(wait_for=[a_future])
                futures += [a_future, b_future]
                futures += [c.submit(wait_for=[b_future]), d.submit(wait_for=[b_future]), e.submit(wait_for=[b_future])]
            return futures

        # Beyond upstream (whose flow returns nothing, so it passes whatever its tasks do): every task completed.
        states = flow_with_dependent_tasks()
        assert [s.type.value for s in states] == ["COMPLETED"] * 15

    def test_can_run_many_tasks_without_crashing(self, task_runner: SkyVMTaskRunner):
        """Regression test of https://github.com/PrefectHQ/prefect/issues/15539."""

        @task
        def random_integer(range_from: int = 0, range_to: int = 100) -> int:
            return random.randint(range_from, range_to)

        @flow(task_runner=task_runner)
        def add_random_integers(number_tasks: int = 50) -> int:
            futures = [random_integer.submit() for _ in range(number_tasks)]
            return sum(future.result() for future in futures)

        assert add_random_integers() > 0
