"""Progress on long steps (wheel and image builds, pushes, pulls; later cluster launches and pool starts).

Holds ``step``: a context manager around one step that can take more than a few seconds, and ``Step``,
what it yields (``update`` says how far along the step is). Where a person watches (stderr is a
terminal) it is a rich spinner, or a bar when the step knows its total; everywhere else (a Prefect
or Airflow task's log, CI) it is log lines: one at the start, one at least every ``heartbeat_s``
while the step runs, and one at the end with the time it took. A build that runs for minutes then
never reads like a hang. Steps may nest or run in several threads: in a terminal they share one
rich display (rich allows only one live display at a time).

May import: rich and the standard library only (no skyvm module), so any module can use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from contextvars import ContextVar
from typing import Callable, Iterator, Optional, Union

log = logging.getLogger("skyvm.progress")

HEARTBEAT_S = 10.0


def interactive() -> bool:
    """A rich display when stderr is a terminal; SKYVM_PROGRESS=plain (or rich) decides otherwise."""
    chosen = os.environ.get("SKYVM_PROGRESS", "").lower()
    if chosen in ("plain", "rich"):
        return chosen == "rich"
    return sys.stderr.isatty()


def _duration(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


class Step:
    """One running step. ``update`` records what it is doing now and how far along it is."""

    def __init__(self, what: str, total: Optional[float], unit: str):
        self.what = what
        self.total = total
        self.unit = unit
        self.completed: float = 0
        self.detail = ""
        self.started = time.monotonic()
        self._task = None  # the rich task id, in a terminal

    def update(self, detail: Optional[str] = None, *, completed: Optional[float] = None, total: Optional[float] = None) -> None:
        if detail is not None:
            self.detail = detail
        if total is not None:
            self.total = total
        if completed is not None:
            self.completed = completed
        if self._task is not None:
            _Display.update(self)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def where(self) -> str:
        """How far along, in words: ``3/7 (step 3/7 : RUN ...)``."""
        parts = []
        if self.total:
            parts.append(f"{_amount(self.completed, self.unit)}/{_amount(self.total, self.unit)}")
        if self.detail:
            parts.append(self.detail)
        return ", ".join(parts)


def _amount(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / 2**20:.1f} MiB"
    return f"{value:g}"


class _Display:
    """The one rich display every step in a terminal shares; it stops when its last step ends."""

    _lock = threading.Lock()
    _progress = None
    _steps = 0

    @classmethod
    def add(cls, step: Step) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with cls._lock:
            if cls._progress is None:
                cls._progress = Progress(
                    SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[where]}"), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=False,
                )
                cls._progress.start()
            cls._steps += 1
            step._task = cls._progress.add_task(step.what, total=step.total, where=step.where())

    @classmethod
    def update(cls, step: Step) -> None:
        with cls._lock:
            if cls._progress is not None:
                cls._progress.update(step._task, total=step.total, completed=step.completed, where=step.where())

    @classmethod
    def finish(cls, step: Step, outcome: str) -> None:
        with cls._lock:
            if cls._progress is None:
                return
            # A finished step's line stays: its outcome and time, the bar full when it went well.
            done = step.total if outcome == "done" and step.total else step.completed
            cls._progress.update(step._task, total=step.total or 1, completed=done if step.total else (1 if outcome == "done" else 0),
                                 where=f"{outcome} in {_duration(step.elapsed)}")
            cls._steps -= 1
            if cls._steps == 0:
                cls._progress.stop()
                cls._progress = None


# Where an engine wants a step's lines too (the log of the task run whose node is being prepared). A
# ContextVar: the node's launch runs in a copy of the submitting context (skyvm.handle).
_sink: ContextVar[Optional[Callable[[str], None]]] = ContextVar("skyvm_progress_sink", default=None)


@contextlib.contextmanager
def reporting_to(sink: Callable[[str], None]) -> Iterator[None]:
    """Every step started in this context (and in launches submitted from it) also says its lines to ``sink``."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)


@contextlib.contextmanager
def step(
    what: str,
    *,
    logger: Union[logging.Logger, str, None] = None,
    total: Optional[float] = None,
    unit: str = "",
    heartbeat_s: Optional[float] = None,
    rich: Optional[bool] = None,
) -> Iterator[Step]:
    """Show ``what`` while the block runs. ``logger`` (a logger or its name; default ``skyvm.progress``)
    gets the lines when there is no terminal; ``total`` (in ``unit``: "" or "bytes") gives a bar;
    ``rich`` forces the display (True) or the log lines (False); ``heartbeat_s`` defaults to HEARTBEAT_S."""
    heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
    out = logging.getLogger(logger) if isinstance(logger, str) else (logger or log)
    current = Step(what, total, unit)
    sink = _sink.get()

    def say(fmt: str, *args) -> None:
        out.info(fmt, *args)
        if sink is not None:
            try:
                sink(fmt % args)
            except Exception:  # noqa: BLE001 - an engine's log never stops the step
                pass

    # An engine that wants the lines (a task run's log) gets them, whatever the terminal would show.
    if sink is None and (interactive() if rich is None else rich):
        _Display.add(current)
        outcome = "failed"
        try:
            yield current
            outcome = "done"
        finally:
            _Display.finish(current, outcome)
        return
    say("%s: started", what)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(heartbeat_s):
            where = current.where()
            say("%s: still running after %s%s", what, _duration(current.elapsed), f" ({where})" if where else "")

    beat = threading.Thread(target=heartbeat, name=f"skyvm-progress-{what}", daemon=True)
    beat.start()
    try:
        yield current
    except BaseException:
        say("%s: failed after %s", what, _duration(current.elapsed))
        raise
    finally:
        stop.set()
        beat.join()
    say("%s: done in %s", what, _duration(current.elapsed))
