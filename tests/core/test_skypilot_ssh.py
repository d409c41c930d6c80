"""Warm nodes on a SkyPilot cluster go to its agent over SSH, not as SkyPilot jobs (issue 20).

SkyPilot is reached through ``SubprocessBridge`` and answered by the recording stand-in VM
(tests/skypilot/standin_vm.py): its cluster is a container of the node image with Debian's
openssh-server in it, a key pair and a host key of the cluster's own, handed out by the bridge's
``ssh_info`` as SkyPilot's cluster handle does. The launch's setup starts the agent there; sshd,
the agent, the registry and S3 (moto) are real.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse

import pytest

from skyvm import InfrastructureError, NodeCancelled, Run
from skyvm.backends.agent_channel import agent_dir


def _settings(s3_server, registry, **more) -> dict:
    return {"defaults": {"backend": "skypilot", "cloud": "aws", "down": True, "max_clusters": 1, "payload_store": "s3://skyvm-test/ssh",
                         "payload_store_endpoint": s3_server, "registry": registry.model_dump(), **more}}


@pytest.fixture
def vm_settings(standin_vm, s3_server, registry, monkeypatch):
    monkeypatch.setenv("SKYVM_S3_ENDPOINT_URL", s3_server)
    return _settings(s3_server, registry)


def parent_command() -> str:
    """What started this node's process: the cluster's agent, or a job's shell."""
    import os

    with open(f"/proc/{os.getppid()}/cmdline", "rb") as fh:
        return fh.read().replace(b"\0", b" ").decode().strip()


def spawn_and_wait(seconds: float) -> int:
    """A node that starts a child in its own process group, says the child's pid, and waits."""
    import subprocess as sp
    import time as t

    child = sp.Popen(["sleep", "300"])
    print(f"child pid {child.pid}", flush=True)
    t.sleep(seconds)
    return child.pid


def chatty(seconds: float) -> str:
    import time as t

    print("before the drop", flush=True)
    t.sleep(seconds)
    print("after the drop", flush=True)
    return "done"


def _container(cluster: str) -> str:
    return f"skyvm-standin-{cluster}"[:120]


def _wait_for_line(handle, text: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in handle.logs().splitlines():
            if text in line:
                return line
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} in the node's log: {handle.logs()[-2000:]}")


def _kill_sshd(cluster: str, *, sessions_only: bool) -> list[int]:
    """Kill sshd's per-connection processes in the cluster's container (and its listener too)."""
    script = (
        "import os, signal\n"
        "killed = []\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try:\n"
        "        cmd = open(f'/proc/{pid}/cmdline', 'rb').read().replace(b'\\0', b' ').decode()\n"
        "    except OSError:\n"
        "        continue\n"
        f"    if cmd.startswith('sshd: root') or (not {sessions_only} and 'sshd' in cmd.split(' ')[0]):\n"
        "        os.kill(int(pid), signal.SIGKILL); killed.append(int(pid))\n"
        "print(killed)\n"
    )
    out = subprocess.run(["docker", "exec", _container(cluster), "python3", "-c", script], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _terminal_sessions(cluster: str) -> int:
    """SSH sessions with a terminal in the cluster's container: what SkyPilot's autostop counts as activity."""
    script = (
        "import os\n"
        "n = 0\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try:\n"
        "        stat = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()\n"
        "        parent = open(f'/proc/{stat[1]}/cmdline', 'rb').read()\n"
        "    except OSError:\n"
        "        continue\n"
        "    n += int(stat[4]) != 0 and parent.startswith(b'sshd')\n"
        "print(n)\n"
    )
    out = subprocess.run(["docker", "exec", _container(cluster), "python3", "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def _alive_in(cluster: str, pid: int) -> bool:
    """The process runs in the cluster's container (a zombie is dead: the container's first process, a
    plain ``sleep``, reaps no orphan)."""
    check = f"awk '/^State:/ {{exit ($2 == \"Z\")}}' /proc/{pid}/status"
    return subprocess.run(["docker", "exec", _container(cluster), "sh", "-c", check], capture_output=True).returncode == 0


def test_warm_nodes_go_over_ssh_to_the_agent_with_one_launch_and_no_exec(standin_vm, vm_settings):
    with Run(vm_settings) as run:
        first = run.submit(parent_command, node="first")
        assert "skyvm.agent" not in first.result(600)  # the launch's own job
        key = (agent_dir(first.cluster) / "key").read_text()
        warm = [run.submit(parent_command, node=f"warm-{i}") for i in range(3)]
        parents = [h.result(300) for h in warm]
        for h in warm:
            assert h.cluster == first.cluster
            assert f"runs on cluster {h.cluster} through its agent over SSH (root@127.0.0.1:" in h.logs()
    # The agent, with the payload store's file system imported ahead of the nodes it forks.
    assert all("runpy.run_module('skyvm.agent'" in p and "skyvm.payloads,s3fs --socket /tmp/skyvm-agent/agent.sock" in p for p in parents), parents
    calls = standin_vm.calls()
    kinds = [c["call"] for c in calls]
    assert kinds.count("launch") == 1 and kinds.count("exec") == 0, kinds
    assert len({c["job_id"] for c in calls if c["call"] in ("job_status", "tail_logs")}) == 1  # only the launch's job is polled
    assert kinds.count("ssh_info") == 1  # one connection for the cluster, shared by every warm node
    launch = next(c for c in calls if c["call"] == "launch")
    assert "SKYVM_AGENT_KEY" in launch["task"]["secrets"] and "skyvm.agent" in launch["task"]["setup"]
    assert key not in (standin_vm.dir / "calls.jsonl").read_text()  # a secret: its name is recorded, never its value
    assert not agent_dir(first.cluster).exists()  # gone with the cluster


def size(text: str) -> int:
    return len(text)


def test_a_warm_node_with_a_small_payload_makes_no_bridge_call_and_no_store_round_trip(standin_vm, s3_server, registry, monkeypatch):
    import uuid

    import boto3

    from skyvm.backends import agent_channel
    from skyvm.backends.skypilot import SkyPilotBackend

    monkeypatch.setenv("SKYVM_S3_ENDPOINT_URL", s3_server)
    prefix = f"inline-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=s3_server)

    def stored() -> set[str]:
        return {o["Key"] for o in s3.list_objects_v2(Bucket="skyvm-test", Prefix=f"{prefix}/").get("Contents", [])}

    with Run(_settings(s3_server, registry, payload_store=f"s3://skyvm-test/{prefix}")) as run:
        first = run.submit(size, "launch", node="first")
        assert first.result(600) == 6
        # The launch is a SkyPilot job: its node read its payload from the store and left its result there.
        assert {k.split("/")[1] for k in stored()} == {"payloads", "results"}
        assert run.submit(size, "opens the connection", node="warm-0").result(300) == 20
        calls, objects = len(standin_vm.calls()), stored()
        warm = [run.submit(size, "x" * (i + 1), node=f"warm-{i + 1}") for i in range(3)]
        assert [h.result(300) for h in warm] == [1, 2, 3]
        assert all("through its agent over SSH" in h.logs() for h in warm)
        assert standin_vm.calls()[calls:] == []  # not one bridge call: the connection was open
        assert stored() == objects  # payloads went inline, results came back over SSH
        # A payload over the inline bound goes through the store (the node reads it there); its result still over SSH.
        monkeypatch.setattr(agent_channel, "INLINE_PAYLOAD_MAX", 4096)
        monkeypatch.setattr(SkyPilotBackend, "inline_payload_max", 4096)
        assert run.submit(size, "y" * 20000, node="large").result(300) == 20000
        assert [k.split("/")[1] for k in stored() - objects] == ["payloads"]
    assert [c["call"] for c in standin_vm.calls()].count("exec") == 0


def test_without_ssh_a_warm_node_is_a_sky_exec_and_its_log_says_so(standin_vm, vm_settings, monkeypatch):
    monkeypatch.setenv("SKYVM_STANDIN_SSH", "0")  # a cluster SkyPilot gives no SSH access to
    with Run(vm_settings) as run:
        run.submit(parent_command, node="first").result(600)
        warm = run.submit(parent_command, node="warm")
        assert "skyvm.agent" not in warm.result(300)
        assert "as a SkyPilot job (sky exec): SkyPilot gives no SSH access to it" in warm.logs()
    kinds = [c["call"] for c in standin_vm.calls()]
    assert kinds.count("launch") == 1 and kinds.count("exec") == 1


def test_cancel_over_the_channel_kills_the_nodes_process_group(standin_vm, vm_settings):
    from skyvm.backends.skypilot import skypilot_backend

    # down: false, so the cluster outlives the cancelled node and what is left running in it can be seen.
    with Run({"defaults": {**vm_settings["defaults"], "down": False}}) as run:
        run.submit(parent_command, node="first").result(600)
        node = run.submit(spawn_and_wait, 300, node="waits")
        child = int(_wait_for_line(node, "child pid").split()[-1])
        assert _alive_in(node.cluster, child)
        # While it runs (no SkyPilot job), a session with a terminal keeps SkyPilot's autostop from taking it for idle.
        assert _terminal_sessions(node.cluster) == 1
        node.cancel()
        with pytest.raises(NodeCancelled):
            node.result(120)
        ps = subprocess.run(["docker", "exec", _container(node.cluster), "ps", "-eo", "pid,ppid,pgid,sid,stat,args"], capture_output=True, text=True).stdout
        assert _alive_in(node.cluster, 1) and not _alive_in(node.cluster, child), ps  # the cluster is up; the node's group is gone
        deadline = time.monotonic() + 60
        while _terminal_sessions(node.cluster) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _terminal_sessions(node.cluster) == 0  # the last node ended: the cluster may idle
    skypilot_backend().remove_cluster(node.cluster)
    kinds = [c["call"] for c in standin_vm.calls()]
    assert kinds.count("exec") == 0 and kinds.count("cancel") == 0  # no SkyPilot job to cancel: the agent did it


def test_a_killed_ssh_session_mid_node_reconnects_and_the_node_finishes(standin_vm, vm_settings):
    with Run(vm_settings) as run:
        run.submit(parent_command, node="first").result(600)
        node = run.submit(chatty, 4, node="chatty")
        _wait_for_line(node, "before the drop")
        assert _kill_sshd(node.cluster, sessions_only=True)
        assert node.result(300) == "done"
        lines = node.logs().splitlines()
        assert lines.count("before the drop") == 1 and lines.count("after the drop") == 1
        # The next warm node goes over the new connection.
        assert "--socket /tmp/skyvm-agent/agent.sock" in run.submit(parent_command, node="after").result(300)
    assert [c["call"] for c in standin_vm.calls()].count("exec") == 0


def test_a_connection_down_past_the_bound_ends_the_node_gone_naming_the_cluster(standin_vm, vm_settings, monkeypatch):
    monkeypatch.setenv("SKYVM_SSH_RECONNECT_S", "3")
    with Run(vm_settings) as run:
        run.submit(parent_command, node="first").result(600)
        node = run.submit(chatty, 120, node="stranded")
        _wait_for_line(node, "before the drop")
        cluster = node.cluster
        assert _kill_sshd(cluster, sessions_only=False)
        with pytest.raises(InfrastructureError) as err:
            node.result(300)
    assert f"cluster {cluster} stayed out of reach over SSH for 3s" in str(err.value)


def test_another_process_follows_a_warm_node_from_its_reference_over_its_own_connection(standin_vm, vm_settings):
    import os
    import sys

    from skyvm.backends.skypilot import skypilot_backend

    with Run(vm_settings) as run:
        run.submit(parent_command, node="first").result(600)
        node = run.submit(chatty, 3, node="deferred")
        _wait_for_line(node, "before the drop")
        reference = node.let_go()  # as Airflow defers a task: this process follows it no more
        cluster = node.cluster
        script = (
            "import json, sys\n"
            "from skyvm.handle import NodeHandle\n"
            "h = NodeHandle.attach(json.loads(sys.argv[1]))\n"
            "print(json.dumps({'result': h.result(300), 'log': h.logs()}))\n"
        )
        out = subprocess.run([sys.executable, "-c", script, json.dumps(reference)], capture_output=True, text=True, env=os.environ, timeout=600)
        skypilot_backend().remove_cluster(cluster)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["result"] == "done" and "after the drop" in seen["log"]
    calls = standin_vm.calls()
    followers = {c["pid"] for c in calls if c["call"] == "ssh_info"}
    assert len(followers) == 2  # the other process asked the bridge for the cluster's SSH access itself
    assert [c["call"] for c in calls].count("exec") == 0


def fetch_api() -> tuple[str, str]:
    """What an engine-mode Prefect node does first: ask the API at PREFECT_API_URL."""
    import os
    import urllib.request

    url = os.environ["PREFECT_API_URL"]
    with urllib.request.urlopen(url + "/health", timeout=30) as resp:
        return url, resp.read().decode()


@pytest.fixture
def loopback_api():
    """An HTTP API on this machine's loopback only (as a local `prefect server` is): (its URL, its port)."""
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"healthy at {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/api", server.server_port
    server.shutdown()


def test_a_node_reaches_an_api_on_the_launchers_loopback_through_a_reverse_forward(standin_vm, vm_settings, loopback_api):
    api, port = loopback_api
    with Run(vm_settings) as run:
        run.submit(parent_command, node="first").result(600)
        node = run.submit(fetch_api, node="engine", options={"secrets": {"PREFECT_API_URL": api}})
        url, body = node.result(300)
        again = run.submit(fetch_api, node="engine-2", options={"secrets": {"PREFECT_API_URL": api}}).result(300)
    forwarded = urllib.parse.urlsplit(url)
    assert forwarded.hostname == "127.0.0.1" and forwarded.port != port and forwarded.path == "/api"
    assert body == "healthy at /api/health"
    assert again[0] == url  # one forward per cluster, shared by its nodes
    assert f"PREFECT_API_URL on the node is the VM's 127.0.0.1:{forwarded.port}, forwarded over SSH" in node.logs()


def test_the_first_node_of_a_fresh_cluster_that_needs_the_launchers_api_goes_through_the_agent(standin_vm, vm_settings, loopback_api):
    # No warm cluster yet: a launch's own job could not reach this machine's loopback from a VM, so the launch
    # runs setup only (the agent starts) and the node goes over the cluster's SSH connection, forward and all.
    api, port = loopback_api
    with Run(vm_settings) as run:
        node = run.submit(fetch_api, node="engine", options={"secrets": {"PREFECT_API_URL": api}})
        url, body = node.result(600)
    forwarded = urllib.parse.urlsplit(url)
    assert body == "healthy at /api/health" and forwarded.port != port, node.logs()
    assert f"PREFECT_API_URL on the node is the VM's 127.0.0.1:{forwarded.port}, forwarded over SSH" in node.logs()
    made = standin_vm.calls()
    launches = [c for c in made if c["call"] == "launch"]
    assert len(launches) == 1 and launches[0]["task"].get("run") is None  # setup only: no SkyPilot job
    assert not [c for c in made if c["call"] in ("exec", "tail_logs", "job_status")]


def test_a_wrong_key_or_host_key_is_refused_naming_the_cluster(standin_vm, vm_settings):
    import asyncssh

    from skyvm.backends.skypilot import skypilot_backend
    from skyvm.skypilot.ssh_channel import SSHLink, SSHRefused

    with Run(vm_settings) as run:
        first = run.submit(parent_command, node="first")
        first.result(600)
        info = skypilot_backend().bridge.ssh_info(first.cluster)
        other = asyncssh.generate_private_key("ssh-ed25519")
        wrong_key = {**info, "private_key": other.export_private_key().decode()}
        wrong_host = {**info, "host_key": other.export_public_key().decode()}
        for bad, says in ((wrong_key, "refused SkyPilot's key"), (wrong_host, "is not the one SkyPilot recorded")):
            link = SSHLink(first.cluster, bad, f"/tmp/skyvm-test-fwd-{time.monotonic_ns()}.sock", "/tmp/skyvm-agent/agent.sock")
            with pytest.raises(SSHRefused) as err:
                link.open()
            assert f"cluster {first.cluster}" in str(err.value) and says in str(err.value)
            link.close()
