"""A node's settings, and the shared settings YAML that both engines read.

The rooms:

- :mod:`skyvm.settings.forms`: the accepted names and the form of each single value;
- :mod:`skyvm.settings.parts`: the sub-models (``RegistrySettings``, ``PoolSettings``);
- :mod:`skyvm.settings.node`: ``NodeSettings``, the model every engine and backend reads;
- :mod:`skyvm.settings.file`: the file (``SettingsFile``), its layers, ``SkyVMConfig`` and ``as_config``.

Errors are worded by :mod:`skyvm.validation`, the one formatter of pydantic errors.
This package re-exports the names callers use: ``from skyvm.settings import NodeSettings``.
May import: its own modules only.
"""

from skyvm.settings.file import SettingsFile, SkyVMConfig, as_config, merge_layers, validate_layer
from skyvm.settings.forms import BACKENDS, CLOUDS, DISK_TIERS, LAMBDA_UNSUPPORTED, RECOVERY_STRATEGIES, STORE_PREFIXES
from skyvm.settings.node import FIELD_NAMES, NodeSettings
from skyvm.settings.parts import PoolSettings, RegistrySettings

__all__ = [
    "BACKENDS", "CLOUDS", "DISK_TIERS", "FIELD_NAMES", "LAMBDA_UNSUPPORTED", "RECOVERY_STRATEGIES", "STORE_PREFIXES",
    "NodeSettings", "PoolSettings", "RegistrySettings", "SettingsFile", "SkyVMConfig", "as_config", "merge_layers",
    "validate_layer",
]
