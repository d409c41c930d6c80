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
    # Settings (pydantic) and the submit API (backends) load only when used,
    # so the in-container runtime starts fast.
    if name in ("submit", "Run", "NodeHandle"):
        from skyvm import api

        return getattr(api, name)
    if name in ("NodeSettings", "SkyVMConfig"):
        from skyvm import settings

        return getattr(settings, name)
    raise AttributeError(f"module 'skyvm' has no attribute {name!r}")
