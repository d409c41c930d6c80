"""Secret values skyvm has seen, and the scrubbing of them from anything printed.

Every value a secret reference resolves to (a key, a token, a password, a
SAS) is registered here the moment it is read. ``redact(text)`` replaces
each with ``***``; a logging filter on skyvm's loggers and on the root
handlers applies it to every record, so an SDK's exception text or a node's
log line that echoes a credential never reaches a log.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Iterable

MASK = "***"
# Shorter values would mask ordinary words ("true", port numbers): a secret
# this short is not one worth hiding, and redacting it would garble logs.
MIN_LENGTH = 6

_lock = threading.Lock()
_secrets: set[str] = set()
_ordered: list[str] = []


def register(*values: Any) -> None:
    """Remember secret values so that ``redact`` hides them from now on."""
    with _lock:
        changed = False
        for value in values:
            if not isinstance(value, str) or len(value) < MIN_LENGTH or value in _secrets:
                continue
            _secrets.add(value)
            changed = True
        if changed:
            # Longest first: a secret that contains another is masked whole.
            _ordered[:] = sorted(_secrets, key=len, reverse=True)
    _install_filter()


def register_all(values: Iterable[Any]) -> None:
    register(*list(values))


def known() -> frozenset[str]:
    with _lock:
        return frozenset(_secrets)


def redact(text: Any) -> Any:
    """``text`` with every registered secret replaced by ``***`` (non-strings pass through)."""
    if not isinstance(text, str) or not _ordered:
        return text
    for secret in list(_ordered):
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Scrubs a record's message and arguments before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _ordered:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is the caller's problem, not ours
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None and not getattr(record, "_skyvm_redacted", False):
            text = logging.Formatter().formatException(record.exc_info)
            if redact(text) != text:
                record.exc_text = redact(text)
                record.exc_info = None
        record._skyvm_redacted = True
        return True


_filter = RedactingFilter()
_installed: set[int] = set()


def _install_filter() -> None:
    """Attach the filter to skyvm's logger and every handler of the root logger (once each)."""
    targets = [logging.getLogger("skyvm"), *logging.getLogger().handlers]
    for target in targets:
        if id(target) not in _installed:
            target.addFilter(_filter)
            _installed.add(id(target))


def scrub_exception(exc: BaseException) -> BaseException:
    """Redact an exception's arguments in place (SDK errors sometimes quote what they were given)."""
    try:
        exc.args = tuple(redact(a) for a in exc.args)
    except Exception:  # noqa: BLE001
        pass
    return exc
