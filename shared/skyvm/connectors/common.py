"""What the GCP, Azure, Lambda and Kubernetes connectors share: method/field checks, SDK calls, small HTTP.

Kept out of :mod:`skyvm.connectors.base` so that module stays the interface;
everything here is a plain helper with no SDK import.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from pydantic import field_validator

from skyvm import redact
from skyvm.connectors.base import ConnectorError

# (fields of which one is needed, what to write) for each method that needs something
Needs = Mapping[str, Sequence[tuple[tuple[str, ...], str]]]


def references(*fields: str):
    """A pydantic field validator: each of ``fields``, when set, holds a secret reference, never a secret."""
    from skyvm.connectors import refs

    def check(cls, value: Optional[str], info) -> Optional[str]:
        return None if value is None else refs.check_syntax(value, info.field_name)

    return field_validator(*fields)(classmethod(check))


def check_method_fields(method: str, values: Mapping[str, Any], needs: Needs, owners: Mapping[str, tuple[str, ...]]) -> None:
    """Raise ValueError (pydantic's way) when a method lacks what it needs, or a field belongs to other methods.

    ``needs[method]`` lists groups: at least one field of each group must be set.
    ``owners[field]`` lists the methods the field is for.
    """
    for name, methods in owners.items():
        if values.get(name) not in (None, "", [], {}) and method not in methods:
            raise ValueError(f"{name} is for method {' or '.join(methods)}; this connector's method is {method}")
    for group, what in needs.get(method, ()):
        if not any(values.get(name) not in (None, "", [], {}) for name in group):
            raise ValueError(f"method {method} needs {what}")


def sdk_call(label: str, what: str, hint: Union[str, Callable[[BaseException, str], str]], fn: Callable, *args, **kwargs):
    """An SDK call whose failure names the connector, what was attempted and the fix; never a secret."""
    try:
        return fn(*args, **kwargs)
    except ConnectorError:
        raise
    except Exception as exc:  # noqa: BLE001 - each SDK has many error types; the user needs one message
        text = redact.redact(str(exc)).strip() or "(no message)"
        fix = hint(exc, text) if callable(hint) else hint
        raise ConnectorError(f"{label}: {what} failed: {type(exc).__name__}: {_short(text)}; {fix}") from None


def _short(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def until(ts: Optional[float]) -> str:
    """``HH:MM UTC`` of a timestamp, as said in a scope or an identity."""
    if ts is None:
        return "an unknown time"
    return time.strftime("%H:%M UTC", time.gmtime(ts))


def http_json(
    url: str, *, label: str, what: str, hint: str, method: str = "GET", headers: Optional[dict[str, str]] = None, form: Optional[dict[str, str]] = None, timeout: float = 15
) -> dict[str, Any]:
    """One HTTP call answered with JSON; an error status or an unreachable host is a ConnectorError."""
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    request = urllib.request.Request(url, data=data, method=method if data is None else "POST", headers={"Accept": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        detail = redact.redact(exc.read().decode(errors="replace"))
        raise ConnectorError(f"{label}: {what} failed: HTTP {exc.code} from {_origin(url)}: {_short(detail, 300)}; {hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectorError(f"{label}: {what} failed: cannot reach {_origin(url)} ({redact.redact(str(reason))}); check the network and the endpoint") from None
    try:
        return json.loads(body or b"{}")
    except json.JSONDecodeError:
        raise ConnectorError(f"{label}: {what}: {_origin(url)} did not answer with JSON; check the endpoint") from None


def _origin(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    return f"{parsed.scheme}://{parsed.netloc}{parsed.path}"


def jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified (to say whose token it is and when it expires); {} for an opaque token."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, json.JSONDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def parse_json_secret(text: str, where: str, ref: str, what: str) -> dict[str, Any]:
    """A secret that holds a JSON object (a key file), or a SecretReferenceError that says which."""
    from skyvm.connectors import refs

    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise refs.SecretReferenceError(where, ref, f"does not hold JSON; it should hold {what}") from None
    if not isinstance(data, dict):
        raise refs.SecretReferenceError(where, ref, f"holds JSON that is not an object; it should hold {what}")
    register_key_file(data)
    redact.register(text)
    return data


# The fields of a key file (a service-account key, an authorized_user file) that are secrets.
SECRET_KEYS = ("private_key", "private_key_id", "client_secret", "refresh_token", "access_token", "token")


def register_key_file(data: dict[str, Any]) -> None:
    """Register a key file's secret fields, and the file as a whole as it is serialised."""
    redact.register(*(data.get(k) for k in SECRET_KEYS))
    redact.register(json.dumps(data), json.dumps(data, indent=2))
