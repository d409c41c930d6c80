"""Prefect adapter of skyvm: ``SkyVMTaskRunner`` and per-task ``skyvm_options``."""

from prefect_skyvm.context import skyvm_options
from prefect_skyvm.task_runners import NodeCrashed, SkyVMTaskRunner

__all__ = ["SkyVMTaskRunner", "skyvm_options", "NodeCrashed"]
