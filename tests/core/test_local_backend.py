"""The local backend on a real Docker engine: limits seen from inside, cluster reuse, teardown, cancel."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from skyvm import InfrastructureError, NodeCancelled, NodeFailed, NodeTimeout, Run, UnsatisfiableRequest
from skyvm.backends.local import gc, list_managed
from skyvm.limits import container_limits

pytestmark = pytest.mark.usefixtures("docker_engine")


def limits():
    return container_limits()


def env_of(*names):
    return {n: os.environ.get(n) for n in names}


def nap(seconds):
    start = time.time()
    time.sleep(seconds)
    return {"start": start, "end": time.time(), "host": os.uname().nodename}


def fail_loudly(x):
    print("about to fail", flush=True)
    raise ValueError(f"bad value {x}")


def allocate(mib):
    blocks = [bytearray(1024 * 1024) for _ in range(mib)]
    return len(blocks)


def containers_of(run_id):
    return [r for r in list_managed() if r["run_id"] == run_id]


def wait_until(predicate, timeout=30, step=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def test_per_node_limits_are_seen_inside_the_container():
    config = {
        "nodes": {
            "small": {"cpus": 1, "memory": 0.5},
            "bigger": {"cpus": "2", "memory": "1+", "docker_run_args": ["--shm-size=256m"]},
        }
    }
    with Run(config) as run:
        small, bigger = run.submit(limits, node="small"), run.submit(limits, node="bigger")
        seen_small, seen_bigger = small.result(300), bigger.result(300)
        assert small.cluster != bigger.cluster  # different signatures, different clusters
    assert (seen_small["cluster"], seen_bigger["cluster"]) == (small.cluster, bigger.cluster)
    assert (seen_small["cpus"], seen_small["memory_gib"]) == (1.0, 0.5)
    assert (seen_bigger["cpus"], seen_bigger["memory_gib"], seen_bigger["shm_gib"]) == (2.0, 1.0, 0.25)
    assert containers_of(run.run_id) == []  # down: true (the default) tears them down with the run


def test_memory_limit_is_enforced():
    with Run({"defaults": {"memory": 0.25, "cpus": 1}}) as run:
        ok = run.submit(allocate, 50, node="fits")
        assert ok.result(120) == 50
        too_much = run.submit(allocate, 600, node="too-much")
        with pytest.raises(InfrastructureError, match="exited with code 137"):
            too_much.result(120)


def test_failure_carries_the_remote_traceback_and_log():
    with Run() as run:
        handle = run.submit(fail_loudly, 7, node="fails")
        with pytest.raises(NodeFailed) as err:
            handle.result(120)
    assert "ValueError: bad value 7" in str(err.value)
    assert "in fail_loudly" in err.value.remote_traceback
    assert isinstance(err.value.remote_exception, ValueError)
    assert "about to fail" in handle.logs() and "Traceback" in handle.logs()


def test_shell_command_node_and_its_exit_code():
    with Run() as run:
        assert run.submit_command("echo working; echo answer-42", node="cmd").result(120) == "answer-42"
        bad = run.submit_command("echo trying; exit 5", node="cmd-bad")
        with pytest.raises(NodeFailed) as err:
            bad.result(120)
        assert err.value.returncode == 5


def test_logs_stream_line_by_line_while_the_node_runs():
    seen = []
    with Run() as run:
        handle = run.submit_command("for i in 1 2 3; do echo tick-$i; sleep 1; done; echo done", node="ticker", on_log=lambda l: seen.append((time.time(), l)))
        handle.result(120)
    ticks = [t for t, line in seen if line.startswith("tick-")]
    assert [line for _, line in seen if line.startswith("tick-")] == ["tick-1", "tick-2", "tick-3"]
    assert ticks[-1] - ticks[0] > 1.5  # delivered as printed, not all at the end


def test_envs_reach_the_node_and_secrets_stay_off_command_lines():
    secret = "tok-" + os.urandom(6).hex()
    os.environ["SKYVM_TEST_SOURCE"] = secret
    config = {"defaults": {"envs": {"MODE": "fast"}, "secrets": {"API_TOKEN": "env:SKYVM_TEST_SOURCE"}}}
    with Run(config) as run:
        slow = run.submit_command("sleep 3; echo $API_TOKEN-$MODE", node="secretive")
        assert wait_until(lambda: slow.cluster is not None and "sleep 3" in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout, 60)
        host_cmdlines = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        inspect = subprocess.run(["docker", "inspect", slow.cluster], capture_output=True, text=True).stdout
        assert slow.result(120) == f"{secret}-fast"
        values = run.submit(env_of, "MODE", "API_TOKEN", node="secretive").result(120)
    assert secret not in host_cmdlines
    assert secret not in inspect
    assert values == {"MODE": "fast", "API_TOKEN": secret}


def test_same_signature_nodes_reuse_a_warm_cluster_in_turn():
    with Run({"defaults": {"cpus": 1}}) as run:
        first = run.submit(limits, node="first")
        first.result(120)
        second = run.submit(limits, node="second")
        second.result(120)
        assert first.cluster == second.cluster
        assert len(containers_of(run.run_id)) == 1


def test_parallel_nodes_get_separate_clusters_up_to_the_limit_then_queue():
    with Run({"defaults": {"cpus": 0.5, "max_clusters": 2}}) as run:
        handles = [run.submit(nap, 3, node=f"nap-{i}") for i in range(3)]
        spans = [h.result(300) for h in handles]
        clusters = {h.cluster for h in handles}
    assert len(clusters) == 2
    spans.sort(key=lambda s: s["start"])
    # The third started only once one of the first two had finished.
    assert spans[2]["start"] >= min(spans[0]["end"], spans[1]["end"]) - 0.5
    assert containers_of(run.run_id) == []


def test_down_false_keeps_the_cluster_warm_for_the_next_run_then_gc_removes_it():
    config = {"defaults": {"down": False, "idle_minutes_to_autostop": 30, "labels": {"purpose": "warm-test"}}}
    with Run(config) as run1:
        h1 = run1.submit(limits, node="a")
        h1.result(120)
    assert [r["name"] for r in list_managed() if r["name"] == h1.cluster], "down: false keeps the cluster after the run"
    status = subprocess.run([sys.executable, "-m", "skyvm", "status"], capture_output=True, text=True)
    assert h1.cluster in status.stdout and run1.run_id in status.stdout
    with Run(config) as run2:
        h2 = run2.submit(limits, node="b")
        h2.result(120)
        assert h2.cluster == h1.cluster  # reused across runs
        # The run that started it is over, but a live run uses it now: gc spares it.
        assert h1.cluster not in gc(dry_run=True)
    removed = gc()
    assert h1.cluster in removed
    assert not [r for r in list_managed() if r["name"] == h1.cluster]


@pytest.mark.parametrize(
    "autostop",
    [{"idle_minutes_to_autostop": 0}, {"idle_minutes_to_autostop": 30, "autostop": {"idle_minutes": 0}}],
    ids=["idle_minutes_to_autostop", "skypilot-autostop-form-wins"],
)
def test_autostop_removes_an_idle_cluster(autostop):
    with Run({"defaults": {"down": False, "cpus": 1.5, **autostop}}) as run:
        h = run.submit(limits, node="short-lived")
        h.result(120)
        name = h.cluster
    assert wait_until(lambda: not [r for r in list_managed() if r["name"] == name], timeout=30)


def test_cancel_stops_the_node_and_leaves_nothing_behind():
    run = Run()
    handle = run.submit_command("echo started; sleep 120; echo finished", node="long")
    assert wait_until(lambda: "started" in handle.logs(), 120)
    assert handle.cancel(wait_s=20)  # skyvm's own bound: past it, cancel raises naming the node
    with pytest.raises(NodeCancelled):
        handle.result(1)
    assert "finished" not in handle.logs()
    run.close()
    assert containers_of(run.run_id) == []


def test_timeout_cancels_the_node():
    with Run({"defaults": {"timeout": 2}}) as run:
        handle = run.submit_command("sleep 60", node="slowpoke")
        with pytest.raises(NodeTimeout, match="exceeded its timeout of 2s"):
            handle.result(120)
    assert containers_of(run.run_id) == []


@pytest.mark.parametrize(
    "options,fragment",
    [({"cpus": 4096}, "this machine has"), ({"memory": 100000}, "GiB"), ({"accelerators": "H100:8"}, "accelerators H100:8")],
)
def test_unsatisfiable_requests_fail_fast(options, fragment):
    with Run() as run:
        handle = run.submit(limits, node="greedy", options=options)
        with pytest.raises(UnsatisfiableRequest, match=fragment):
            handle.result(60)
        assert containers_of(run.run_id) == []


def test_s3_payload_store_end_to_end(s3_server):
    import boto3

    config = {"defaults": {"payload_store": "s3://skyvm-test/e2e", "payload_store_endpoint": s3_server}}
    with Run(config) as run:
        handle = run.submit(sum, [1, 2, 3], node="s3-node")
        assert handle.result(120) == 6
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket="skyvm-test", Prefix="e2e/")["Contents"]]
    assert f"e2e/results/{handle.attempt_id}" in keys
    assert any(k.startswith("e2e/payloads/") for k in keys)


@pytest.mark.parametrize("agent", [True, False], ids=["agent", "exec"])
def test_a_small_payload_reaches_an_agent_over_its_channel_not_through_the_local_store(monkeypatch, tmp_path, agent):
    """The store on this machine: an agent is handed the payload over its channel, no object written;
    an exec's node reads it from the store. The result comes back through the store either way."""
    monkeypatch.setenv("SKYVM_AGENT", "1" if agent else "0")
    store = tmp_path / "store"
    with Run({"defaults": {"payload_store": str(store), "labels": {"test": uuid.uuid4().hex[:12]}}}) as run:
        handle = run.submit(sum, [1, 2, 3], node="inline")
        assert handle.result(120) == 6
    assert [p.name for p in (store / "results").iterdir()] == [handle.attempt_id]
    assert (len(list((store / "payloads").glob("*"))) if (store / "payloads").is_dir() else 0) == (0 if agent else 1)


def test_private_registry_login_and_pull(registry):
    config = {"defaults": {"registry": registry.model_dump(), "cpus": 1.25}}
    with Run(config) as run:
        first = run.submit(limits, node="from-registry")
        first.result(300)
        image = first.spec.image
        assert image.startswith(registry.server + "/skyvm-node:")
        # Drop the pushed tag: the next cluster must log in and pull it from the registry.
        subprocess.run(["docker", "rm", "-f", first.cluster], check=True, capture_output=True)
        subprocess.run(["docker", "rmi", image], check=True, capture_output=True)
        second = run.submit(limits, node="pulled-again")
        assert second.result(300)["cpus"] == 1.25
        assert subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0


def test_wrong_registry_password_is_a_clear_error(registry, monkeypatch):
    monkeypatch.setenv("SKYVM_WRONG_PASSWORD", "not-it")
    bad = registry.model_copy(update={"password_env": "SKYVM_WRONG_PASSWORD"})
    with Run({"defaults": {"registry": bad.model_dump(), "image": f"{registry.server}/skyvm-node:missing"}}) as run:
        with pytest.raises(InfrastructureError, match="refused the login"):
            run.submit(limits, node="denied").result(120)
    assert "not-it" not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def test_without_docker_it_falls_back_to_processes_and_says_so(tmp_path):
    script = tmp_path / "fallback.py"
    script.write_text(
        textwrap.dedent(
            """
            import logging, os, skyvm
            PARENT = os.getpid()
            logging.basicConfig(level=logging.WARNING)
            def where():
                return os.environ.get("SKYVM_CLUSTER"), os.getpid() != PARENT
            print("RESULT", skyvm.submit(where, node="plain").result(120))
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "SKYVM_REQUIRE_DOCKER"}
    env.update(DOCKER_HOST="unix:///nonexistent/docker.sock", SKYVM_HOME=str(tmp_path / "home"))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "RESULT (None, True)" in out.stdout  # no cluster container, but its own process
    assert out.stderr.count("no Docker engine reachable") == 1


def test_a_node_let_go_runs_on_without_a_waiting_process_and_is_found_again():
    from skyvm.api import NodeHandle
    from skyvm.backends.base import JobState
    from skyvm.node import make_command_payload

    with Run({"defaults": {"cpus": 1}}) as run:
        settings = run.resolve("detached")
        ref = run.start_raw("detached", settings, make_command_payload("echo first; sleep 2; echo answer-7")).let_go()
        import json

        node = NodeHandle.attach(json.loads(json.dumps(ref)))  # what a trigger in another process gets
        assert "secrets" not in ref["settings"]
        # A node submitted meanwhile must not share the busy cluster.
        other = run.submit(limits, node="meanwhile")
        assert other.result(120)["cluster"] != node.cluster
        assert wait_until(lambda: node.status().state.finished, 60)
        status = node.status()
        assert status.state is JobState.SUCCEEDED
        text, offset = node.read_log(0)
        assert text.splitlines() == ["first", "answer-7"] and offset == len(text.encode())
        assert node.read_log(offset)[0] == ""
        assert node.outcome(status).value() == "answer-7"
        node.release()
        assert not [r for r in list_managed() if r["name"] == node.cluster]


def test_a_node_let_go_that_prints_more_than_a_pipe_holds_runs_to_its_end_while_its_launcher_lives():
    # The launcher lets go and goes on (Airflow's dag.test(), a worker): the exec's stream it no longer
    # reads must not fill up and stall the node.
    from skyvm.api import NodeHandle
    from skyvm.backends.base import JobState
    from skyvm.node import make_command_payload

    with Run() as run:
        command = "head -c 4000000 /dev/zero | tr '\\0' x | fold -w 100; echo; echo printed-all"
        node = NodeHandle.attach(run.start_raw("chatty", run.resolve("chatty"), make_command_payload(command)).let_go())
        assert wait_until(lambda: node.status().state.finished, 90), node.status()
        assert node.status().state is JobState.SUCCEEDED
        assert node.outcome().value() == "printed-all"
        node.release()


def test_a_node_let_go_can_be_cancelled():
    from skyvm.api import NodeHandle
    from skyvm.backends.base import JobState
    from skyvm.node import make_command_payload

    with Run() as run:
        launched = run.start_raw("detached-cancel", run.resolve("detached-cancel"), make_command_payload("sleep 120"))
        node = NodeHandle.attach(launched.let_go())
        assert node.status().state is JobState.RUNNING
        node.cancel()
        assert wait_until(lambda: node.status().state is JobState.CANCELLED, 30)
        with pytest.raises(NodeCancelled):
            node.outcome()
        NodeHandle.attach(launched.reference()).release()
        assert not [r for r in list_managed() if r["name"] == node.cluster]


def test_single_vm_runs_every_node_of_a_run_on_one_cluster_in_turn():
    config = {"defaults": {"single_vm": True}, "nodes": {"small": {"cpus": 1}, "big": {"cpus": 2, "memory": 1}}}
    with Run(config) as run:
        first = run.submit(limits, node="small")
        first.result(120)
        spans = [run.submit(nap, 1.5, node=n) for n in ("big", "small")]
        results = [h.result(120) for h in spans]
        clusters = {first.cluster, *(h.cluster for h in spans)}
    assert len(clusters) == 1  # one VM for the run, whatever each node asks for
    assert first.result()["cpus"] == 1.0  # the cluster has the resources of the node that started it
    a, b = sorted(results, key=lambda r: r["start"])
    assert b["start"] >= a["end"] - 0.2  # nodes take turns on it
    assert containers_of(run.run_id) == []


def test_more_queued_nodes_than_launch_threads_all_finish():
    """Nodes queued for a cluster hold launch threads; the ones that finish must still free theirs."""
    from skyvm.context import Context

    ctx = Context(launch_threads=2)
    try:
        with Run({"defaults": {"cpus": 0.5, "max_clusters": 1}}, ctx=ctx) as run:
            handles = [run.submit(pow, i, 2, node=f"q{i}") for i in range(5)]
            assert [h.result(300) for h in handles] == [0, 1, 4, 9, 16]
            assert len({h.cluster for h in handles}) == 1
    finally:
        ctx.close()


def test_an_unpicklable_argument_names_the_node_and_the_argument_and_nothing_starts():
    import threading

    from skyvm import PayloadError

    with Run({"defaults": {"down": True}}) as run:
        with pytest.raises(PayloadError) as info:
            run.submit(env_of, "HOME", guard=threading.Lock(), node="locked")
        assert containers_of(run.run_id) == []
    text = str(info.value)
    assert "node 'locked'" in text and "argument 'guard'" in text and "lock" in text.lower()
    assert "create them inside the function" in text


def test_a_docker_call_past_its_bound_is_an_error_naming_the_call():
    import docker

    from skyvm.backends.local import DockerBackend
    from skyvm.images import default_base_image

    box = docker.from_env().containers.run(default_base_image(), ["sleep", "60"], detach=True, network_mode="host")
    try:
        backend = DockerBackend()
        assert backend._exec_output(box.id, ["echo", "hello"], timeout=5) == (0, "hello\n", "")
        with pytest.raises(InfrastructureError, match=r"'sleep 20' in cluster \w+ gave no output for 1s \(SKYVM_DOCKER_CALL_TIMEOUT_S\)"):
            backend._exec_output(box.id, ["sleep", "20"], timeout=1)
    finally:
        box.remove(force=True)


def test_a_node_cancelled_while_its_image_builds_ends_at_once_and_never_starts(monkeypatch):
    import threading

    from skyvm.context import Context

    # A fresh requirements image takes minutes to build here; the build is held at its start
    # instead, until the test lets it go (the rest of the path is real).
    building, go = threading.Event(), threading.Event()
    ctx = Context()
    real_image = ctx.node_image

    def slow_build(settings):
        building.set()
        assert go.wait(120)
        return real_image(settings)

    monkeypatch.setattr(ctx, "node_image", slow_build)  # this context's image step, nobody else's
    with Run(ctx=ctx) as run:
        handle = run.submit(env_of, "HOME", node="building")
        assert building.wait(60)
        assert handle.cancel(wait_s=5)  # skyvm's own bound: the build is not waited for
        with pytest.raises(NodeCancelled, match="node 'building' was cancelled before it started"):
            handle.result(1)
        go.set()  # the build ends (its image serves other nodes); this node must not start
        assert wait_until(lambda: handle.spec is not None, 120)
        assert not wait_until(lambda: handle.ref is not None or containers_of(run.run_id), 5)
