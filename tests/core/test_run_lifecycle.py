"""A run's life in a long-lived process, on a real Docker engine: what it holds on to, how long it
waits, what happens when the watcher thread fails, and what a node's BaseException becomes."""

from __future__ import annotations

import gc
import logging
import os
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import weakref

import pytest

from skyvm import InfrastructureError, NodeCancelled, NodeFailed, NodeTimeout, Run
from skyvm.api import backend_for
from skyvm.backends.local import list_managed, local_backend
from skyvm.context import Context
from skyvm.errors import NodeAborted, SettingsError
from skyvm.settings import NodeSettings
from test_local_backend import containers_of, wait_until  # pytest puts tests/core on sys.path

pytestmark = pytest.mark.usefixtures("docker_engine")

SMALL = {"defaults": {"cpus": 0.5, "memory": 0.25}}
HANG_GUARD_S = 180  # a wait that would hang on a dead watcher fails after this instead (not a timing check)


def exits(code):
    print("leaving with sys.exit", flush=True)
    sys.exit(code)


def interrupted():
    raise KeyboardInterrupt("pressed on the node")


def size_of(blob):
    return len(blob)


def chatter(n):
    for i in range(n):
        print(f"line {i}", flush=True)
    return n


def nap_then(seconds, value):
    print("started", flush=True)
    time.sleep(seconds)
    return value


# -- errors stay truthful -------------------------------------------------------------------------


def test_sys_exit_on_the_node_is_an_exception_here_naming_it_with_the_remote_traceback():
    with Run(SMALL) as run:
        handle = run.submit(exits, 3, node="exits")
        with pytest.raises(NodeFailed) as err:
            handle.result(HANG_GUARD_S)
    error = err.value
    # An Exception (the launching process goes on), never the SystemExit itself.
    assert isinstance(error, NodeAborted) and isinstance(error, Exception)
    assert error.exit_code == 3 and error.exc_type == "SystemExit"
    assert getattr(error, "remote_exception", None) is None
    assert "'exits' was ended by SystemExit(3)" in str(error)
    assert "in exits" in error.remote_traceback and error.remote_traceback.rstrip().endswith("SystemExit: 3")


def test_keyboard_interrupt_on_the_node_is_an_exception_here():
    with Run(SMALL) as run:
        handle = run.submit(interrupted, node="interrupted")
        error = handle.exception(HANG_GUARD_S)
    assert isinstance(error, NodeAborted) and error.exit_code is None
    assert getattr(error, "remote_exception", None) is None
    assert "KeyboardInterrupt(pressed on the node)" in str(error) and "in interrupted" in error.remote_traceback


# -- memory: what a run and a handle keep ---------------------------------------------------------


def test_a_run_drops_finished_handles_and_a_handle_lets_go_of_its_payload():
    big = os.urandom(32 * 2**20)  # a 32 MiB argument: its pickled payload is as large
    with Run(SMALL) as run:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            handle = run.submit(size_of, big, node="big-argument")
            assert handle.result(HANG_GUARD_S) == len(big)
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        # The caller still holds the handle, but not the payload through it.
        assert held < 16 * 2**20, f"{held / 2**20:.1f} MiB still held after the node finished"
        assert run.handles == []  # the run holds only unfinished nodes
        ref = weakref.ref(handle)
        del handle
        gc.collect()
        assert ref() is None, "the run still holds a finished node's handle"


def test_a_handle_keeps_a_bounded_tail_of_its_log_and_on_log_gets_every_line():
    seen = []
    with Run(SMALL, ctx=Context(log_tail_lines=50)) as run:
        handle = run.submit(chatter, 400, node="chatter", on_log=seen.append)
        assert handle.result(HANG_GUARD_S) == 400
    assert [line for line in seen if line.startswith("line ")] == [f"line {i}" for i in range(400)]
    kept = handle.logs().splitlines()
    assert len(kept) == 50 and kept[-1] == "line 399" and "line 0" not in kept


# -- bounded waits ---------------------------------------------------------------------------------


def test_close_without_cancel_waits_only_up_to_its_bound_then_cancels_and_names_the_node():
    run = Run(SMALL)
    handle = run.submit(nap_then, 600, "never", node="sleeper")
    assert wait_until(lambda: "started" in handle.logs(), 120)
    with pytest.raises(NodeTimeout, match="'sleeper' did not finish within 3s of close"):
        run.close(cancel=False, timeout=3)
    assert isinstance(handle.exception(HANG_GUARD_S), NodeCancelled)
    assert containers_of(run.run_id) == []


def test_close_asks_every_node_to_stop_at_once(tmp_path):
    """Each node ignores SIGTERM and, once it got one, waits (within the local backend's 10 s grace before
    its SIGKILL) for the others to get theirs: only a close that cancels them side by side lets each see all."""
    shared = tmp_path / "signals"
    shared.mkdir()
    os.chmod(shared, 0o777)
    n = 3

    def stubborn(i, total):
        import pathlib

        here = pathlib.Path("/signals")

        def on_term(signum, frame):
            (here / f"term-{i}").touch()
            deadline = time.time() + 8
            while time.time() < deadline:
                if len(list(here.glob("term-*"))) == total:
                    (here / f"saw-all-{i}").touch()
                    break
                time.sleep(0.1)
            os._exit(143)

        signal.signal(signal.SIGTERM, on_term)
        print("started", flush=True)
        time.sleep(600)

    config = {"defaults": {"cpus": 0.5, "memory": 0.25, "max_clusters": n, "docker_run_args": ["--volume", f"{shared}:/signals"]}}
    run = Run(config)
    handles = [run.submit(stubborn, i, n, node=f"stubborn-{i}") for i in range(n)]
    assert wait_until(lambda: all("started" in h.logs() for h in handles), 240)
    run.close(cancel=True, timeout=60)
    assert all(isinstance(h.exception(1), NodeCancelled) for h in handles)
    assert sorted(p.name for p in shared.glob("term-*")) == [f"term-{i}" for i in range(n)]
    assert sorted(p.name for p in shared.glob("saw-all-*")) == [f"saw-all-{i}" for i in range(n)]
    assert containers_of(run.run_id) == []


# -- the watcher is supervised ---------------------------------------------------------------------


def test_a_log_sink_that_raises_system_exit_neither_stops_the_node_nor_the_watcher():
    calls = []

    def sink(line):
        calls.append(line)
        if len(calls) == 1:
            raise SystemExit(1)  # an engine's handler gone wrong

    with Run(SMALL) as run:
        handle = run.submit(chatter, 5, node="sink-exits", on_log=sink)
        assert handle.result(HANG_GUARD_S) == 5
        # The watcher still follows nodes afterwards.
        assert run.submit(chatter, 2, node="after").result(HANG_GUARD_S) == 2
    assert "line 4" in calls


def test_a_failed_watcher_round_is_survived_and_the_node_finishes(monkeypatch, caplog):
    # The exec path, whose stream the watcher follows (an agent's channel has a reader of its own).
    monkeypatch.setenv("SKYVM_AGENT", "0")
    ctx = Context()  # its own watcher: the failure is injected there, nowhere else
    watcher = ctx.watcher()
    original = watcher._run_due
    failed = []

    def fails_once():
        if not failed:
            failed.append(True)
            raise RuntimeError("injected watcher failure")
        return original()

    with Run(SMALL, ctx=ctx) as run:
        handle = run.submit(nap_then, 3, "survived", node="through-a-failure")
        assert wait_until(lambda: "started" in handle.logs(), 120)
        with caplog.at_level(logging.ERROR, logger="skyvm.watcher"):
            monkeypatch.setattr(watcher, "_run_due", fails_once)
            assert handle.result(HANG_GUARD_S) == "survived"
    assert failed and "injected watcher failure" in caplog.text
    assert containers_of(run.run_id) == []


def test_a_watcher_that_keeps_failing_gives_every_waiter_an_error_naming_it(monkeypatch):
    def always_fails():
        raise RuntimeError("injected watcher failure")

    ctx = Context()  # its own watcher: the failure is injected there, nowhere else
    run = Run(SMALL, ctx=ctx)
    try:
        handle = run.submit(nap_then, 600, "never", node="abandoned")
        assert wait_until(lambda: "started" in handle.logs(), 120)
        monkeypatch.setattr(ctx.watcher(), "_run_due", always_fails)
        with pytest.raises(InfrastructureError, match="watcher thread stopped after .* injected watcher failure") as err:
            handle.result(HANG_GUARD_S)
        assert "'abandoned'" in str(err.value)
        monkeypatch.undo()
        # The next node gets a new watcher.
        assert not ctx.watcher().failed
        assert run.submit(nap_then, 0, "fresh", node="after-the-failure").result(HANG_GUARD_S) == "fresh"
    finally:
        monkeypatch.undo()
        run.close()
    assert containers_of(run.run_id) == []


def test_a_poll_that_hangs_stalls_no_other_nodes_stream_deadline_or_poll():
    """A status call that hangs (a SkyPilot bridge call may take minutes) holds a poll thread, never the
    watcher's: in the same process another node's log still streams, its timeout still fires, and
    another attempt's polls still take their turns."""
    ctx = Context(poll_threads=2)
    watcher = ctx.watcher()
    in_hung_poll, let_it_return, hung_returned = threading.Event(), threading.Event(), threading.Event()

    def hung_poll():  # as a backend's status() waiting on a bridge that does not answer
        in_hung_poll.set()
        let_it_return.wait(HANG_GUARD_S)
        hung_returned.set()
        return True

    turns, polled_thrice = [], threading.Event()

    def other_poll():
        turns.append(len(turns))
        if len(turns) == 3:
            polled_thrice.set()
        return len(turns) >= 3

    watcher.add_polled(hung_poll, 0.1)
    try:
        assert in_hung_poll.wait(HANG_GUARD_S)
        watcher.add_polled(other_poll, 0.1)
        seen = []
        with Run(SMALL, ctx=ctx) as run:
            streams = run.submit(chatter, 3, node="streams-meanwhile", on_log=seen.append)
            times_out = run.submit(nap_then, 600, "never", node="times-out-meanwhile", options={"timeout": 5})
            assert streams.result(HANG_GUARD_S) == 3
            with pytest.raises(NodeTimeout, match="'times-out-meanwhile' exceeded its timeout of 5s"):
                times_out.result(HANG_GUARD_S)
            assert polled_thrice.wait(HANG_GUARD_S)
            # All of it happened while the hung poll had not returned.
            assert not hung_returned.is_set()
        assert [line for line in seen if line.startswith("line ")] == ["line 0", "line 1", "line 2"]
        assert turns == [0, 1, 2]
    finally:
        let_it_return.set()
    assert hung_returned.wait(HANG_GUARD_S)
    assert containers_of(run.run_id) == []


# -- one handle: an attempt followed from its reference, in any process ---------------------------


def test_a_node_let_go_is_followed_to_its_result_from_its_reference_in_a_fresh_process(tmp_path):
    """What an Airflow trigger does, whole: another process attaches to the reference, follows the attempt
    (polling) to its result and log, and releases it; the run that launched it lets go and never waits."""
    follower = tmp_path / "follow.py"
    follower.write_text(
        textwrap.dedent(
            """
            import json, sys
            from skyvm.api import NodeHandle

            node = NodeHandle.attach(json.loads(sys.stdin.read()))
            print("RESULT", json.dumps(node.result(120)))
            print("LOG", json.dumps(node.logs().splitlines()))
            node.release()
            """
        )
    )
    with Run(SMALL) as run:
        launched = run.submit(nap_then, 1, {"answer": 42}, node="followed-elsewhere")
        reference = json.loads(json.dumps(launched.let_go()))  # what an engine stores
        assert run.handles == [] and not launched.done()  # the run no longer holds or waits on it
        out = subprocess.run([sys.executable, str(follower)], input=json.dumps(reference), capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert out.returncode == 0, out.stderr
        lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("RESULT ", "LOG ")))
        assert json.loads(lines["RESULT"]) == {"answer": 42}
        assert "started" in json.loads(lines["LOG"])
        # Released by the process that followed it: a down cluster goes then, not at the launcher's run end.
        assert not [r for r in list_managed() if r["name"] == reference["cluster"]]
    assert containers_of(run.run_id) == []


# -- settings reach the backend chosen for them ----------------------------------------------------


def test_a_backend_name_from_a_node_reference_maps_to_its_backend():
    settings = NodeSettings()
    # "local-process" is the local backend's name on a host without Docker: still the local backend.
    assert backend_for(settings, "local-process") is local_backend()
    assert backend_for(settings, "local") is local_backend()
    with pytest.raises(SettingsError, match="unknown backend name 'nope': accepted are local, local-process, skypilot"):
        backend_for(settings, "nope")


def test_a_relayed_record_goes_to_the_sink_even_unstreamed_and_never_into_the_log_tail():
    from skyvm.handle import NodeHandle
    from skyvm.node import RELAY_MARK

    got = []
    handle = NodeHandle("n", NodeSettings(stream_logs=False), ctx=Context(), on_log=got.append)
    handle._log("an ordinary line")
    handle._log(f'{RELAY_MARK}{{"event": 1}}')
    handle._log(f'printed without a newline{RELAY_MARK}{{"log": 2}}')
    assert got == [f'{RELAY_MARK}{{"event": 1}}', f'{RELAY_MARK}{{"log": 2}}']  # stream_logs: false holds back only the log
    assert handle.logs() == "an ordinary line\nprinted without a newline"
