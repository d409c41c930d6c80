"""The sub-models of a node's settings: its container registry and its pool of warm workers.

Holds: ``RegistrySettings`` (a registry and its credentials, by reference) and ``PoolSettings``.
May import: pydantic, :mod:`skyvm.settings.forms`; :mod:`skyvm.connectors.refs` only inside a
validator (the connectors import the settings).
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

import skyvm.settings.forms as forms


class RegistrySettings(BaseModel):
    """A container registry and the credentials to reach it, by reference.

    The password itself never sits in settings: ``password`` is a secret
    reference (``env:NAME``, ``file:PATH``, ``airflow:CONN_ID``,
    ``prefect:secret/NAME``); ``password_env`` / ``password_file`` are the older
    spellings of the first two. ``connector`` names a connector that mints a
    fresh token instead (ECR, Artifact Registry, ACR).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    server: str
    username: Optional[str] = None
    password: Optional[str] = None
    password_env: Optional[str] = None
    password_file: Optional[str] = None
    connector: Optional[str] = None

    @field_validator("password")
    @classmethod
    def _reference(cls, value: Optional[str]) -> Optional[str]:
        from skyvm.connectors.refs import check_syntax

        return None if value is None else check_syntax(value, "registry.password")

    @model_validator(mode="after")
    def _one_password_source(self) -> "RegistrySettings":
        sources = [n for n in ("password", "password_env", "password_file", "connector") if getattr(self, n)]
        if len(sources) > 1:
            raise ValueError(f"give one of password, password_env, password_file or connector, not {' and '.join(sources)}")
        if sources and sources[0] != "connector" and not self.username:
            raise ValueError("a registry password needs a username")
        return self

    def password_reference(self) -> Optional[str]:
        if self.password:
            return self.password
        if self.password_env:
            return f"env:{self.password_env}"
        if self.password_file:
            return f"file:{self.password_file}"
        return None


class PoolSettings(BaseModel):
    """Warm workers for a signature: ``{workers: N}`` (a pool skyvm makes per signature and run)
    or ``{name: NAME[, workers: N]}`` (a long-lived pool a team shares; ``pool: NAME`` for short)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Optional[str] = None
    workers: int = 1

    @field_validator("workers", mode="before")
    @classmethod
    def _check_workers(cls, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
            raise ValueError(f"pool.workers accepts a whole number from 1 to 1000 (warm workers kept for the nodes); got {value!r}")
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: Optional[str]) -> Optional[str]:
        # SkyPilot names a pool's workers <pool>-<id>, so a pool name must be a valid cluster name too.
        return forms.cluster_name(value, "pool.name")

    @property
    def shared(self) -> bool:
        """A named pool outlives runs: skyvm never tears it down at a run's end."""
        return self.name is not None
