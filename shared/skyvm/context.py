"""The process's skyvm machinery, as one explicit object: knobs, thread pools, the watcher, the image cache, the default run.

    from skyvm import context
    ctx = context.current()          # this process's (a new one after a fork)
    ctx.launcher().submit(...)       # launching: payload upload, image build, waiting for a cluster, provisioning
    ctx.watcher()                    # the one thread that follows every node in flight
    context.reset(launch_threads=2)  # a fresh one with other knobs (tests; a long-lived process that wants new pools)

A context may be made for a part of a program (``Run(ctx=Context(...))``): the handles of that run
use its threads and its watcher, and while skyvm works for them (launching, following) the
context is the active one, so that ``current()`` (a backend registering a stream) finds it.

Nothing is made at import: pools, the watcher and the default run are made when first asked for,
and ``reset()`` replaces them all. The knobs come from the environment when a context is made
(``SKYVM_LAUNCH_THREADS``, ``SKYVM_POLL_THREADS``, ``SKYVM_CANCEL_WAIT_S``, ``SKYVM_CLOSE_WAIT_S``,
``SKYVM_LOG_TAIL_LINES``), and keyword arguments of ``reset()``/``Context()`` above them.

May import: skyvm.watcher, skyvm.settings (types only), and, when an image is first asked for,
skyvm.connectors and skyvm.images. Never skyvm.api, skyvm.run or skyvm.handle (they import this).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Optional, TypeVar

from skyvm.watcher import Watcher

if TYPE_CHECKING:
    from skyvm.settings import NodeSettings

T = TypeVar("T")


@dataclass(frozen=True)
class Knobs:
    """How much skyvm may hold and how long it waits, per process."""

    # Launching (payload upload, image build, waiting for a cluster slot, provisioning) runs on a bounded
    # pool of threads; waiting on a running node takes none (the watcher).
    launch_threads: int = 32
    # Status polls and log reads (a SkyPilot bridge call may take minutes) run on these, never on the
    # watcher's thread; one poll per attempt at a time.
    poll_threads: int = 8
    # Where a finished node's result is read and its cluster released: never behind launches, which may
    # all be waiting for the very clusters these releases free.
    finish_threads: int = 4
    # How long cancel() waits for a node to stop before it says so (Run.close waits this long once, for all).
    cancel_wait_s: float = 60.0
    # Run.close(cancel=False) waits at most this long for a node that has no ``timeout`` of its own.
    close_wait_s: float = 3600.0
    # What a handle keeps of its log in memory (its error messages and logs() use it): the last lines, up
    # to this many and this many characters in all. Every line goes to on_log as it comes.
    log_tail_lines: int = 1000
    log_tail_chars: int = 1 << 20
    # Cost rows of finished nodes a run keeps for its summary (the total counts them all).
    cost_rows: int = 1000
    # Consecutive failed status calls before a polled node counts as gone.
    poll_failures: int = 5

    @classmethod
    def from_env(cls, **override) -> "Knobs":
        env = {
            "launch_threads": ("SKYVM_LAUNCH_THREADS", int),
            "poll_threads": ("SKYVM_POLL_THREADS", int),
            "cancel_wait_s": ("SKYVM_CANCEL_WAIT_S", float),
            "close_wait_s": ("SKYVM_CLOSE_WAIT_S", float),
            "log_tail_lines": ("SKYVM_LOG_TAIL_LINES", int),
        }
        values = {}
        for field, (var, kind) in env.items():
            raw = os.environ.get(var)
            if raw:
                try:
                    values[field] = kind(raw)
                except ValueError:
                    raise ValueError(f"${var}={raw!r}: expected a {kind.__name__}") from None
        return dataclasses.replace(cls(**values), **override)


class Context:
    """One process's skyvm machinery. Everything in it is made when first asked for."""

    def __init__(self, knobs: Optional[Knobs] = None, **override):
        self.knobs = dataclasses.replace(knobs, **override) if knobs is not None else Knobs.from_env(**override)
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._launcher: Optional[ThreadPoolExecutor] = None
        self._finisher: Optional[ThreadPoolExecutor] = None
        self._watcher: Optional[Watcher] = None
        self._images: dict[tuple, str] = {}
        self._image_lock = threading.Lock()
        self._default_run = None

    def launcher(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._launcher is None:
                self._launcher = ThreadPoolExecutor(max_workers=self.knobs.launch_threads, thread_name_prefix="skyvm-launch")
            return self._launcher

    def finisher(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._finisher is None:
                self._finisher = ThreadPoolExecutor(max_workers=self.knobs.finish_threads, thread_name_prefix="skyvm-finish")
            return self._finisher

    def watcher(self) -> Watcher:
        """The watcher (a new one after the last one gave up: its nodes were told so)."""
        with self._lock:
            if self._watcher is None or not self._watcher.alive:
                self._watcher = Watcher(poll_threads=self.knobs.poll_threads, successor=self.watcher)
            return self._watcher

    def node_image(self, settings: "NodeSettings") -> str:
        """The image a node runs in: ``image`` as given, else skyvm's node image built for its requirements
        (once per requirements and registry in this context)."""
        if settings.image:
            return settings.image
        if not builds_image(settings):
            return os.environ["SKYVM_NODE_IMAGE"]
        key = (tuple(settings.requirements), settings.registry)
        with self._image_lock:
            if key not in self._images:
                from skyvm import connectors
                from skyvm.images import build_node_image

                login = connectors.registry_login(settings, settings.registry)
                self._images[key] = build_node_image(requirements=settings.requirements, registry=settings.registry, login=login).ref
            return self._images[key]

    def default_run(self, make: Callable[[], T]) -> T:
        """The process's default run (``skyvm.submit``'s), made by ``make()`` when there is none or it
        was closed; closed at exit."""
        import atexit

        with self._lock:
            run = self._default_run
            if run is None or run.closed:
                run = self._default_run = make()
                atexit.register(run.close)
            return run

    @contextlib.contextmanager
    def active(self) -> Iterator["Context"]:
        """Within this block (this thread), ``current()`` is this context."""
        token = _active.set(self)
        try:
            yield self
        finally:
            _active.reset(token)

    def close(self) -> None:
        """Let go of the pools (work already given to them still runs); a later call makes new ones."""
        with self._lock:
            pools, self._launcher, self._finisher = (self._launcher, self._finisher), None, None
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=False)


def builds_image(settings: "NodeSettings") -> bool:
    """Whether a node of these settings runs in skyvm's node image built on this host (not ``image``)."""
    if settings.image:
        return False
    # A node started from a node (a flow on a node whose tasks use SkyVMTaskRunner) has no source
    # checkout to build skyvm's image from: its nodes run in the image it runs in.
    return not (os.environ.get("SKYVM_NODE_IMAGE") and not settings.requirements and not settings.registry)


_current: Optional[Context] = None
_current_lock = threading.Lock()
_active: contextvars.ContextVar[Optional[Context]] = contextvars.ContextVar("skyvm_context", default=None)


def current() -> Context:
    """The active context (``Context.active()``), else this process's (a new one in a forked child:
    threads do not survive a fork)."""
    global _current
    active = _active.get()
    if active is not None:
        return active
    with _current_lock:
        if _current is None or _current.pid != os.getpid():
            _current = Context()
        return _current


def reset(**knobs) -> Context:
    """A new context for this process (knobs from the environment, ``knobs`` above them); the old one's
    pools are let go. Nodes already launched finish in the old one."""
    global _current
    with _current_lock:
        old, _current = _current, Context(**knobs)
    if old is not None and old.pid == os.getpid():
        old.close()
    return _current


def watcher() -> Watcher:
    """The current context's watcher (backends register their streams here)."""
    return current().watcher()
