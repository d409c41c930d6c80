"""A cluster's claim lock (skyvm.home.ClusterLock): what filelock gave the pool, in its calls' cost.

Held by another process, it is not had (at once, or within a timeout); that process's death lets go
of it; two holders in one process exclude each other; any thread releases it; a child forked while
it was held does not keep it once released.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from filelock import Timeout

from skyvm.home import Home


def _holder(home: Home, name: str) -> subprocess.Popen:
    """Another process that holds the cluster's lock until its stdin closes."""
    code = (
        "import sys; from skyvm.home import Home; "
        f"lock = Home({str(home.path)!r}).cluster_lock({name!r}).acquire(timeout=0); "
        "print('held', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_lock_another_process_holds_is_not_had_until_that_process_ends(tmp_path):
    home = Home(tmp_path / "home")
    proc = _holder(home, "c1")
    try:
        with pytest.raises(Timeout):
            home.cluster_lock("c1").acquire(timeout=0)
        started = time.monotonic()
        with pytest.raises(Timeout):
            home.cluster_lock("c1").acquire(timeout=0.3)
        assert time.monotonic() - started >= 0.3  # it waited its timeout, polling
        other = home.cluster_lock("c2").acquire(timeout=0)  # another cluster's lock is its own
        other.release()
    finally:
        proc.kill()  # killed, not released: the kernel lets go of its lock
        proc.wait()
    lock = home.cluster_lock("c1").acquire(timeout=5)
    assert lock.is_locked
    lock.release()
    assert not lock.is_locked


def test_two_holders_in_one_process_exclude_each_other_and_any_thread_releases(tmp_path):
    home = Home(tmp_path / "home")
    first = home.cluster_lock("c1").acquire(timeout=0)
    with pytest.raises(Timeout):
        home.cluster_lock("c1").acquire(timeout=0)
    waiter_got = threading.Event()

    def wait_for_it():
        home.cluster_lock("c1").acquire(timeout=10).release()
        waiter_got.set()

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    assert not waiter_got.wait(0.2)  # still held
    threading.Thread(target=first.release).start()  # released by a thread that did not take it
    waiter.join(10)
    assert waiter_got.is_set()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_while_it_was_held_does_not_keep_it_once_released(tmp_path):
    home = Home(tmp_path / "home")
    lock = home.cluster_lock("c1").acquire(timeout=0)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child holds a copy of the lock's descriptor until it exits
        os.close(write)
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    try:
        lock.release()
        again = home.cluster_lock("c1").acquire(timeout=0)  # not held by the child's copy
        again.release()
    finally:
        os.close(write)
        os.waitpid(pid, 0)
