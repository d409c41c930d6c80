"""``SkyVMHook``: where an Airflow deployment keeps skyvm's settings and credentials.

A ``skyvm`` connection's extra holds ``settings_file`` (a path to the shared
settings YAML) or ``settings`` (the same content inline). Its login/password,
when set, are the registry credentials: the settings' registry then refers to
this connection (``password: airflow:CONN_ID``), read when a node is launched,
so the password never sits in settings, the process environment or a command line.
Cloud credentials come from connectors, which can refer to the team's own
Airflow connections (``credentials: airflow:aws_default``).

Holds ``SkyVMHook``. May import: airflow's hook base, skyvm.settings.
"""

from __future__ import annotations

from typing import Any, Optional

from skyvm.settings import SkyVMConfig, as_config

try:  # Airflow 3
    from airflow.sdk.bases.hook import BaseHook
except ImportError:  # pragma: no cover - older layouts
    from airflow.hooks.base import BaseHook


class SkyVMHook(BaseHook):
    conn_name_attr = "skyvm_conn_id"
    default_conn_name = "skyvm_default"
    conn_type = "skyvm"
    hook_name = "SkyVM"

    def __init__(self, skyvm_conn_id: Optional[str] = default_conn_name, settings_file: Optional[str] = None):
        super().__init__()
        self.skyvm_conn_id = skyvm_conn_id
        self.settings_file = settings_file

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["host", "schema", "port"],
            "relabeling": {"login": "Registry username", "password": "Registry password"},
            "placeholders": {"extra": '{"settings_file": "/opt/airflow/skyvm.yaml"}'},
        }

    def _connection(self):
        if not self.skyvm_conn_id:
            return None
        try:
            return self.get_connection(self.skyvm_conn_id)
        except Exception:  # noqa: BLE001 - no such connection: the default conn is optional
            if self.skyvm_conn_id != self.default_conn_name:
                raise
            return None

    def get_config(self) -> SkyVMConfig:
        """The settings: the operator's file, else the connection's, else $SKYVM_CONFIG / ./skyvm.yaml / built-ins."""
        if self.settings_file:
            return as_config(self.settings_file)
        conn = self._connection()
        if conn is None:
            return as_config(None)
        extra = conn.extra_dejson or {}
        config = as_config(extra.get("settings") or extra.get("settings_file"))
        if conn.password:
            for layer in [config.defaults, *config.profiles.values(), *config.nodes.values()]:
                registry = layer.get("registry")
                if isinstance(registry, dict) and not registry.get("connector"):
                    kept = {k: v for k, v in registry.items() if k not in ("password", "password_env", "password_file")}
                    layer["registry"] = {**kept, "username": registry.get("username") or conn.login, "password": f"airflow:{self.skyvm_conn_id}"}
        return config
