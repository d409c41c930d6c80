"""Per-task skyvm settings for the submissions inside a ``with`` block (as prefect-ray's ``remote_options``).

Holds ``skyvm_options``, ``current_options``, ``profile_from_tags`` and ``describe`` (a node's settings in a
log line). May import: the standard library and skyvm.errors (and skyvm.settings' types).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

_options: ContextVar[dict[str, Any]] = ContextVar("skyvm_options", default={})

TAG_PREFIX = "skyvm:"


@contextmanager
def skyvm_options(**settings: Any) -> Iterator[dict[str, Any]]:
    """Settings for every ``.submit()`` / ``.map()`` inside the block; nested blocks merge, inner wins.

        with skyvm_options(cpus=4, accelerators="T4"):
            train.submit(data)
        with skyvm_options(profile="gpu"):
            evaluate.map(models)

    They sit above the runner's own arguments and the settings file (a per-call override).
    """
    current = _options.get()
    merged = {**current, **settings}
    for key in ("envs", "secrets", "labels"):
        if isinstance(current.get(key), dict) and isinstance(settings.get(key), dict):
            merged[key] = {**current[key], **settings[key]}
    token = _options.set(merged)
    try:
        yield merged
    finally:
        _options.reset(token)


def current_options() -> dict[str, Any]:
    return dict(_options.get())


def profile_from_tags(tags) -> str | None:
    """``skyvm:profile=NAME`` among a task's tags picks a profile of the settings file."""
    found = [t[len(TAG_PREFIX) + len("profile="):] for t in tags or () if t.startswith(TAG_PREFIX + "profile=")]
    if len(found) > 1:
        from skyvm.errors import SettingsError

        raise SettingsError([("tags", f"more than one skyvm:profile= tag: {sorted(found)}; give one")])
    return found[0] if found else None


def describe(settings) -> str:
    """The resources a node asks for, for the log line that says where it runs."""
    parts = [f"{k}={getattr(settings, k)}" for k in ("cpus", "memory", "accelerators", "use_spot", "cloud", "infra") if getattr(settings, k) not in (None, False)]
    return ", ".join(parts) or "default resources"
