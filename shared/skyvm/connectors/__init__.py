"""Connectors: how skyvm authenticates to each cloud, its buckets and its registries.

Defined once in the shared settings YAML (or in code) and named per node:

    connectors:
      team-aws: {type: aws, method: iam-role, role_arn: arn:aws:iam::123:role/skyvm,
                 aws_access_key_id: env:AWS_KEY, aws_secret_access_key: airflow:aws_default}
      team-gcp: {type: gcp, method: service-account, service_account_json: file:/secrets/sa.json}
    defaults:
      connector: [team-aws, team-gcp]

A node's cloud with no connector uses that cloud's ``implicit`` method.

This package's modules: ``base`` (what a connector is, its auth strategies' base, parsing),
``refs`` (secret references) and ``engine_sources`` (Airflow connections, Prefect blocks),
``common`` (shared helpers), ``files`` (private credential files), one module per cloud
(``aws``, ``gcp``, ``azure``, ``lambda_cloud``, ``kubernetes``) and, for the larger ones, their
auth methods (``aws_methods``, ``gcp_methods``, ``azure_methods``).
This module holds the choice of a node's connectors.

May import: skyvm.clouds, skyvm.connectors.base and skyvm.connectors.refs (settings for types only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from skyvm import clouds
from skyvm.connectors import refs
from skyvm.connectors.base import (
    CONNECTOR_TYPES,
    CREDENTIALS,
    Connector,
    ConnectorError,
    NodeAccess,
    connector_class,
    implicit,
    parse_connector,
)

if TYPE_CHECKING:  # pragma: no cover
    from skyvm.settings import NodeSettings, RegistrySettings

__all__ = [
    "Connector",
    "ConnectorError",
    "NodeAccess",
    "CONNECTOR_TYPES",
    "CREDENTIALS",
    "connector_class",
    "parse_connector",
    "implicit",
    "named",
    "node_connectors",
    "for_cloud",
    "for_store",
    "store_kind",
    "for_registry",
    "registry_login",
]


def named(settings: "NodeSettings", name: str) -> Connector:
    return parse_connector(name, settings.connector_defs[name], f"connectors.{name}")


def node_connectors(settings: "NodeSettings") -> list[Connector]:
    """The connectors a node names (at most one per cloud)."""
    return [named(settings, n) for n in settings.connector_names]


def for_cloud(settings: "NodeSettings", kind: str) -> Connector:
    """The node's connector for one cloud, else that cloud's implicit credentials."""
    for conn in node_connectors(settings):
        if conn.type == kind:
            return conn
    return implicit(kind)


def store_kind(url: Optional[str]) -> Optional[str]:
    """The connector type a payload store URL needs (None for a directory)."""
    return clouds.cloud_of_url(url)


def for_store(settings: "NodeSettings", url: Optional[str]) -> Optional[Connector]:
    """The connector a payload store is reached with: ``payload_store_connector``, else the node's of that cloud."""
    kind = store_kind(url)
    if kind is None:
        return None
    if settings.payload_store_connector:
        conn = named(settings, settings.payload_store_connector)
        if conn.type != kind:
            raise ConnectorError(f"payload_store_connector {conn.name!r} is a {conn.type} connector, but the store {url} needs a {kind} one")
        return conn
    return for_cloud(settings, kind)


def for_registry(settings: "NodeSettings", registry: "Optional[RegistrySettings]") -> Optional[Connector]:
    if registry is None or not registry.connector:
        return None
    return named(settings, registry.connector)


def registry_login(settings: "NodeSettings", registry: "Optional[RegistrySettings]") -> Optional[tuple[str, str]]:
    """(username, password) for the node's registry, fresh on every call (tokens expire), or None."""
    if registry is None:
        return None
    conn = for_registry(settings, registry)
    if conn is not None:
        return conn.registry_credentials(registry.server)
    ref = registry.password_reference()
    if ref is None or not registry.username:
        return None
    return registry.username, refs.resolve(ref, f"registry {registry.server}: password")
