"""Airflow adapter of skyvm, laid out as an Airflow provider.

- ``operators.skyvm.SkyVMOperator``: a Python callable or a shell command on a node
- ``decorators.skyvm.skyvm_task``: ``@task.skyvm``
- ``triggers.skyvm.SkyVMTrigger``: the deferrable wait
- ``hooks.skyvm.SkyVMHook``: the ``skyvm`` connection (settings file or inline settings)

Airflow finds it through the ``apache_airflow_provider`` entry point. No
import of SkyPilot happens here: the local backend needs none.

Holds ``get_provider_info``. May import: the standard library and yaml (Airflow reads it while it starts).
"""

from __future__ import annotations

__version__ = "0.1.0"


def get_provider_info() -> dict:
    """provider.yaml beside this file, as Airflow's provider entry point expects it."""
    from pathlib import Path

    import yaml

    return yaml.safe_load((Path(__file__).with_name("provider.yaml")).read_text())
