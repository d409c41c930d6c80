"""What a skyvm task raises in Airflow when its node fails or asks to be skipped.

Airflow's convention (the Docker provider's ``DockerContainerFailedException``, ``BashOperator``,
``@task.virtualenv``): a failed task raises an ``AirflowException``, a skipped one an
``AirflowSkipException``, and ``skip_on_exit_code`` lists the exit codes that skip the task
instead of failing it. A node's exit code is the one a process running its code would have:
a command's own, or ``n`` of ``sys.exit(n)`` in a callable.

Holds the exceptions and the exit-code helpers. May import: airflow's exceptions, skyvm.errors.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Optional

from skyvm.errors import InfrastructureError, NodeFailed

try:  # Airflow 3.2+: the Task SDK's own
    from airflow.sdk.exceptions import AirflowException, AirflowSkipException
except ImportError:  # Airflow 3.0/3.1 (the same AirflowException class)
    from airflow.exceptions import AirflowException, AirflowSkipException

_TRACEBACK_MARK = "\n\nRemote traceback:\n"


class SkyVMNodeFailedException(AirflowException, NodeFailed):
    """The task's node failed: its code raised (``SystemExit`` and ``KeyboardInterrupt`` included)
    or its command exited non-zero.

    An ``AirflowException`` as Airflow's operators raise, and still a ``skyvm.errors.NodeFailed``:

    - ``remote_traceback``: the traceback as printed on the node
    - ``exc_type``: the remote exception's class name (``CommandFailed`` for a command)
    - ``exit_code``: the node's exit code (a command's, or ``sys.exit``'s), None when its code raised
    - ``logs``: the node's log lines, as ``DockerContainerFailedException.logs``
    - ``remote_exception``: the remote exception itself, when it could be unpickled here
    """

    def __init__(
        self,
        message: str,
        *,
        remote_traceback: str = "",
        exc_type: str = "",
        returncode: Optional[int] = None,
        exit_code: Optional[int] = None,
        logs: Optional[list[str]] = None,
        remote_exception: Optional[BaseException] = None,
    ):
        super().__init__(message, remote_traceback=remote_traceback, exc_type=exc_type, returncode=returncode)
        self.exit_code = exit_code
        self.logs = list(logs or [])
        self.remote_exception = remote_exception

    @classmethod
    def from_node_failed(cls, exc: NodeFailed, logs: Optional[list[str]] = None) -> "SkyVMNodeFailedException":
        # NodeFailed's text is its message with the remote traceback appended: keep the message alone.
        message = str(exc).split(_TRACEBACK_MARK, 1)[0]
        return cls(
            message,
            remote_traceback=exc.remote_traceback,
            exc_type=exc.exc_type,
            returncode=exc.returncode,
            exit_code=node_exit_code(exc),
            logs=logs,
            remote_exception=getattr(exc, "remote_exception", None),
        )


class SkyVMInfrastructureException(AirflowException, InfrastructureError):
    """The task's node could not run or be followed (image, registry, container, VM, a trigger that
    lost it): an ``AirflowException`` as Airflow's operators raise, and still a
    ``skyvm.errors.InfrastructureError``. Its message names the node, its cluster and what to check."""


class SkyVMNodeSkippedException(AirflowSkipException):
    """The node exited with a code listed in the task's ``skip_on_exit_code``: the task is skipped.

    ``exit_code`` and ``logs`` as on ``SkyVMNodeFailedException``.
    """

    def __init__(self, message: str, *, exit_code: int, logs: Optional[list[str]] = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.logs = list(logs or [])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def exit_codes(value: Any, where: str) -> tuple[int, ...]:
    """``skip_on_exit_code`` as a tuple: None, one exit code, or a list (tuple, set) of them."""
    if value is None:
        return ()
    if _is_int(value):
        return (value,)
    if isinstance(value, Collection) and not isinstance(value, (str, bytes)) and all(_is_int(v) for v in value):
        return tuple(value)
    raise TypeError(f"{where}: skip_on_exit_code: expected an exit code (an int) or a list of them, e.g. 100 or [100, 101]; got {value!r}")


def node_exit_code(exc: NodeFailed) -> Optional[int]:
    """The exit code of the failed node's code, as a process running it would have had it.

    A command: its exit code. A callable that raised ``SystemExit``: its code (None counts as 0,
    a message as 1, as Python's own exit does). Anything else the callable raised: None.
    """
    if exc.returncode is not None:
        return exc.returncode
    if exc.exc_type != "SystemExit":
        return None
    if hasattr(exc, "exit_code"):  # NodeAborted: sys.exit()'s code, the exception itself kept off this process
        code = exc.exit_code
    else:
        original = getattr(exc, "remote_exception", None)
        if original is None:
            return None  # the exception did not travel back: its code is unknown
        code = getattr(original, "code", None)
    if code is None:
        return 0
    return code if _is_int(code) else 1
