"""skyvm: run each node of a Prefect flow or Airflow DAG in its own container on a VM.

The engine-neutral API lives here; the adapters (``prefect_skyvm``,
``airflow_skyvm``) build on it.
"""

from skyvm.errors import (
    InfrastructureError,
    NodeCancelled,
    NodeFailed,
    NodeTimeout,
    PayloadError,
    SettingsError,
    SkyVMError,
    UnsatisfiableRequest,
)
from skyvm.settings import NodeSettings, SkyVMConfig

__version__ = "0.1.0"

__all__ = [
    "InfrastructureError",
    "NodeCancelled",
    "NodeFailed",
    "NodeTimeout",
    "NodeSettings",
    "PayloadError",
    "SettingsError",
    "SkyVMConfig",
    "SkyVMError",
    "UnsatisfiableRequest",
    "submit",
    "Run",
    "NodeHandle",
]


def __getattr__(name):
    # The submit API pulls in the backends; import it only when used so that
    # the in-container runtime stays light.
    if name in ("submit", "Run", "NodeHandle"):
        from skyvm import api

        return getattr(api, name)
    raise AttributeError(name)
