"""The errors skyvm raises, so that callers can tell a user's mistake from a node's failure."""

from __future__ import annotations


class SkyVMError(Exception):
    """Base class of every error skyvm raises on purpose."""


class SettingsError(SkyVMError, ValueError):
    """Bad settings: names the file, the field path and what is accepted.

    Raised before anything is launched.
    """

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        where = source or "settings"
        lines = [f"{where}: {path}: {msg}" if path else f"{where}: {msg}" for path, msg in problems]
        super().__init__("invalid skyvm settings:\n  " + "\n  ".join(lines))


class PayloadError(SkyVMError):
    """A payload or result object is missing or corrupt."""


class NodeFailed(SkyVMError):
    """User code on the node raised, or a shell command exited non-zero.

    ``remote_traceback`` holds the traceback text as printed on the node.
    """

    def __init__(self, message: str, *, remote_traceback: str = "", exc_type: str = "", returncode: int | None = None):
        self.remote_traceback = remote_traceback
        self.exc_type = exc_type
        self.returncode = returncode
        text = message
        if remote_traceback:
            text += "\n\nRemote traceback:\n" + remote_traceback
        super().__init__(text)


class NodeAborted(NodeFailed):
    """User code on the node raised a ``BaseException`` that is no ``Exception`` (``SystemExit``,
    ``KeyboardInterrupt``): it ended the node, and must never stop the process that launched it,
    so this (an ``Exception``) is raised there instead. ``exit_code`` is ``sys.exit(n)``'s ``n``
    (None for other kinds, or ``sys.exit()`` without a code)."""

    def __init__(self, message: str, *, exit_code=None, **kwargs):
        super().__init__(message, **kwargs)
        self.exit_code = exit_code


class InfrastructureError(SkyVMError):
    """The node could not be run: image, registry, container, VM or cloud trouble.

    Engines report this as a crash, not as a failure of the user's code.
    """


class UnsatisfiableRequest(InfrastructureError):
    """The backend cannot provide the resources a node asks for."""


class NodeCancelled(SkyVMError):
    """The node was cancelled before it finished."""


class NodeTimeout(NodeCancelled, TimeoutError):
    """The node ran longer than its ``timeout`` setting and was cancelled."""
