"""Secret references: where a connector's secret values come from. Never the values themselves.

    env:NAME                     a variable of the engine's process
    file:PATH                    a file's content (one trailing newline dropped)
    airflow:CONN_ID              an Airflow connection (its password; or, for a whole
                                 credential set, the provider hook's credentials)
    prefect:secret/NAME          a Prefect Secret block
    prefect:aws-credentials/NAME a Prefect block of that type (prefect-aws, prefect-gcp,
    prefect:gcp-credentials/NAME  prefect-azure): its fields

References are resolved in the engine's process, at launch (and at
``skyvm check``), never when settings are read: settings, TaskSpecs, trigger
rows and logs only ever hold the reference. Every resolved value is
registered with :mod:`skyvm.redact`.

May import: skyvm.redact, skyvm.connectors.base and skyvm.connectors.engine_sources (the engines'
stores), never a connector.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import AfterValidator, ValidationInfo

from skyvm import redact
from skyvm.connectors.base import SecretReferenceError
from skyvm.connectors.engine_sources import airflow_connection, airflow_credentials, prefect_block_data

__all__ = ["Reference", "SecretReferenceError", "check_syntax", "is_reference", "resolve", "resolve_optional", "resolve_credential_set"]

SCHEMES = ("env", "file", "airflow", "prefect")
ACCEPTED = "env:NAME, file:PATH, airflow:CONN_ID, prefect:secret/NAME or prefect:BLOCK-TYPE/NAME"


def check_syntax(value: Any, field: str) -> str:
    """Validate a reference's form (used by the settings model). A pasted secret is refused."""
    if not isinstance(value, str) or ":" not in value:
        shown = "a value" if isinstance(value, str) else type(value).__name__
        raise ValueError(
            f"{field} takes a secret reference ({ACCEPTED}), never the secret itself; got {shown} that is not a reference"
        )
    scheme, _, rest = value.partition(":")
    if scheme not in SCHEMES or not rest:
        # The text is not echoed: a pasted secret may hold a colon.
        raise ValueError(f"{field} does not start with a known reference scheme (the value is not shown: it may be a pasted secret); accepted: {ACCEPTED}")
    if scheme == "prefect" and "/" not in rest:
        raise ValueError(f"{field}: a Prefect reference is prefect:BLOCK-TYPE/NAME (e.g. prefect:secret/my-key); got {value!r}")
    return value


def _checked(value: Optional[str], info: ValidationInfo) -> Optional[str]:
    return None if value is None else check_syntax(value, info.field_name or "a reference")


# A settings field that holds a secret reference, never a secret (checked by ``check_syntax``).
Reference = Annotated[Optional[str], AfterValidator(_checked)]


def is_reference(value: Any) -> bool:
    return isinstance(value, str) and value.partition(":")[0] in SCHEMES and bool(value.partition(":")[2])


def _register_tree(value: Any) -> None:
    if isinstance(value, str):
        redact.register(value)
    elif isinstance(value, dict):
        for v in value.values():
            _register_tree(v)
        # A service-account JSON is a secret as a whole, and as it is serialised.
        if value.get("private_key"):
            redact.register(json.dumps(value), json.dumps(value, indent=2))
    elif isinstance(value, (list, tuple)):
        for v in value:
            _register_tree(v)


# -- scalar references -------------------------------------------------------


def resolve(ref: str, where: str) -> str:
    """The secret a reference names, as a string. ``where`` names the field for errors."""
    scheme, _, rest = ref.partition(":")
    if scheme == "env":
        if rest not in os.environ:
            raise SecretReferenceError(where, ref, f"environment variable {rest} is not set in this process")
        value = os.environ[rest]
    elif scheme == "file":
        path = Path(rest).expanduser()
        try:
            value = path.read_text()
        except OSError as exc:
            raise SecretReferenceError(where, ref, f"cannot read {path}: {exc.strerror or exc}") from None
        value = value[:-1] if value.endswith("\n") else value
    elif scheme == "airflow":
        conn = airflow_connection(rest, where, ref)
        value = conn.password
        if not value:
            raise SecretReferenceError(where, ref, f"Airflow connection {rest!r} has no password set")
    elif scheme == "prefect":
        block_type, _, name = rest.partition("/")
        data = prefect_block_data(block_type, name, where, ref)
        if block_type == "secret":
            value = data.get("value")
            if isinstance(value, (dict, list)):
                value = json.dumps(value)
        else:
            value = None
        if value is None:
            raise SecretReferenceError(where, ref, f"block {block_type}/{name} holds no single secret value; use prefect:secret/NAME, or `credentials:` for a whole credential block")
    else:
        raise SecretReferenceError(where, ref, f"unknown reference scheme; accepted: {ACCEPTED}")
    value = str(value)
    redact.register(value)
    return value


def resolve_optional(ref: Optional[str], where: str) -> Optional[str]:
    return None if ref is None else resolve(ref, where)


def resolve_credential_set(ref: str, kind: str, where: str) -> dict[str, Any]:
    """A whole credential set from an engine's store, as the connector of ``kind`` reads it.

    ``airflow:CONN_ID`` goes through the cloud's provider hook when that
    provider is installed (so role chaining and the like in the connection
    apply), else reads the connection's fields. ``prefect:TYPE/NAME`` returns
    the block's fields. ``env:``/``file:`` hold JSON.
    """
    scheme, _, rest = ref.partition(":")
    if scheme == "airflow":
        data = airflow_credentials(kind, rest, where, ref)
    elif scheme == "prefect":
        block_type, _, name = rest.partition("/")
        data = prefect_block_data(block_type, name, where, ref)
    else:
        text = resolve(ref, where)
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise SecretReferenceError(where, ref, "a credential set from env:/file: must be JSON") from None
        if not isinstance(data, dict):
            raise SecretReferenceError(where, ref, "a credential set must be a JSON object")
    _register_tree(data)
    return data
