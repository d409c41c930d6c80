"""Airflow adapter of skyvm, laid out as an Airflow provider.

- ``operators.skyvm.SkyVMOperator``: a Python callable or a shell command on a node
- ``decorators.skyvm.skyvm_task``: ``@task.skyvm``
- ``triggers.skyvm.SkyVMTrigger``: the deferrable wait
- ``hooks.skyvm.SkyVMHook``: the ``skyvm`` connection (settings file or inline settings)

Airflow finds it through the ``apache_airflow_provider`` entry point. No
import of SkyPilot happens here: the local backend needs none.
"""

from __future__ import annotations

__version__ = "0.1.0"


def get_provider_info() -> dict:
    return {
        "package-name": "skyvm",
        "name": "SkyVM",
        "description": "Run each Airflow task in its own container on a VM provisioned by SkyPilot (or locally in Docker).",
        "versions": [__version__],
        "connection-types": [{"hook-class-name": "airflow_skyvm.hooks.skyvm.SkyVMHook", "connection-type": "skyvm"}],
        "hooks": [{"integration-name": "SkyVM", "python-modules": ["airflow_skyvm.hooks.skyvm"]}],
        "operators": [{"integration-name": "SkyVM", "python-modules": ["airflow_skyvm.operators.skyvm"]}],
        "triggers": [{"integration-name": "SkyVM", "python-modules": ["airflow_skyvm.triggers.skyvm"]}],
        "integrations": [{"integration-name": "SkyVM", "external-doc-url": "https://skypilot.readthedocs.io/", "tags": ["service"]}],
        "task-decorators": [{"name": "skyvm", "class-name": "airflow_skyvm.decorators.skyvm.skyvm_task"}],
    }
