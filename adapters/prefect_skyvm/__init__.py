"""Prefect adapter of skyvm: ``SkyVMTaskRunner`` and per-task ``skyvm_options`` (tasks on nodes),
``SkyVMWorker`` (work pools of type ``skyvm``: whole flow runs on nodes) and ``@skyvm``.

May import: its own modules (the public names re-exported).
"""

from prefect_skyvm.context import skyvm_options
from prefect_skyvm.decorators import skyvm
from prefect_skyvm.task_runners import NodeCrashed, SkyVMTaskRunner
from prefect_skyvm.workers import SkyVMWorker

__all__ = ["SkyVMTaskRunner", "skyvm_options", "NodeCrashed", "SkyVMWorker", "skyvm"]
