"""Secret values skyvm has seen, and the scrubbing of them from anything printed.

Every value a secret reference resolves to (a key, a token, a password, a
SAS) is registered here the moment it is read. ``redact(text)`` replaces
each with ``***``.

Logging is scrubbed where no handler can miss it: at record creation. The
first ``register`` wraps the process's LogRecord factory (chaining whatever
factory was there), so every record of every logger -- ``skyvm`` and its
children, Prefect's run loggers, Airflow's stdlib loggers, a library's --
carries no secret in its message, arguments, exception or stack by the time
any handler sees it, whenever that handler was added. A filter put on each
logger as it first logs (and on every ``skyvm.*`` logger at once) masks the
``extra`` fields, which logging sets after the factory ran, and scrubs the
whole record when someone has since replaced the factory without chaining
ours (the next ``register`` puts ours back in front). Listeners
(``add_listener``) hear of each new secret, so that an engine's own masker
(Airflow's, for its structlog logs) hides it too.

With no secret registered nothing is installed: logging costs what it did.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from typing import Any, Callable, Iterable

MASK = "***"
# Shorter values would mask ordinary words ("true", port numbers): a secret
# this short is not one worth hiding, and redacting it would garble logs.
MIN_LENGTH = 6

_lock = threading.Lock()
_secrets: set[str] = set()
# One alternation of every secret, longest first (a secret that contains
# another is masked whole): one pass over a text whatever their number.
# None while nothing is registered, so that logging costs nothing then. Compiled at its first use after
# a change (``_current``): compiling is about a millisecond, which a short node that logs nothing (a
# trivial task, its secrets registered at its start) need not pay.
_pattern: re.Pattern[str] | None = None
_stale = False
_listeners: list[Callable[[str], None]] = []


def register(*values: Any) -> None:
    """Remember secret values so that ``redact`` (and every log record) hides them from now on."""
    global _stale
    with _lock:
        new = [v for v in dict.fromkeys(values) if isinstance(v, str) and len(v) >= MIN_LENGTH and v not in _secrets]
        if new:
            _secrets.update(new)
            _stale = True
        listeners = list(_listeners)
    if new:
        _install()
        for value in new:
            _tell(listeners, value)


def register_all(values: Iterable[Any]) -> None:
    register(*list(values))


def forget(*values: Any) -> None:
    """Stop hiding values that served one use only (an Airflow task's workload, once the task is over),
    so that a long-lived process (a scheduler's executor) does not keep, and match, one per task.
    Listeners are not told: an engine's own masker keeps what it was given."""
    global _stale
    with _lock:
        gone = [v for v in values if v in _secrets]
        if not gone:
            return
        _secrets.difference_update(gone)
        _stale = True


def _current() -> re.Pattern[str] | None:
    """The alternation of the secrets registered now; None when there is none."""
    global _pattern, _stale
    if _stale:
        with _lock:
            if _stale:
                _pattern = _compiled()
                _stale = False
    return _pattern


def _compiled() -> re.Pattern[str] | None:
    """One alternation of every secret (under _lock), longest first; None when there is none."""
    return re.compile("|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True))) if _secrets else None


def known() -> frozenset[str]:
    with _lock:
        return frozenset(_secrets)


def redact(text: Any) -> Any:
    """``text`` with every registered secret replaced by ``***`` (non-strings pass through)."""
    pattern = _current()
    if pattern is None or not isinstance(text, str):
        return text
    return pattern.sub(MASK, text)


def add_listener(listener: Callable[[str], None]) -> None:
    """Call ``listener(secret)`` for every secret registered, those known already included (once per listener)."""
    with _lock:
        if listener in _listeners:
            return
        _listeners.append(listener)
        known_now = sorted(_secrets)
    for value in known_now:
        _tell([listener], value)


def _tell(listeners: list[Callable[[str], None]], value: str) -> None:
    for listener in listeners:
        try:
            listener(value)
        except Exception:  # noqa: BLE001 - an engine's masker failing must not stop skyvm; our own scrubbing still holds
            pass


def scrub_exception(exc: BaseException) -> BaseException:
    """Redact an exception's arguments in place (SDK errors sometimes quote what they were given)."""
    try:
        exc.args = tuple(redact(a) for a in exc.args)
    except Exception:  # noqa: BLE001
        pass
    return exc


# -- log records ---------------------------------------------------------------

# LogRecord attributes that are not ``extra`` fields (the rest of a record's __dict__ is).
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


def scrub_record(record: logging.LogRecord) -> None:
    """Hide every registered secret in what a handler could print of ``record``, in place."""
    pattern = _current()
    if pattern is None:
        return
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a broken record: logging reports it with its parts, so scrub those
        record.msg = _deep(record.msg, pattern)
        record.args = _deep(record.args, pattern)
    else:
        if pattern.search(message):
            record.msg, record.args = pattern.sub(MASK, message), None
    if record.exc_info and record.exc_info[1] is not None:
        _scrub_exc_info(record, pattern)
    elif isinstance(record.exc_text, str):
        record.exc_text = pattern.sub(MASK, record.exc_text)
    if isinstance(record.stack_info, str):
        record.stack_info = pattern.sub(MASK, record.stack_info)


def _scrub_extra(record: logging.LogRecord, pattern: re.Pattern[str]) -> None:
    for key, value in list(record.__dict__.items()):
        if key not in _STANDARD:
            cleaned = _deep(value, pattern)
            if cleaned is not value:
                record.__dict__[key] = cleaned


def _deep(value: Any, pattern: re.Pattern[str], depth: int = 0) -> Any:
    """``value`` with secrets masked in its strings, containers walked a few levels; the same object when clean."""
    if isinstance(value, str):
        return pattern.sub(MASK, value) if pattern.search(value) else value
    if depth > 4:
        return value
    if isinstance(value, dict):
        items = {k: _deep(v, pattern, depth + 1) for k, v in value.items()}
        return items if any(items[k] is not v for k, v in value.items()) else value
    if isinstance(value, (list, tuple)):
        items = [_deep(v, pattern, depth + 1) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(items) if type(value) in (list, tuple) else items
    return value


def _scrub_exc_info(record: logging.LogRecord, pattern: re.Pattern[str]) -> None:
    exc = record.exc_info[1]
    try:
        text = "".join(traceback.format_exception(exc)).rstrip("\n")
    except Exception:  # noqa: BLE001 - an exception that cannot even be printed: print nothing of it
        text = f"{type(exc).__name__}: (its text could not be read)"
    if not pattern.search(text):
        return
    # Keep a traceback handlers can render (structlog's formatter, as Airflow uses, reads exc_info
    # and never exc_text): the same exception types, frames and chain, with the texts masked.
    stand_in = None if isinstance(exc, BaseExceptionGroup) else _stand_in(exc, pattern, set())
    if stand_in is not None and not pattern.search("".join(traceback.format_exception(stand_in))):
        record.exc_info = (type(stand_in), stand_in, stand_in.__traceback__)
    else:  # a secret in a source line, or a group: only the masked text is left to print
        record.exc_info = None
    record.exc_text = pattern.sub(MASK, text)


class RedactedException(Exception):
    """Stands in for an exception whose text held a secret: its type's name, frames and chain, the text masked."""


_stand_in_types: dict[type, type] = {}


def _stand_in(exc: BaseException | None, pattern: re.Pattern[str], seen: set[int]) -> BaseException | None:
    if exc is None or id(exc) in seen:
        return None
    seen.add(id(exc))
    cls = type(exc)
    kind = _stand_in_types.get(cls)
    if kind is None:
        # Same name and module, so a traceback reads "botocore.exceptions.ClientError: ***" as before.
        kind = _stand_in_types[cls] = type(cls.__name__, (RedactedException,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001
        text = "(its text could not be read)"
    new = kind(pattern.sub(MASK, text)).with_traceback(exc.__traceback__)
    new.__cause__ = _stand_in(exc.__cause__, pattern, seen)
    new.__context__ = _stand_in(exc.__context__, pattern, seen)
    new.__suppress_context__ = exc.__suppress_context__
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list):
        new.__notes__ = [pattern.sub(MASK, n) if isinstance(n, str) else n for n in notes]
    return new


class RedactingFilter(logging.Filter):
    """On every logger that logs while secrets are known: ``extra`` fields masked (makeRecord sets them
    after the factory ran), and the whole record when the factory in place is not ours (replaced later)."""

    def filter(self, record: logging.LogRecord) -> bool:
        pattern = _current()
        if pattern is not None:
            if not getattr(logging.getLogRecordFactory(), "skyvm_redacts", False):
                scrub_record(record)
            _scrub_extra(record, pattern)
        return True


_filter = RedactingFilter()


def _scrubbing_factory(previous: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if _current() is not None:
            scrub_record(record)
            if record.name not in _filtered:
                # A logger that had not logged since secrets were known: it gets the filter now, before
                # Logger.handle runs it on this very record (and its extra fields).
                _guard(record.name)
        return record

    factory.skyvm_redacts = True  # type: ignore[attr-defined]
    return factory


def _factory_scrubs(factory: Callable[..., logging.LogRecord]) -> bool:
    """Whether records ``factory`` makes come through ours (it is ours, or it chains to it)."""
    if getattr(factory, "skyvm_redacts", False):
        return True
    with _lock:
        probe = min(_secrets, default=None)
    if probe is None:
        return True
    try:
        return probe not in factory("skyvm.redact", logging.DEBUG, __file__, 0, probe, None, None).getMessage()
    except Exception:  # noqa: BLE001 - a factory that cannot make our probe: put ours in front of it
        return False


def _install() -> None:
    """Scrub at record creation (once, or again if the factory was replaced unchained), and filter every skyvm logger."""
    with _install_lock:
        current = logging.getLogRecordFactory()
        if not _factory_scrubs(current):
            logging.setLogRecordFactory(_scrubbing_factory(current))
        logging.getLogger("skyvm")  # made now, so that it is guarded from the start
        for name in list(logging.Logger.manager.loggerDict):  # a C-level copy: a getLogger elsewhere cannot break it
            if name == "skyvm" or name.startswith("skyvm."):
                _guard(name)


_install_lock = threading.Lock()
_filtered: set[str] = set()


def _guard(name: Any) -> None:
    """The filter on logger ``name`` if it exists (a record made outside a logger names none to create)."""
    logger = logging.root if name == "root" else logging.Logger.manager.loggerDict.get(name)
    if isinstance(logger, logging.Logger):
        if _filter not in logger.filters:
            logger.addFilter(_filter)
        _filtered.add(name)

