"""``Run``: a group of nodes (one flow run, one DAG run) sharing clusters by signature; ``close()`` ends it.

A run may live as long as the process (an Airflow scheduler's executor): it
holds only its unfinished nodes and a bounded cost summary of the finished
ones. Every wait is bounded (the context's ``cancel_wait_s`` and
``close_wait_s``, the nodes' own ``timeout``).

May import: skyvm.handle, skyvm.prepare, skyvm.context, skyvm.pool, skyvm.node (payloads),
skyvm.settings, skyvm.errors, skyvm.home (the run's lease), skyvm.costs (its summary). Never skyvm.api.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import wait as wait_futures
from typing import Any, Callable, Mapping, Optional, Union

from skyvm import node as node_runtime
from skyvm import run_ids
from skyvm.context import Context, current
from skyvm.costs import Summary, node_row
from skyvm.errors import NodeTimeout, SkyVMError
from skyvm.handle import NodeHandle
from skyvm.home import Home
from skyvm.pool import pool_of
from skyvm.prepare import backend_for, check_launchable
from skyvm.settings import NodeSettings, SkyVMConfig, as_config

log = logging.getLogger("skyvm")


class Run:
    """A group of nodes sharing clusters by signature; ``close()`` ends it."""

    def __init__(
        self,
        settings: Union[None, str, os.PathLike, Mapping[str, Any], SkyVMConfig] = None,
        run_id: Optional[str] = None,
        *,
        ctx: Optional[Context] = None,
        log_summary: bool = True,
    ):
        self.config = as_config(settings)
        # close() logs the run's summary; an engine that shows it itself (an Airflow task's log) says no.
        self.log_summary = log_summary
        self.run_id = run_id or run_ids.run_id(run_ids.RUN)
        self.ctx = ctx or current()  # its threads, watcher and knobs
        # Only unfinished nodes are held: a finished one leaves its cost row and is dropped.
        self._live: dict[str, NodeHandle] = {}
        self._costs: deque[dict] = deque(maxlen=self.ctx.knobs.cost_rows)
        self._cost_total = 0.0
        self._cost_nodes = 0
        self._lock = threading.Lock()
        self._backends: set = set()
        self._closed = False
        self._lease = Home.current().hold_run(self.run_id)  # gc spares the run's clusters while it is held

    def resolve(self, node: str, *, profile: Optional[str] = None, options: Optional[Mapping[str, Any]] = None, override: Optional[Mapping[str, Any]] = None) -> NodeSettings:
        return self.config.resolve(node, profile=profile, code=options, override=override)

    def submit(
        self,
        fn: Callable,
        *args: Any,
        node: Optional[str] = None,
        profile: Optional[str] = None,
        options: Optional[Mapping[str, Any]] = None,
        override: Optional[Mapping[str, Any]] = None,
        on_log: Optional[Callable[[str], None]] = None,
        **kwargs: Any,
    ) -> NodeHandle:
        """Run ``fn(*args, **kwargs)`` as a node. Settings are resolved (and checked) before anything starts."""
        node = node or getattr(fn, "__name__", "node")
        settings = self.resolve(node, profile=profile, options=options, override=override)
        return self.start_call(node, settings, fn, args, kwargs, on_log=on_log)

    def submit_command(
        self,
        command: str,
        *,
        node: str,
        profile: Optional[str] = None,
        options: Optional[Mapping[str, Any]] = None,
        override: Optional[Mapping[str, Any]] = None,
        on_log: Optional[Callable[[str], None]] = None,
    ) -> NodeHandle:
        """Run a shell command as a node; its result is the last line it printed."""
        settings = self.resolve(node, profile=profile, options=options, override=override)
        return self.start_command(node, settings, command, on_log=on_log)

    # Adapters resolve settings themselves (to fail at submit time), then start with these.
    def start_call(self, node: str, settings: NodeSettings, fn: Callable, args=(), kwargs=None, *, on_log=None) -> NodeHandle:
        return self._start(node, settings, node_runtime.make_call_payload(fn, args, kwargs, node=node), on_log)

    def start_command(self, node: str, settings: NodeSettings, command: str, *, on_log=None) -> NodeHandle:
        return self._start(node, settings, node_runtime.make_command_payload(command), on_log)

    def start_raw(self, node: str, settings: NodeSettings, payload: bytes, *, on_log=None) -> NodeHandle:
        """Start a node from a payload made with skyvm.node.make_call_payload / make_command_payload."""
        return self._start(node, settings, payload, on_log)

    def _start(self, node: str, settings: NodeSettings, payload: bytes, on_log) -> NodeHandle:
        if self._closed:
            raise SkyVMError(f"run {self.run_id} is closed")
        check_launchable(node, settings)
        self._backends.add(backend_for(settings))
        handle = NodeHandle.launch(self, node, settings, payload, on_log)
        with self._lock:
            self._live[handle.attempt_id] = handle
        handle.add_done_callback(self._finished)  # at once when it has already finished
        return handle

    @property
    def handles(self) -> list[NodeHandle]:
        """The run's nodes that have not finished yet. A finished node is dropped (its cost stays in
        ``cost_summary()``): a run may last as long as its process, an Airflow scheduler's."""
        with self._lock:
            return list(self._live.values())

    def forget(self, handle: NodeHandle) -> None:
        """The handle let go of its attempt (``NodeHandle.let_go``): the run no longer holds, waits on or stops it."""
        with self._lock:
            self._live.pop(handle.attempt_id, None)

    @property
    def closed(self) -> bool:
        return self._closed

    def _finished(self, handle: NodeHandle) -> None:
        row = node_row(handle)  # None: never launched, it ran nowhere
        with self._lock:
            self._live.pop(handle.attempt_id, None)
            if row is not None:
                self._costs.append(row)
                self._cost_total += row["cost"] or 0.0
                self._cost_nodes += 1

    def cost_summary(self) -> list[dict]:
        """Per launched node (skyvm.costs.node_row): placement, limits, duration, $/h and cost (None
        when no price is known); the last ``cost_rows`` (a knob) finished nodes, then those still running."""
        return self.summary().rows

    def summary(self) -> Summary:
        """``cost_summary()``'s rows and the run's total (over every finished node, listed or not)."""
        with self._lock:
            rows, total, finished = list(self._costs), self._cost_total, self._cost_nodes
            live = list(self._live.values())
        running = [row for row in map(node_row, live) if row is not None]
        return Summary.of(rows + running, total_cost=total + sum(r["cost"] or 0.0 for r in running), nodes=finished + len(running))

    def close(self, cancel: bool = True, timeout: Optional[float] = None) -> None:
        """End the run: cancel what still runs (or wait for it), then release its clusters.

        Every wait is bounded. ``cancel=True``: every unfinished node is asked to stop at once, and
        they are waited for together, at most ``timeout`` seconds (default: the knob ``cancel_wait_s``); nodes
        that did not stop are named in an error log, and their clusters go with the run's anyway.
        ``cancel=False``: the nodes are waited for, at most ``timeout`` seconds; without one, as long
        as the longest of their own ``timeout`` settings (plus ``cancel_wait_s`` to stop), or
        ``close_wait_s`` for a node without one. Nodes still running then are cancelled as above, the
        run's clusters are released, and ``NodeTimeout`` names them.
        """
        if self._closed:
            return
        self._closed = True
        late: list[NodeHandle] = []
        knobs = self.ctx.knobs
        if cancel:
            self._cancel_all(self.handles, knobs.cancel_wait_s if timeout is None else timeout)
        else:
            pending = self.handles
            bound = self._close_bound(pending) if timeout is None else timeout
            late = self._wait_all(pending, bound, "still running {bound:g}s into close(cancel=False), cancelling them")
            if late:
                self._cancel_all(late, knobs.cancel_wait_s)
        self._log_costs()
        for backend in self._backends:
            pool_of(backend).end_run(self.run_id)
        self._lease.release()
        if late:
            raise NodeTimeout(
                f"run {self.run_id}: node(s) {', '.join(repr(h.node) for h in late)} did not finish within {bound:g}s of close(cancel=False) and were cancelled"
            )

    def _close_bound(self, handles: list[NodeHandle]) -> float:
        """How long close(cancel=False) waits: the longest of the nodes' own timeouts still to run."""
        bound, knobs = 0.0, self.ctx.knobs
        now = time.time()
        for h in handles:
            if h.settings.timeout is None:
                bound = max(bound, knobs.close_wait_s)
            else:
                ran = now - h.started_at if h.started_at is not None else 0.0
                bound = max(bound, h.settings.timeout - ran + knobs.cancel_wait_s)
        return bound

    def _cancel_all(self, handles: list[NodeHandle], bound: float) -> None:
        """Ask every node to stop at once, then wait once for all of them, at most ``bound`` seconds."""
        handles = [h for h in handles if not h.done()]
        for handle in handles:
            handle.request_cancel()
        self._wait_all(handles, bound, "did not stop within {bound:g}s of being cancelled; their clusters are removed with the run")

    def _wait_all(self, handles: list[NodeHandle], bound: float, unfinished: str) -> list[NodeHandle]:
        """One wait for all the nodes, at most ``bound`` seconds: those still unfinished, named in an error log."""
        wait_futures([h._future for h in handles], timeout=bound)
        late = [h for h in handles if not h.done()]
        if late:
            names = ", ".join(f"{h.node} (cluster {h.cluster})" for h in late)
            log.error("run %s: %d node(s) %s: %s", self.run_id, len(late), unfinished.format(bound=bound), names)
        return late

    def _log_costs(self) -> None:
        # Rendering the table is tens of milliseconds of a run's end: not for a line nobody logs.
        summary = self.summary() if self.log_summary and log.isEnabledFor(logging.INFO) else None
        if summary is not None and summary.rows:
            log.info("skyvm summary of run %s:\n%s", self.run_id, summary.table(width=None))

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close(cancel=True)

