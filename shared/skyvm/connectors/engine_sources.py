"""Credential sets kept in an engine: an Airflow connection, read the way its provider reads it.

With the cloud's Airflow provider installed (apache-airflow-providers-amazon,
-google, -microsoft-azure) the provider's hook reads the connection, so what
the connection can express (a role to assume, a key path, a keyfile dict)
means the same to skyvm as to the team's other tasks. Without it, the
connection's own fields are read by the provider's documented names. Holds the reading of the
engines' stores themselves too: an Airflow connection, a Prefect block document.

May import: skyvm.redact and skyvm.connectors.base only (skyvm.connectors.refs imports this module).
"""

from __future__ import annotations

import json
from typing import Any

from skyvm import redact
from skyvm.connectors.base import SecretReferenceError


def airflow_connection(conn_id: str, where: str, ref: str):
    """An Airflow connection by id, or an error saying how to create it."""
    try:
        from airflow.sdk.bases.hook import BaseHook  # Airflow 3
    except ImportError:
        try:
            from airflow.hooks.base import BaseHook  # type: ignore[no-redef]
        except ImportError:
            raise SecretReferenceError(where, ref, "an airflow: reference is read in an Airflow process, and Airflow is not installed here") from None
    try:
        return BaseHook.get_connection(conn_id)
    except Exception as exc:  # noqa: BLE001 - AirflowNotFoundException and friends
        raise SecretReferenceError(where, ref, f"Airflow connection {conn_id!r} cannot be read ({type(exc).__name__}: {redact.redact(str(exc))}); create it with `airflow connections add {conn_id} ...`") from None


def prefect_block_data(block_type: str, name: str, where: str, ref: str) -> dict[str, Any]:
    """A block document's fields, secrets included, straight from the Prefect API.

    Read through the API rather than ``Block.load`` so that a block type of an
    integration (prefect-aws's ``aws-credentials``) resolves without that
    integration installed in the engine's environment.
    """
    try:
        from prefect.client.orchestration import get_client
    except ImportError:
        raise SecretReferenceError(where, ref, "a prefect: reference is read in a Prefect process, and Prefect is not installed here") from None
    try:
        with get_client(sync_client=True) as client:
            doc = client.read_block_document_by_name(name=name, block_type_slug=block_type, include_secrets=True)
    except Exception as exc:  # noqa: BLE001 - ObjectNotFound, API unreachable
        raise SecretReferenceError(
            where, ref, f"Prefect block {block_type}/{name} cannot be read ({type(exc).__name__}: {redact.redact(str(exc))}); create it in the Prefect UI or with Block.save"
        ) from None
    data = {}
    for key, value in (doc.data or {}).items():
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        data[key] = value
    return data


def _extra(conn) -> dict[str, Any]:
    try:
        return dict(conn.extra_dejson or {})
    except Exception:  # noqa: BLE001 - a malformed extra reads as empty
        return {}


def _field(extra: dict, *names: str) -> Any:
    """An extra field by any of its names, with or without the old ``extra__<type>__`` prefix."""
    for name in names:
        for key, value in extra.items():
            if key == name or key.endswith(f"__{name}"):
                if value not in (None, ""):
                    return value
    return None


def airflow_credentials(kind: str, conn_id: str, where: str, ref: str) -> dict[str, Any]:
    conn = airflow_connection(conn_id, where, ref)
    extra = _extra(conn)
    if kind == "aws":
        return _aws(conn_id, conn, extra)
    if kind == "gcp":
        return _gcp(conn_id, conn, extra, where, ref)
    if kind == "azure":
        return _azure(conn, extra)
    # lambda, kubernetes and registries: the password, and the extra as given
    return {"login": conn.login, "password": conn.password, **extra}


def _aws(conn_id: str, conn, extra: dict) -> dict[str, Any]:
    try:
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    except ImportError:
        AwsBaseHook = None  # noqa: N806
    if AwsBaseHook is not None:
        creds = AwsBaseHook(aws_conn_id=conn_id, client_type="sts").get_credentials()
        data = {"aws_access_key_id": creds.access_key, "aws_secret_access_key": creds.secret_key, "aws_session_token": creds.token}
    else:
        data = {
            "aws_access_key_id": conn.login or _field(extra, "aws_access_key_id"),
            "aws_secret_access_key": conn.password or _field(extra, "aws_secret_access_key"),
            "aws_session_token": _field(extra, "aws_session_token"),
        }
    data["region"] = _field(extra, "region_name", "region")
    redact.register(data.get("aws_secret_access_key"), data.get("aws_session_token"))
    return data


def _gcp(conn_id: str, conn, extra: dict, where: str, ref: str) -> dict[str, Any]:
    keyfile = _field(extra, "keyfile_dict")
    key_path = _field(extra, "key_path")
    if isinstance(keyfile, str):
        try:
            keyfile = json.loads(keyfile)
        except json.JSONDecodeError:
            raise SecretReferenceError(where, ref, f"Airflow connection {conn_id!r}: keyfile_dict is not JSON") from None
    if keyfile is None and key_path:
        try:
            with open(key_path) as fh:
                keyfile = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise SecretReferenceError(where, ref, f"Airflow connection {conn_id!r}: cannot read key_path {key_path}: {exc}") from None
    return {"service_account_info": keyfile, "project": _field(extra, "project", "project_id")}


def _azure(conn, extra: dict) -> dict[str, Any]:
    return {
        "client_id": conn.login or _field(extra, "client_id"),
        "client_secret": conn.password or _field(extra, "client_secret"),
        "tenant_id": _field(extra, "tenantId", "tenant_id", "tenant"),
        "subscription_id": _field(extra, "subscriptionId", "subscription_id"),
        "account_name": _field(extra, "account_name") or conn.host,
        "connection_string": _field(extra, "connection_string"),
        "account_key": _field(extra, "shared_access_key", "account_key"),
    }
