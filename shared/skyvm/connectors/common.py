"""What the connectors share: SDK calls, small HTTP, key files.

Kept out of :mod:`skyvm.connectors.base` so that module stays the interface;
everything here is a plain helper with no SDK import (``requests`` is imported when first used).

May import: skyvm.redact, skyvm.connectors.base and skyvm.connectors.refs.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
from typing import Any, Callable, Optional, Union

from skyvm import redact
from skyvm.connectors import refs
from skyvm.connectors.base import ConnectorError, require

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
    """One HTTP call answered with JSON; an error status or an unreachable host is a ConnectorError.

    Through requests, as the clouds' SDKs call (so REQUESTS_CA_BUNDLE and proxies apply alike)."""
    requests = require("requests", "clouds", label)
    try:
        resp = requests.request(
            "POST" if form is not None else method, url, data=form, headers={"Accept": "application/json", **(headers or {})}, timeout=timeout
        )
    except requests.RequestException as exc:
        reason = _short(redact.redact(str(exc)), 300)
        raise ConnectorError(f"{label}: {what} failed: cannot reach {_origin(url)} ({reason}); check the network and the endpoint") from None
    if resp.status_code >= 400:
        detail = redact.redact(resp.text)
        raise ConnectorError(f"{label}: {what} failed: HTTP {resp.status_code} from {_origin(url)}: {_short(detail, 300)}; {hint}")
    try:
        return json.loads(resp.content or b"{}")
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
