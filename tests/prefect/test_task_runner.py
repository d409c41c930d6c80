"""SkyVMTaskRunner against a real Prefect API and real containers.

The behaviours of Prefect's own task-runner tests (prefect-dask's
test_task_runners.py, ProcessPoolTaskRunner's tests) written anew for this
runner, plus what skyvm adds: per-task resources seen from inside the
container, retries as fresh remote runs, crashes, cancellation.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import cloudpickle
import pytest
from prefect import flow, tags, task
from prefect.futures import as_completed, wait
from prefect.states import StateType

from prefect_skyvm import SkyVMTaskRunner, skyvm_options
from skyvm.backends.local import list_managed
from skyvm.errors import SettingsError
from skyvm.limits import container_limits

SETTINGS = {
    "defaults": {"cpus": 0.5, "memory": 0.5},
    "profiles": {
        "bigger": {"cpus": 1.5, "memory": 0.75},
        "tagged": {"cpus": 1.25},
    },
    "nodes": {"from_yaml": {"cpus": 0.75, "memory": 0.25}},
}


@pytest.fixture
def runner():
    return SkyVMTaskRunner(SETTINGS)


def prefect_containers(flow_run_id=None):
    rows = [r for r in list_managed() if r["run_id"].startswith("prefect-")]
    return [r for r in rows if flow_run_id is None or r["run_id"] == f"prefect-{flow_run_id}"]


# -- the runner object ---------------------------------------------------------


def test_duplicate_and_equality(runner):
    dup = runner.duplicate()
    assert dup == runner and dup is not runner
    assert SkyVMTaskRunner(SETTINGS, cpus=2) != runner


def test_pickles_without_live_clients():
    runner = SkyVMTaskRunner(SETTINGS, profile="bigger", memory=1.0)

    @task(name="from_yaml")
    def from_yaml():
        pass

    with runner:
        runner._current_run()  # the live run a first submission makes
        assert runner._run is not None
        blob = cloudpickle.dumps(runner)  # while started: only arguments travel
    copy = cloudpickle.loads(blob)
    # No live client, run, thread pool or lock went along...
    assert copy._run is None and copy._executor is None and b"_thread.lock" not in blob
    # ...but everything the runner was given did, and resolves the same settings.
    assert (copy.settings, copy.profile, copy.overrides) == (SETTINGS, "bigger", {"memory": 1.0})
    got = copy.settings_for(from_yaml)
    assert got == runner.settings_for(from_yaml)
    assert (got.cpus, got.memory) == ("0.75", "1")  # the node's own YAML over the profile, the runner's argument over both


def test_entering_provisions_nothing(runner):
    def clusters():  # by name and state: a status text ("Up 12 seconds") moves on by itself
        return sorted((c["name"], c["state"]) for c in list_managed())

    before = clusters()
    with runner:
        assert clusters() == before


def test_bad_settings_fail_when_the_runner_is_made():
    with pytest.raises(SettingsError, match="arguments.cpu: unknown field 'cpu'"):
        SkyVMTaskRunner(SETTINGS, cpu=2)
    with pytest.raises(SettingsError, match="unknown profile 'nope'"):
        SkyVMTaskRunner(SETTINGS, profile="nope")


# -- flows, the standard behaviours -----------------------------------------------


@task
def say(x):
    return f"hello {x}"


@task
def join(*parts):
    return " + ".join(parts)


def test_successful_flow_run(runner):
    @flow(task_runner=runner)
    def f():
        a = say.submit("a")
        b = say.submit("b")
        c = join.submit(a, b)  # futures as parameters
        return a, b, c

    a, b, c = f()  # returned futures come back as their final states
    assert (a.result(), b.result(), c.result()) == ("hello a", "hello b", "hello a + hello b")
    assert all(x.is_completed() for x in (a, b, c))


@task
def fails_with(exc_type, message):
    raise exc_type(message)


@task
def use(value):
    return value + "c"


def test_failing_flow_run_and_upstream_failures(runner):
    @flow(task_runner=runner)
    def f():
        a = fails_with.submit(RuntimeError, "This task fails!")
        b = fails_with.submit(ValueError, "This task fails and passes data downstream!")
        c = use.submit(b)
        d = use.submit(c)
        return a, b, c, d

    state = f(return_state=True)
    assert state.is_failed()
    a, b, c, d = state.result(raise_on_failure=False)
    with pytest.raises(RuntimeError, match="This task fails!"):
        a.result()
    with pytest.raises(ValueError, match="This task fails and passes data downstream!"):
        b.result()
    assert a.is_failed() and b.is_failed()
    for up, down in ((b, c), (c, d)):
        assert down.is_pending() and down.name == "NotReady"
        assert f"Upstream task run '{up.state_details.task_run_id}' did not reach a 'COMPLETED' state" in down.message


@task
def flaky_marker(path: str):
    return Path(path).read_text()


def test_wait_for_with_upstream_failure(runner):
    @flow(task_runner=runner)
    def f():
        bad = fails_with.submit(RuntimeError, "upstream broke")
        after = say.submit("never", wait_for=[bad])
        return after

    after = f(return_state=True).result(raise_on_failure=False)
    assert after.name == "NotReady"


@task
async def async_double(x):
    await asyncio.sleep(0.1)
    return 2 * x


def test_async_tasks(runner):
    @flow(task_runner=runner)
    async def f():
        a = async_double.submit(2)
        b = async_double.submit(a)
        return a.result(), b.result()

    assert asyncio.run(f()) == (4, 8)


@task
def nap(seconds: float):
    time.sleep(seconds)
    return seconds


@task
def wait_for_go(port: int) -> str:
    import socket

    # The node shares the host's network: it waits for a word the flow sends only once .submit() returned.
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.settimeout(60)
        return conn.recv(16).decode()


def test_submit_does_not_block(runner):
    import socket

    @flow(task_runner=runner)
    def f():
        with socket.create_server(("127.0.0.1", 0)) as server:
            server.settimeout(300)
            future = wait_for_go.submit(server.getsockname()[1])
            # Had .submit() waited for the task, the task would have timed out waiting for this word.
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"go")
            return future.result()

    assert f() == "go"


def test_as_completed_yields_in_finish_order(runner):
    @flow(task_runner=runner)
    def f():
        futures = [nap.submit(s) for s in (5, 1, 3)]
        return [fut.result() for fut in as_completed(futures)]

    assert f() == [1, 3, 5]


@task(timeout_seconds=2)
def sleeps_too_long():
    time.sleep(60)


@task(timeout_seconds=2)
async def sleeps_too_long_async():
    await asyncio.sleep(60)


@pytest.mark.parametrize("the_task", [sleeps_too_long, sleeps_too_long_async], ids=["sync", "async"])
def test_task_timeout_cancels_the_node(runner, the_task):
    @flow(task_runner=runner)
    def f():
        return the_task.submit()

    t0 = time.time()
    state = f(return_state=True)
    assert time.time() - t0 < 50
    assert state.is_failed()
    task_state = state.result(raise_on_failure=False)
    assert task_state.name == "TimedOut" and "exceeded timeout of 2" in task_state.message
    # The timed-out node was stopped, and the run's clusters went with the flow.
    assert prefect_containers(state.state_details.flow_run_id) == []


def test_infrastructure_failure_is_crashed_and_wait_does_not_raise():
    # An image nobody can provide (a registry on a closed loopback port: no traffic leaves the machine).
    runner = SkyVMTaskRunner({"defaults": {"image": "127.0.0.1:1/skyvm-no-such-image:1"}})

    @flow(task_runner=runner)
    def f():
        future = say.submit("x")
        done, not_done = wait([future])  # prefect.futures.wait: must not raise
        assert done == {future} and not not_done
        future.wait()
        error = future.result(raise_on_failure=False)
        return future.state.type, future.state.message, type(error).__name__

    state_type, message, error_type = f()
    assert state_type == StateType.CRASHED
    assert "skyvm node crashed" in message and "skyvm-no-such-image:1" in message
    assert error_type == "InfrastructureError"


@task
def total(values):
    return type(values).__name__, sum(v["n"] for v in values)


@task
def boxed(n):
    return {"n": n}


def test_mapped_results_passed_downstream_arrive_as_plain_lists(runner):
    @flow(task_runner=runner)
    def f():
        return total.submit(boxed.map([1, 2, 3])).result()

    assert f() == ("list", 6)


def test_map_with_skyvm_options_context(runner):
    @task
    def cpus_seen(i):
        return container_limits()["cpus"]

    @flow(task_runner=runner)
    def f():
        with skyvm_options(cpus=1.75):
            mapped = cpus_seen.map([1, 2])
        plain = cpus_seen.submit(3)
        return [m.result() for m in mapped], plain.result()

    mapped, plain = f()
    assert mapped == [1.75, 1.75]
    assert plain == 0.5  # outside the block: the file's defaults


# -- per-task resources, three ways, seen from inside ---------------------------------


@task
def from_yaml():
    return container_limits()


@task
def probe():
    return container_limits()


def test_per_task_resources_three_ways(runner):
    @flow(task_runner=runner)
    def f():
        yaml_node = from_yaml.submit()  # nodes.from_yaml in the settings
        with skyvm_options(profile="bigger"):
            ctx_node = probe.submit()
        with tags("skyvm:profile=tagged"):
            tag_node = probe.submit()
        tagged_task = probe.with_options(tags=["skyvm:profile=bigger"]).submit()
        return yaml_node.result(), ctx_node.result(), tag_node.result(), tagged_task.result()

    yaml_seen, ctx_seen, tag_seen, task_tag_seen = f()
    assert (yaml_seen["cpus"], yaml_seen["memory_gib"]) == (0.75, 0.25)
    assert (ctx_seen["cpus"], ctx_seen["memory_gib"]) == (1.5, 0.75)
    assert (tag_seen["cpus"], tag_seen["memory_gib"]) == (1.25, 0.5)
    assert (task_tag_seen["cpus"], task_tag_seen["memory_gib"]) == (1.5, 0.75)
    for seen in (yaml_seen, ctx_seen, tag_seen):
        assert seen["cluster"]  # each ran in a skyvm cluster container


def test_bad_per_task_options_raise_at_submit(runner):
    @flow(task_runner=runner)
    def f():
        with skyvm_options(disk_tier="fastest"):
            say.submit("x")

    with pytest.raises(SettingsError, match="disk_tier"):
        f()


# -- retries, logs, cancellation ----------------------------------------------------------


@task(retries=2, retry_delay_seconds=0)
def fails_twice(counter_dir: str):
    marker = Path(counter_dir) / "attempts"
    with open(marker, "a") as fh:
        fh.write(os.environ["SKYVM_ATTEMPT_ID"] + "\n")
    attempts = marker.read_text().split()
    if len(attempts) < 3:
        raise RuntimeError(f"attempt {len(attempts)} fails")
    return len(attempts)


@pytest.mark.parametrize("engine, nodes", [(True, 1), (False, 3)], ids=["engine", "body"])
def test_retries(tmp_path, engine, nodes):
    """Engine mode: Prefect's engine retries on the node it runs on. Body mode: each retry is a fresh remote run."""
    counter = tmp_path / "counter"
    counter.mkdir()
    runner = SkyVMTaskRunner(SETTINGS, prefect_engine=engine, docker_run_args=["--volume", f"{counter}:/counter"])

    @flow(task_runner=runner)
    def f():
        return fails_twice.submit("/counter")

    state = f()
    assert state.is_completed() and state.result() == 3
    attempts = (counter / "attempts").read_text().split()
    assert len(attempts) == 3 and len(set(attempts)) == nodes  # exactly three tries, on that many skyvm attempts


@task
def chatty():
    for i in range(3):
        print(f"line {i} from the node", flush=True)
    return "ok"


@pytest.mark.parametrize("engine, log_prints", [(True, True), (True, False), (False, False)], ids=["engine", "engine-stdout", "body"])
def test_node_output_lands_in_the_task_run_logs(engine, log_prints, capfd):
    """Body mode streams the node's output into the task run's logs; in engine mode the node's own engine
    sends them with Prefect's log_prints, and its launcher sends what the node printed otherwise. Each line
    once, and on this process's console as a task run's line (Prefect's format names the task run)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    @flow(task_runner=SkyVMTaskRunner(SETTINGS, prefect_engine=engine))
    def f():
        return chatty.with_options(log_prints=log_prints).submit()

    state = f()
    assert state.result() == "ok"
    task_run_id = state.state_details.task_run_id

    async def read_logs():
        async with get_client() as client:
            for _ in range(50):
                logs = await client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])))
                if sum("from the node" in log.message for log in logs) == 3:
                    return logs
                await asyncio.sleep(0.2)
            return logs

    messages = [log.message for log in asyncio.run(read_logs())]
    assert [m for m in messages if "from the node" in m] == ["line 0 from the node", "line 1 from the node", "line 2 from the node"]
    console = capfd.readouterr()
    assert "Logging error" not in console.err, console.err[-3000:]


def test_cancelling_a_running_flow_leaves_no_container(tmp_path):
    script = tmp_path / "long_flow.py"
    script.write_text(
        textwrap.dedent(
            """
            import time
            from prefect import flow, task
            from prefect_skyvm import SkyVMTaskRunner

            @task
            def forever():
                print("node started", flush=True)
                time.sleep(600)

            @flow(task_runner=SkyVMTaskRunner({"defaults": {"cpus": 0.5}}))
            def long_flow():
                forever.submit().result()

            long_flow()
            """
        )
    )
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the session's real API
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output = []
    deadline = time.time() + 180
    while time.time() < deadline:
        line = proc.stdout.readline()
        output.append(line)
        if "node started" in line:
            break
    assert any("node started" in line for line in output), "".join(output)
    # Only this flow's node: other tests' warm clusters (down: false) may still be up.
    running = [r for r in prefect_containers() if r["state"] == "running" and r["node"] == "forever"]
    assert running, "the node's container should be running"
    proc.send_signal(signal.SIGTERM)  # how Prefect's runners cancel a flow run process
    proc.wait(timeout=60)
    remaining = [r for r in list_managed() if r["name"] in {c["name"] for c in running}]
    assert remaining == []


# -- errors stay truthful -------------------------------------------------------------------------


def test_a_task_ending_its_node_with_sys_exit_or_keyboard_interrupt_is_crashed_and_the_flow_goes_on(tmp_path):
    """Remote code never stops the process that launched it (as with prefect-dask and prefect-ray): the
    tasks are Crashed with the remote traceback, the next task runs, the flow process exits 0."""
    script = tmp_path / "exiting_flow.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from prefect import flow, task
            from prefect_skyvm import SkyVMTaskRunner

            RUNNER = SkyVMTaskRunner({"defaults": {"cpus": 0.5, "memory": 0.5}})

            @task
            def exits():
                sys.exit(3)

            @task
            def interrupted():
                raise KeyboardInterrupt("pressed on the node")

            @task
            def after(x):
                return f"ran after {x}"

            @flow(task_runner=RUNNER)
            def goes_on():
                crashed = [exits.submit(), interrupted.submit()]
                for future in crashed:
                    future.wait()
                for future in crashed:
                    print("STATE", future.state.type.value, "|", future.state.message.replace("\\n", " // "), flush=True)
                    print("TASK RUN", future.task_run_id, flush=True)
                return after.submit("the crashes").result()

            @flow(task_runner=RUNNER.duplicate())
            def resolves():
                return exits.submit().result()

            state = goes_on(return_state=True)
            print("FLOW", state.type.value, state.result(raise_on_failure=False), flush=True)
            state = resolves(return_state=True)
            print("RESOLVED", state.type.value, type(state.result(raise_on_failure=False)).__name__, flush=True)
            """
        )
    )
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the session's real API
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    states = [line for line in out.stdout.splitlines() if line.startswith("STATE ")]
    assert len(states) == 2, text[-4000:]
    exited, interrupt = states
    assert exited.startswith("STATE CRASHED | skyvm node crashed: node 'exits' was ended by SystemExit(3)")
    assert "Remote traceback:" in exited and "in exits" in exited and "SystemExit: 3" in exited
    assert interrupt.startswith("STATE CRASHED | skyvm node crashed: node 'interrupted' was ended by KeyboardInterrupt(pressed on the node)")
    assert "in interrupted" in interrupt
    assert "FLOW COMPLETED ran after the crashes" in out.stdout
    # Resolving a crashed task's future fails the flow with the crash, as for any crashed task.
    assert "RESOLVED FAILED NodeAborted" in out.stdout
    # The API says Crashed too (the engine on the node said it before its node ended).
    from prefect.client.orchestration import get_client

    async def read_states():
        async with get_client() as client:
            ids = [line.split()[-1] for line in out.stdout.splitlines() if line.startswith("TASK RUN ")]
            return [(await client.read_task_run(uuid.UUID(i))).state.type for i in ids]

    assert asyncio.run(read_states()) == [StateType.CRASHED, StateType.CRASHED]


@task(timeout_seconds=15)
def stalls():
    print("stalling", flush=True)
    time.sleep(600)


def test_a_task_timeout_stays_its_error_when_stopping_the_node_fails(request):
    """Body mode (the timeout is this process's). The node's container is frozen (docker pause) once its
    attempt runs, so no stop request reaches it: the task is still TimedOut, and the failed stop is logged
    on the task run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    from skyvm import context

    context.reset(cancel_wait_s=2.0)  # skyvm's own bound on a stop (the runner's run is made in this context)
    request.addfinalizer(context.reset)
    paused: list[str] = []

    @flow(task_runner=SkyVMTaskRunner(SETTINGS, prefect_engine=False))
    def f():
        from prefect.context import FlowRunContext

        flow_run_id = FlowRunContext.get().flow_run.id
        future = stalls.submit()
        deadline = time.time() + 120
        while not paused and time.time() < deadline:
            for row in prefect_containers(flow_run_id):
                busy = subprocess.run(["docker", "exec", row["name"], "python3", "-m", "skyvm.node", "busy"], capture_output=True)
                if busy.returncode == 0:  # the attempt runs
                    subprocess.run(["docker", "pause", row["name"]], check=True, capture_output=True)
                    paused.append(row["name"])
                    break
            time.sleep(0.2)
        future.wait()
        return future

    try:
        state = f(return_state=True)
    finally:
        # The frozen node cannot be stopped from inside: the test removes its own container.
        for name in paused:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    assert paused, "the node's attempt never ran"
    task_state = state.result(raise_on_failure=False)
    assert task_state.name == "TimedOut" and "exceeded timeout of 15" in task_state.message, task_state

    async def read_logs():
        async with get_client() as client:
            for _ in range(50):
                logs = await client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_state.state_details.task_run_id])))
                if any("stopping node stalls" in log.message for log in logs):
                    return logs
                await asyncio.sleep(0.2)
            return logs

    messages = [log.message for log in asyncio.run(read_logs())]
    assert any("stopping node stalls after its wait was interrupted failed" in m and "did not stop within 2s" in m for m in messages), messages
