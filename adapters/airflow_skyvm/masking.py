"""Every secret skyvm reads is masked by Airflow's own secrets masker too.

skyvm scrubs stdlib log records itself (``skyvm.redact``), but Airflow 3 logs through structlog:
an operator's ``self.log``, the task runner's "Task failed with exception" with its traceback, what
a task prints. In a worker, the task process sends those lines unmasked to its supervisor, which
masks them with what it was told (``mask_secret``) and writes the task log file. So each secret
skyvm registers is handed to ``airflow.sdk.log.mask_secret``, as Airflow's own secrets backends
hand theirs: the task process and its supervisor both hide it from then on.

Holds ``install`` and ``flush``. May import: skyvm.redact, airflow.sdk (lazily).
"""

from __future__ import annotations

import asyncio
import threading

from skyvm import redact


# Secrets read on a thread that may not message the supervisor, until the main thread does (flush).
_pending: list[str] = []
_pending_lock = threading.Lock()


def _mask(secret: str) -> None:
    if _may_message_the_supervisor():
        flush()
        _tell_supervisor(secret)
        return
    from airflow.sdk._shared.secrets_masker import _secrets_masker

    _secrets_masker().add_mask(secret)
    with _pending_lock:
        _pending.append(secret)


def flush() -> None:
    """Tell the supervisor of the secrets read on other threads; a no-op but on the main thread."""
    if threading.current_thread() is not threading.main_thread() or not _pending:
        return
    with _pending_lock:
        pending, _pending[:] = list(_pending), []
    for secret in pending:
        _tell_supervisor(secret)


def _tell_supervisor(secret: str) -> None:
    from airflow.sdk.log import mask_secret

    mask_secret(secret)  # this process's masker, and the supervisor's when there is one


def _may_message_the_supervisor() -> bool:
    """Whether a synchronous message to the supervisor is safe from here.

    Not from an event loop (a triggerer, an async task: it can deadlock), nor from another thread
    than the main one where the channel has no lock of its own (Task SDK 1.1, Airflow 3.1), as
    skyvm's launcher threads could interleave with the task's own requests. Those places mask in
    this process at once and tell the supervisor at the next ``flush`` on the main thread (the
    operator flushes before it returns or raises); skyvm scrubs what it forwards itself meanwhile.
    """
    try:
        asyncio.get_running_loop()
        return False
    except RuntimeError:
        pass
    if threading.current_thread() is threading.main_thread():
        return True
    from airflow.sdk.execution_time import task_runner

    return hasattr(getattr(task_runner, "SUPERVISOR_COMMS", None), "_thread_lock")


def install() -> None:
    """From now on (and for the secrets already read), skyvm's secrets are Airflow's masked values too."""
    redact.add_listener(_mask)
