"""The bridge's RPC client: the bridge's calls answered in SkyPilot's own environment.

``SubprocessBridge`` runs ``python -m skyvm.skypilot.bridge --serve`` (``rpc_server.serve``) in
SkyPilot's environment (SkyPilot cannot share one with Airflow >= 3.1.3 or some Prefect releases)
and speaks JSON lines with it: one request per line (``id``, ``call``, ``kwargs``), answers and log
lines tagged with the request's id.

May import: the standard library, ``skyvm.errors`` and ``skyvm.skypilot.interface``.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import json
import logging
import subprocess
import threading
from typing import Any, Optional

from skyvm.errors import InfrastructureError
from skyvm.skypilot.interface import BOUND_ENV, CALLS, LogSink, SkyBridge, call_bound

log = logging.getLogger("skyvm.skypilot")


class _Pending:
    def __init__(self, on_log: Optional[LogSink]):
        self.on_log = on_log
        self.answer: Optional[dict] = None
        self.done = threading.Event()


class SubprocessBridge:
    """The same calls, answered in SkyPilot's own environment by one long-lived
    ``python -m skyvm.skypilot.bridge --serve`` process.

    Importing SkyPilot costs seconds of CPU; one process per bridge pays it once, not once a
    call. Calls run concurrently (a ``tail_logs`` may stream for hours while others come and
    go): each request carries an id, and the answer and log lines come back tagged with it.
    If the process dies, the calls in flight fail with its last words and the next call starts
    a new one.
    """

    def __init__(self, python: str, env: Optional[dict] = None):
        self.python = python
        self.env = env
        self._lock = threading.Lock()
        self._proc: Optional[subprocess.Popen] = None
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._stderr_tail: collections.deque = collections.deque(maxlen=20)

    def _ensure(self) -> subprocess.Popen:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = subprocess.Popen(
                    [self.python, "-m", "skyvm.skypilot.bridge", "--serve"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    bufsize=1,
                    env=self.env,
                )
                threading.Thread(target=self._read_answers, args=(self._proc,), daemon=True, name="skyvm-bridge-answers").start()
                threading.Thread(target=self._read_stderr, args=(self._proc,), daemon=True, name="skyvm-bridge-stderr").start()
            return self._proc

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            line = line.rstrip("\n")
            self._stderr_tail.append(line)
            log.debug("skypilot bridge: %s", line)

    def _read_answers(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                pending = self._pending.get(msg.get("id"))
            if pending is None:
                continue
            if "log" in msg:
                if pending.on_log:
                    pending.on_log(msg["log"])
                continue
            pending.answer = msg
            pending.done.set()
        # The process is gone: whatever it still owed fails, with its last words.
        code = proc.wait()
        with self._lock:
            orphans = [p for p in self._pending.values() if not p.done.is_set()]
        last = "\n".join(self._stderr_tail)
        for pending in orphans:
            pending.answer = {"error": f"the SkyPilot bridge process ({self.python}) exited with code {code}:\n{last}"}
            pending.done.set()

    def _call(self, name: str, /, on_log: Optional[LogSink] = None, **kwargs) -> Any:  # positional-only: jobs_launch has a name= of its own
        proc = self._ensure()
        call_id = next(self._ids)
        pending = _Pending(on_log)
        with self._lock:
            self._pending[call_id] = pending
        try:
            try:
                with self._lock:
                    proc.stdin.write(json.dumps({"id": call_id, "call": name, "kwargs": kwargs}) + "\n")
                    proc.stdin.flush()
            except (BrokenPipeError, OSError) as exc:
                raise InfrastructureError(f"the SkyPilot bridge process ({self.python}) is gone: {exc}\n" + "\n".join(self._stderr_tail)) from None
            bound = call_bound(name, kwargs)
            if not pending.done.wait(bound):
                raise InfrastructureError(
                    f"SkyPilot {name} did not answer within {bound:g}s (the bridge process {self.python}); "
                    f"set {BOUND_ENV} to wait longer. Its last words:\n" + "\n".join(self._stderr_tail)
                )
        finally:
            with self._lock:
                self._pending.pop(call_id, None)
        answer = pending.answer or {}
        if "error" in answer:
            raise InfrastructureError(f"SkyPilot {name} failed: {answer['error']}")
        return answer.get("result")

    def close(self) -> None:
        """End the bridge process (it also ends by itself when this process goes)."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __getattr__(self, name):
        if name not in CALLS:
            raise AttributeError(name)

        # Positional arguments get their names from the interface itself (SkyBridge).
        names = [p for p in inspect.signature(getattr(SkyBridge, name)).parameters if p not in ("self", "on_log")]

        def call(*args, on_log=None, **kwargs):
            kwargs.update(zip(names, args))
            return self._call(name, on_log=on_log, **kwargs)

        return call
