"""Prefect adapter of skyvm: ``SkyVMTaskRunner`` and per-task ``skyvm_options`` (tasks on nodes),
``SkyVMWorker`` (work pools of type ``skyvm``: whole flow runs on nodes) and ``@skyvm``.

The public names are imported on first use (PEP 562): a node importing ``prefect_skyvm.on_node`` must
not pay for the launcher's side (the worker, skyvm's launcher core). Prefect imports this package as a
collection (the ``prefect.collections`` entry point) when it looks a worker type up: then, and only then,
``prefect.workers.base`` is already imported, and ``SkyVMWorker`` is defined at once, so its type registers.

May import: its own modules (the public names re-exported).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

_PUBLIC = {
    "SkyVMTaskRunner": "prefect_skyvm.task_runners",
    "NodeCrashed": "prefect_skyvm.task_runners",
    "skyvm_options": "prefect_skyvm.context",
    "SkyVMWorker": "prefect_skyvm.workers",
    "skyvm": "prefect_skyvm.decorators",
}

__all__ = ["SkyVMTaskRunner", "skyvm_options", "NodeCrashed", "SkyVMWorker", "skyvm"]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'prefect_skyvm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if "prefect.workers.base" in sys.modules:
    from prefect_skyvm.workers import SkyVMWorker  # noqa: E402,F401 - registers the worker type
