"""The node runtime (`python -m skyvm.node`), run as a real process against a real store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import cloudpickle
import pytest

from skyvm.node import EXIT_CANCELLED, EXIT_INFRA, make_call_payload, make_command_payload
from skyvm.payloads import LocalStore


class Boom(Exception):
    pass


def add(a, b):
    print(f"adding {a} and {b}")
    return a + b


def explode():
    raise Boom("kaboom from the node")


async def async_double(x):
    return 2 * x


def run_node(store, payload: bytes, attempt="a1", env=None, wait=True):
    url = store.put_payload(payload)
    cmd = [sys.executable, "-m", "skyvm.node", "run", "--payload", url, "--result", store.url_for(f"results/{attempt}"), "--attempt", attempt]
    env = {**os.environ, "SKYVM_NODE_STATE": str(store.root / "state"), **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def result_of(store, attempt="a1"):
    return cloudpickle.loads(store.get(f"results/{attempt}"))


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


def test_call_success(store):
    out = run_node(store, make_call_payload(add, (2, 3)))
    assert out.returncode == 0, out.stderr
    assert "adding 2 and 3" in out.stdout
    res = result_of(store)
    assert res["ok"] and res["value"] == 5


def apply(fn, x):
    return fn(x)


def test_a_function_from_another_user_module_travels_by_value(store, tmp_path, monkeypatch):
    """Not only the called function's module: a function the call reaches (an argument, a global of a flow)
    from a module the node cannot import goes by value too."""
    import importlib
    import uuid

    name = f"skyvm_helpers_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("def plus_one(x):\n    return x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # importable here only: the node's Python has no such path
    try:
        helper = importlib.import_module(name).plus_one
        out = run_node(store, make_call_payload(apply, (helper, 3)))
    finally:
        sys.modules.pop(name, None)
    assert out.returncode == 0, out.stdout + out.stderr
    assert result_of(store)["value"] == 4


def test_async_call(store):
    out = run_node(store, make_call_payload(async_double, (21,)))
    assert out.returncode == 0 and result_of(store)["value"] == 42


def test_call_failure_carries_the_traceback(store):
    out = run_node(store, make_call_payload(explode))
    assert out.returncode == 1
    assert "Boom: kaboom from the node" in out.stderr  # the node's log
    res = result_of(store)
    assert not res["ok"] and res["exc_type"] == "Boom"
    assert "in explode" in res["traceback"]
    assert isinstance(cloudpickle.loads(res["exc"]), Boom)


def test_command_result_is_the_last_line(store):
    out = run_node(store, make_command_payload("echo first; echo; echo last line"))
    assert out.returncode == 0
    res = result_of(store)
    assert res["value"] == "last line" and res["returncode"] == 0


def test_failing_command_exits_with_its_code(store):
    out = run_node(store, make_command_payload("echo doing; exit 7"))
    assert out.returncode == 7
    res = result_of(store)
    assert not res["ok"] and res["returncode"] == 7 and "exited with code 7" in res["message"]


def test_missing_payload_is_an_infrastructure_exit(store):
    cmd = [sys.executable, "-m", "skyvm.node", "run", "--payload", store.url_for("payloads/" + "0" * 64), "--result", store.url_for("results/x"), "--attempt", "x"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SKYVM_NODE_STATE": str(store.root / "state")})
    assert out.returncode == EXIT_INFRA
    assert "does not exist" in out.stderr
    assert not store.exists("results/x")


def test_cancel_stops_a_running_attempt_and_its_children(store):
    proc = run_node(store, make_command_payload("echo started; sleep 60; echo never"), attempt="slow", wait=False)
    assert proc.stdout.readline().strip() == "started"
    state = str(store.root / "state")
    subprocess.run([sys.executable, "-m", "skyvm.node", "cancel", "--attempt", "slow"], env={**os.environ, "SKYVM_NODE_STATE": state}, check=True)
    assert proc.wait(timeout=10) == EXIT_CANCELLED
    assert "never" not in proc.stdout.read()
    assert not store.exists("results/slow")
    out = subprocess.run(["pgrep", "-f", "sleep 60"], capture_output=True, text=True)
    assert out.stdout.strip() == ""


def test_idle_watch_exits_after_idle(tmp_path):
    env = {**os.environ, "SKYVM_NODE_STATE": str(tmp_path), "SKYVM_IDLE_POLL_S": "0.2"}
    proc = subprocess.Popen([sys.executable, "-m", "skyvm.node", "idle-watch", "--minutes", "0"], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.wait(timeout=10) == 0
    assert "autostop" in proc.stdout.read()
    forever = subprocess.Popen([sys.executable, "-m", "skyvm.node", "idle-watch"], env=env)
    with pytest.raises(subprocess.TimeoutExpired):
        forever.wait(timeout=1)  # five idle polls and no autostop set: it stays up
    forever.send_signal(signal.SIGTERM)
    assert forever.wait(timeout=5) == 0


def test_multi_node_ranks_a_callable_on_rank_0_a_command_on_every_rank(store, tmp_path):
    """num_nodes > 1: SkyPilot starts the run command on every VM with SKYPILOT_NODE_RANK set."""
    marker = tmp_path / "ran"
    other = run_node(store, make_call_payload(add, (2, 3)), attempt="c1", env={"SKYPILOT_NODE_RANK": "1"})
    assert other.returncode == 0 and "adding" not in other.stdout and "runs on rank 0" in other.stdout
    assert not store.exists("results/c1")  # only rank 0 reports
    rank0 = run_node(store, make_call_payload(add, (2, 3)), attempt="c1", env={"SKYPILOT_NODE_RANK": "0"})
    assert rank0.returncode == 0 and result_of(store, "c1")["value"] == 5
    everywhere = run_node(store, make_call_payload(add, (1, 1)), attempt="c2", env={"SKYPILOT_NODE_RANK": "2", "SKYVM_ALL_RANKS": "1"})
    assert "adding 1 and 1" in everywhere.stdout and not store.exists("results/c2")
    command = run_node(store, make_command_payload(f'echo "rank $SKYPILOT_NODE_RANK" >> {marker}; exit 3'), attempt="m1", env={"SKYPILOT_NODE_RANK": "1"})
    assert command.returncode == 3 and marker.read_text() == "rank 1\n"  # its exit code fails the job
