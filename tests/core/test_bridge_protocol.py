"""SubprocessBridge's protocol: one long-lived process in the other environment, concurrent calls,
log lines streamed per call, and a dead process reported (then replaced), never a hang.

The far side is ``skyvm.skypilot.bridge.serve`` itself, serving a small bridge written here
(this suite's environment has no SkyPilot; the SkyPilot suites run the same protocol against
SkyPilot's real API server)."""

from __future__ import annotations

import os
import sys
import textwrap
import threading
import time

import pytest

from skyvm.errors import InfrastructureError
from skyvm.skypilot.bridge import SubprocessBridge

FAR_SIDE = textwrap.dedent(
    """
    import os, sys, time
    from skyvm.skypilot.bridge import serve

    class Far:
        def status(self, cluster_names=None):
            return [{"name": "c1", "status": "UP", "pid": os.getpid()}]

        def tail_logs(self, cluster_name, job_id, on_log=None, follow=True):
            gate = os.environ.get("FAR_GATE")
            for i in range(5):
                on_log(f"line {i} of job {job_id}")
                # A job still running: the rest of its log waits for the test's go.
                while i == 0 and gate and not os.path.exists(gate):
                    time.sleep(0.05)
            return 100 if job_id == 7 else 0

        def jobs_logs(self, job_id, on_log=None, follow=True):
            # A job whose log grows in a file (FAR_LOG); follow streams it until FAR_LOG.done exists.
            log = os.environ["FAR_LOG"]
            with open(log + ".calls", "a") as calls:
                calls.write(('follow' if follow else 'whole') + chr(10))
            sent = 0
            while True:
                done = os.path.exists(log + ".done")
                with open(log) as fh:
                    lines = fh.read().splitlines()
                for line in lines[sent:]:
                    on_log(line)
                sent = len(lines)
                if done or not follow:
                    return 0
                time.sleep(0.05)

        def job_status(self, cluster_name, job_id):
            if job_id == 99:
                time.sleep(30)  # an API server that does not answer
            if job_id == 13:
                print("far side: giving up on job 13", file=sys.stderr, flush=True)
                os._exit(3)
            return "RUNNING"

    class Broken:
        def __init__(self):
            raise ImportError("No module named 'sky'")

    serve(Broken if os.environ.get("FAR_BROKEN") else Far)
    """
)


@pytest.fixture
def far_python(tmp_path):
    script = tmp_path / "far.py"
    script.write_text(FAR_SIDE)
    python = tmp_path / "python"
    # Called as `python -m skyvm.skypilot.bridge --serve`, like SkyPilot's environment's python.
    python.write_text(f'#!/bin/sh\n[ "$3" = "--serve" ] || exit 2\nexec {sys.executable} {script}\n')
    python.chmod(0o755)
    return str(python)


def test_concurrent_calls_share_one_process_and_logs_stream_per_call(far_python, tmp_path, monkeypatch):
    gate = tmp_path / "go"
    monkeypatch.setenv("FAR_GATE", str(gate))
    bridge = SubprocessBridge(far_python)
    try:
        lines: list[str] = []
        codes = {}
        tail = threading.Thread(target=lambda: codes.setdefault("tail", bridge.tail_logs("c1", 7, on_log=lines.append)))
        tail.start()
        deadline = time.monotonic() + 30
        while not lines and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lines == ["line 0 of job 7"]  # streamed while the call is still open
        pids = {bridge.status()[0]["pid"] for _ in range(3)}
        assert tail.is_alive()  # answered while the tail waits: no call waits on another
        gate.touch()
        tail.join(10)
        assert codes["tail"] == 100  # the failed job's code comes back as is
        assert lines == [f"line {i} of job 7" for i in range(5)]
        assert len(pids) == 1  # one process for every call: SkyPilot is imported once, not per call
    finally:
        bridge.close()


def test_a_dead_bridge_process_fails_its_calls_with_its_last_words_and_is_replaced(far_python):
    bridge = SubprocessBridge(far_python)
    try:
        first = bridge.status()[0]["pid"]
        with pytest.raises(InfrastructureError, match=r"exited with code 3:[\s\S]*giving up on job 13"):
            bridge.job_status("c1", 13)
        second = bridge.status()[0]["pid"]
        assert second != first  # the next call started a new process
    finally:
        bridge.close()


def test_a_missing_skypilot_is_every_calls_answer(far_python, monkeypatch):
    monkeypatch.setenv("FAR_BROKEN", "1")
    bridge = SubprocessBridge(far_python, env=dict(os.environ))
    try:
        with pytest.raises(InfrastructureError, match="SkyPilot status failed: ImportError: No module named 'sky'"):
            bridge.status()
    finally:
        bridge.close()


def test_a_call_past_its_bound_is_an_error_naming_the_call(far_python, monkeypatch):
    monkeypatch.setenv("SKYVM_SKYPILOT_CALL_TIMEOUT_S", "1")
    bridge = SubprocessBridge(far_python)
    try:
        assert bridge.status()[0]["name"] == "c1"
        with pytest.raises(InfrastructureError, match=r"SkyPilot job_status did not answer within 1s"):
            bridge.job_status("c1", 99)
        assert bridge.status()[0]["name"] == "c1"  # the process still serves other calls
    finally:
        bridge.close()


def test_every_bridge_call_is_bounded(monkeypatch):
    from skyvm.skypilot.bridge import call_bound

    assert call_bound("job_status", {}) == 600.0
    assert call_bound("launch", {"retry_until_up": False}) == 3600.0
    assert call_bound("launch", {"retry_until_up": True}) is None  # as long as it takes, by request
    assert call_bound("tail_logs", {"follow": False}) == 600.0
    monkeypatch.setenv("SKYVM_SKYPILOT_CALL_TIMEOUT_S", "5")
    assert call_bound("launch", {"retry_until_up": True}) == 5.0


def test_a_jobs_log_is_read_from_an_offset_and_fetched_whole_once_not_per_read(far_python, tmp_path, monkeypatch):
    """read_log: the text past the reader's offset; SkyPilot is asked for the whole log once and then
    followed, however often the log is read (not O(n^2) over a run)."""
    log = tmp_path / "job.log"
    log.write_text("one\ntwo\n")
    monkeypatch.setenv("FAR_LOG", str(log))
    bridge = SubprocessBridge(far_python)
    try:
        text, offset = bridge.read_log(None, 5, 0, managed=True)
        assert (text, offset) == ("one\ntwo\n", 8)  # what is written so far, at once
        with open(log, "a") as fh:
            fh.write("three\n")
        seen = ""
        deadline = time.monotonic() + 30
        while "three" not in seen and time.monotonic() < deadline:
            text, offset = bridge.read_log(None, 5, offset, managed=True)
            seen += text
            time.sleep(0.05)
        assert seen == "three\n" and offset == 14  # only what is new
        with open(log, "a") as fh:
            fh.write("four\n")
        (tmp_path / "job.log.done").touch()
        # The job is over: a final read holds the rest of its log.
        assert bridge.read_log(None, 5, offset, managed=True, final=True) == ["four\n", 19]
        assert (tmp_path / "job.log.calls").read_text().split() == ["whole", "follow"]
        # A reader from the start again (another handle, a result's last lines): the whole log.
        assert bridge.read_log(None, 5, 0, managed=True, final=True) == ["one\ntwo\nthree\nfour\n", 19]
    finally:
        bridge.close()


def test_streams_open_at_once_are_capped_and_past_the_cap_a_read_fetches_the_log_whole():
    """Each stream holds one of the API server's log threads: past the cap, a job's log is read as
    before streams (fetched whole), and a stream that ends frees its place."""
    from skyvm.skypilot.logs import LogFollowers

    class Jobs:
        def __init__(self):
            self.over = threading.Event()
            self.calls = []

        def tail_logs(self, cluster_name, job_id, on_log=None, follow=True):
            self.calls.append((job_id, follow))
            on_log(f"job {job_id} started")
            if follow:
                self.over.wait()  # a job still running: its stream stays open
            return 0

    jobs = Jobs()
    followers = LogFollowers(jobs, max_following=2)
    for job_id in (1, 2, 3):
        assert followers.read("c", job_id, 0) == [f"job {job_id} started\n", len(f"job {job_id} started\n")]
    assert followers.read("c", 3, 0) == ["job 3 started\n", 14]  # no stream of its own: fetched whole again
    assert sorted(c for c in jobs.calls if c[1]) == [(1, True), (2, True)]
    assert jobs.calls.count((3, False)) == 2
    jobs.over.set()  # the jobs end, their streams with them
    assert followers.read("c", 1, 14, final=True) == ["", 14]
    assert followers.read("c", 2, 14, final=True) == ["", 14]
    followers.read("c", 3, 14)  # a place is free again: job 3 gets its stream
    deadline = time.monotonic() + 30
    while (3, True) not in jobs.calls and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (3, True) in jobs.calls
