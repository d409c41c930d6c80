"""The resident agent of a local cluster: nodes forked from a pristine parent over one channel, on a real Docker engine.

What a user observes: each node is a fresh interpreter with the cluster's limits, cancel stops
everything the node started, an agent that dies ends its node as GONE with a clear error, and a
cluster whose agent cannot be reached still runs nodes (through an exec).
"""

from __future__ import annotations

import builtins
import logging
import os
import time

import docker
import pytest

from skyvm import InfrastructureError, NodeCancelled, Run, spares
from skyvm.backends.agent_channel import SOCKET, agent_dir
from skyvm.backends.local import list_managed
from skyvm.limits import container_limits

pytestmark = pytest.mark.usefixtures("docker_engine")


def fresh_interpreter(i):
    """What a node sees of the interpreter it runs in; then it leaves a mark the next node must not see."""
    import skyvm.node as runtime

    seen = {"marked": hasattr(builtins, "skyvm_test_mark"), "module_mark": getattr(runtime, "test_mark", None), "pid": os.getpid(), "ppid": os.getppid(), "i": i}
    builtins.skyvm_test_mark = i
    runtime.test_mark = i
    return seen


def spawn_and_sleep():
    """Starts a grandchild in its own process (same group), reports both pids, then waits to be cancelled."""
    import subprocess

    sleeper = subprocess.Popen(["sleep", "600"])
    print(f"pids {os.getpid()} {sleeper.pid}", flush=True)
    time.sleep(600)


def sleep_long():
    print("sleeping", flush=True)
    time.sleep(600)


def limits():
    return container_limits()


def process_start():
    """The node's process: its pid, its parent's, and when it started (seconds since boot)."""
    with open("/proc/self/stat") as fh:
        ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
    return {"pid": os.getpid(), "ppid": os.getppid(), "started": ticks / os.sysconf("SC_CLK_TCK")}


def seconds_since_boot() -> float:
    with open("/proc/uptime") as fh:  # the kernel's clock: a container's processes count from the same boot
        return float(fh.read().split()[0])


LIST_PROCESSES = """
import os
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        args = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode().strip()
    except OSError:
        continue
    print(pid, os.getpgid(int(pid)), args)
"""


def processes_in(container) -> str:
    """pid, process group and command line of every process in the cluster (its image has no ps)."""
    return container.exec_run(["python3", "-c", LIST_PROCESSES]).output.decode()


def cluster_container(handle):
    return docker.from_env().containers.get(handle.cluster)


def wait_for(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_a_thousand_nodes_through_one_cluster_each_in_a_fresh_interpreter():
    with Run({"defaults": {"cpus": 1, "memory": 0.5, "max_clusters": 1}}) as run:
        first = run.submit(fresh_interpreter, -1, node="fresh")
        first.result(300)
        container = cluster_container(first)
        main_args = container.attrs["Config"]["Cmd"]
        assert main_args[:3] == ["python3", "-m", "skyvm.agent"]  # the cluster's first process is its agent
        handles = [run.submit(fresh_interpreter, i, node="fresh") for i in range(1000)]
        seen = [h.result(600) for h in handles]
        assert {h.cluster for h in handles} == {first.cluster}
        # No exec per node: the engine saw no exec on the cluster beyond the first one's none.
        assert not container.attrs.get("ExecIDs")
        container.reload()
        assert not container.attrs.get("ExecIDs")
    assert [s["i"] for s in seen] == list(range(1000))
    assert not any(s["marked"] for s in seen)  # nothing one node left in its interpreter reaches the next
    assert all(s["module_mark"] is None for s in seen)
    assert len({s["pid"] for s in seen}) == 1000  # a process per node
    assert len({s["ppid"] for s in seen}) == 1  # all forked from the same warm parent


def test_limits_inside_a_forked_node_are_the_clusters():
    with Run({"defaults": {"cpus": 1, "memory": 0.5}}) as run:
        handle = run.submit(limits, node="limits")
        seen = handle.result(300)
        host = cluster_container(handle).attrs["HostConfig"]
    assert (seen["cpus"], seen["memory_gib"]) == (1.0, 0.5)
    assert (host["NanoCpus"] / 1e9, host["Memory"] / 2**30) == (1.0, 0.5)


def test_a_cancel_read_before_the_forked_node_has_its_own_group_still_stops_it(tmp_path, monkeypatch):
    """A node cancelled while it launched has its cancel right behind its run on the channel: the agent
    may read it before the child it forked has called setsid() (no process group of its own yet) or
    dropped the parent's SIGTERM handler. The cancel must still stop it, at once, as a SIGTERM."""
    import selectors
    import signal
    from multiprocessing import Pipe

    from skyvm import agent as agent_module
    from skyvm import node as runtime

    monkeypatch.setattr(runtime, "STATE_DIR", tmp_path)
    monkeypatch.setattr(runtime, "ACTIVITY", tmp_path / "activity")
    agent = agent_module.Agent(str(tmp_path / "agent.sock"), b"key", None)
    # The agent's own SIGTERM handler, which a child inherits until it resets it.
    previous = signal.signal(signal.SIGTERM, lambda *_: setattr(agent, "stopping", True))
    real_setsid = os.setsid
    # A child slow to leave the parent's group: the window a loaded machine opens, held open here.
    monkeypatch.setattr(os, "setsid", lambda: (time.sleep(1.5), real_setsid())[1])
    launcher, conn = Pipe()
    child = None
    try:
        job = agent._fork(conn, {"attempt": "early-cancel", "payload_url": "", "result_url": ""})
        if job is not None:  # the forked child: it stands for a node that runs long
            time.sleep(600)
            os._exit(0)
        signal.signal(signal.SIGTERM, previous)
        child = agent.children["early-cancel"]
        assert launcher.recv() == ("started", "early-cancel", child.pid)
        grace = 20.0
        cancelled_at = time.monotonic()
        agent._cancel("early-cancel", grace)
        # The agent's loop: the child's output, its end, the kill after the grace.
        while child.code is None and time.monotonic() - cancelled_at < grace + 10:
            agent.step(0.1)
        took = time.monotonic() - cancelled_at
        assert child.code == agent_module.EXIT_SIGNALLED + signal.SIGTERM, f"the node ended with {child.code} after {took:.1f}s"
        assert took < grace / 2  # stopped by the SIGTERM itself, not by the SIGKILL after the grace
    finally:
        signal.signal(signal.SIGTERM, previous)
        if child is not None and child.code is None:
            os.kill(child.pid, signal.SIGKILL)
            os.waitpid(child.pid, 0)
        agent.close()


def test_cancel_kills_the_nodes_whole_process_group():
    # down: false keeps the cluster after a cancel (a cancelled node's cluster otherwise goes with it, and
    # everything in it): what is left running in it is then the agent's doing.
    from skyvm.backends.local import local_backend

    with Run({"defaults": {"cpus": 1, "down": False, "idle_minutes_to_autostop": 30}}) as run:
        lines = []
        handle = run.submit(spawn_and_sleep, node="group", on_log=lines.append)
        try:
            assert wait_for(lambda: any(line.startswith("pids ") for line in lines), timeout=600), lines
            node_pid, sleeper_pid = map(int, next(line for line in lines if line.startswith("pids ")).split()[1:])
            container = cluster_container(handle)
            before = processes_in(container)
            assert f"{sleeper_pid} {node_pid} sleep 600" in before, before  # the grandchild is in the node's group
            handle.cancel()
            with pytest.raises(NodeCancelled):
                handle.result(120)
            assert wait_for(lambda: "sleep 600" not in processes_in(container)), processes_in(container)
            assert "skyvm.agent" in processes_in(container)  # the agent lives on for the next node
            again = run.submit(limits, node="group")
            assert again.result(120)["cpus"] == 1.0 and again.cluster == handle.cluster
        finally:
            local_backend().remove_cluster(handle.cluster)


def test_an_agent_killed_mid_node_ends_it_as_gone_with_a_clear_error():
    with Run({"defaults": {"cpus": 1}}) as run:
        lines = []
        handle = run.submit(sleep_long, node="orphan", on_log=lines.append)
        assert wait_for(lambda: "sleeping" in lines, timeout=600), lines
        container = cluster_container(handle)
        gone_cluster = handle.cluster
        agent_pid = next(line.split()[0] for line in processes_in(container).splitlines() if line.split()[2:5] == ["python3", "-m", "skyvm.agent"])
        # The container ends with its agent, and may take this very exec with it (exit 137): what counts is below.
        container.exec_run(["python3", "-c", f"import os; os.kill({agent_pid}, 9)"])
        with pytest.raises(InfrastructureError, match=rf"agent of cluster {gone_cluster} is gone"):
            handle.result(120)
        # The cluster went with its agent; the next node of the run gets a new one.
        again = run.submit(limits, node="orphan")
        assert again.result(300)["cpus"] == 1.0
    assert [r for r in list_managed() if r["run_id"] == run.run_id] == []


def test_an_agent_out_of_reach_falls_back_to_an_exec(caplog):
    with Run({"defaults": {"cpus": 1}}) as run:
        first = run.submit(limits, node="reach")
        first.result(300)
        # The socket disappears from the host (the agent runs on): this process's channel is dropped too.
        (agent_dir(first.cluster) / SOCKET).unlink()
        from skyvm.backends.local import local_backend

        local_backend()._close_channel(first.cluster)
        with caplog.at_level(logging.WARNING, logger="skyvm.agent"):
            with caplog.at_level(logging.WARNING, logger="skyvm.local"):
                second = run.submit(limits, node="reach")
                assert second.result(300)["cpus"] == 1.0
        assert second.cluster == first.cluster
        assert "running it with an exec instead" in caplog.text


def test_an_idle_cluster_keeps_spare_children_and_its_next_node_starts_in_one():
    """A warm cluster with nothing to run forks its spares (skyvm.spares): a node then runs in a process
    that was ready before it was submitted, forked by the same agent, and the pages nodes write are learnt
    from its first nodes for the spares to fault in."""
    # 2 GiB: room for every spare (they hold at most a tenth of the cluster's memory, see the test below).
    with Run({"defaults": {"cpus": 1, "memory": 2, "max_clusters": 1}}) as run:
        first = run.submit(process_start, node="spare")
        agent_pid = first.result(300)["ppid"]
        container = cluster_container(first)

        def spare_pids() -> set:
            lines = processes_in(container).splitlines()
            return {int(line.split()[0]) for line in lines if line.split()[2:5] == ["python3", "-m", "skyvm.agent"]} - {agent_pid}

        assert wait_for(lambda: len(spare_pids()) == spares.DEFAULT_COUNT), processes_in(container)
        ready = spare_pids()
        submitted = seconds_since_boot()
        second = run.submit(process_start, node="spare").result(300)
        assert second["pid"] in ready and second["ppid"] == agent_pid
        assert second["started"] < submitted  # its process existed before the node did
        learnt = container.exec_run(["python3", "-c", "import os; print(os.path.getsize('/tmp/skyvm-node/agent-written-pages'))"])
        assert learnt.exit_code == 0 and int(learnt.output) > 0 and int(learnt.output) % 16 == 0, learnt.output
        # Spent spares are made again once the cluster is idle, not between the nodes of a burst.
        assert wait_for(lambda: len(spare_pids()) == spares.DEFAULT_COUNT and second["pid"] not in spare_pids())


def test_spares_end_with_their_agent_and_one_killed_is_made_again(tmp_path, monkeypatch):
    import signal

    from skyvm import agent as agent_module
    from skyvm import node as runtime

    monkeypatch.setattr(runtime, "STATE_DIR", tmp_path)
    monkeypatch.setattr(runtime, "ACTIVITY", tmp_path / "activity")
    monkeypatch.setenv(spares.COUNT_ENV, "2")
    agent = agent_module.Agent(str(tmp_path / "agent.sock"), b"key", None)
    pids = []
    try:
        agent.last_busy -= spares.IDLE_S  # idle long enough
        while agent._spare_due():
            if agent._fork_spare() is not None:  # in a spare that got a job: none is handed over here
                os._exit(99)
        pids = [spare.pid for spare in agent.spares]
        assert len(pids) == 2
        # The second holds none of the first's pipes: the first sees its end when the agent goes, whoever is left.
        first_pipes = {os.readlink(f"/proc/self/fd/{fd}") for fd in (agent.spares[0].job, agent.spares[0].pipe)}

        def held() -> set:  # once the second has closed what it inherited (it does so as it starts)
            return {os.readlink(f"/proc/{pids[1]}/fd/{fd}") for fd in os.listdir(f"/proc/{pids[1]}/fd")}

        assert wait_for(lambda: not first_pipes & held(), timeout=30), (first_pipes, held())
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while pids[0] in [spare.pid for spare in agent.spares] and time.monotonic() < deadline:
            agent.step(0.1)
        assert [spare.pid for spare in agent.spares] == pids[1:]  # noticed and reaped
        assert not agent._spare_due()  # made again once the cluster has been idle again, not at once
        agent.last_busy -= spares.IDLE_S
        assert agent._spare_due()
    finally:
        agent.close()
    assert agent.spares == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):  # reaped, not a zombie: nothing of the agent's left running
            os.kill(pid, 0)


def test_spares_hold_at_most_a_tenth_of_the_clusters_memory(tmp_path, monkeypatch):
    from array import array

    monkeypatch.delenv(spares.COUNT_ENV, raising=False)
    pages = tmp_path / "pages"
    assert spares.wanted(pages, None) == spares.DEFAULT_COUNT  # no limit, nothing learnt: the default
    pages.write_bytes(array("Q", [0x10000, 12 << 20, 0x2000000, 4 << 20]).tobytes())  # 16 MiB learnt
    each = (16 << 20) + spares.FORK_BYTES
    assert spares.wanted(pages, 1 << 30) == (1 << 30) // 10 // each == 5
    assert spares.wanted(pages, 128 << 20) == 0  # a small cluster keeps its memory for its nodes
    monkeypatch.setenv(spares.COUNT_ENV, "0")
    assert spares.wanted(pages, 64 << 30) == 0  # turned off
