"""``skyvm check``: prove, before any launch, that every credential the settings use works.

For each connector (and each cloud a node names without one, through its
implicit method): who the credentials say we are. For each payload store: a
probe object written, read back and deleted, and a node's scoped credentials
minted. For each registry: a login. When SkyPilot is there: its own cloud
check, in the SkyPilot process a node's connectors would use. Every line is
redacted; a failure says what to fix.

Holds the checks (``run_checks``: one Row per connector, store, registry and SkyPilot check) and their
table (``format_rows``). May import: skyvm.settings, connectors, redact, tables; lazily the parts a check
exercises (payload stores, images, the SkyPilot backend and bridge).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Callable, Optional

from skyvm import connectors, redact, tables
from skyvm.settings import NodeSettings, SkyVMConfig

OK, FAIL, SKIP = "OK", "FAIL", "SKIP"


@dataclass
class Row:
    check: str
    target: str
    result: str
    detail: str

    def as_dict(self) -> dict:
        return {"check": self.check, "target": self.target, "result": self.result, "detail": redact.redact(self.detail)}


def _attempt(check: str, target: str, fn: Callable[[], str]) -> Row:
    try:
        return Row(check, target, OK, fn())
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row; the run goes on
        return Row(check, target, FAIL, f"{type(exc).__name__}: {exc}")


def selected_settings(config: SkyVMConfig, profile: Optional[str] = None, node: Optional[str] = None) -> list[tuple[str, NodeSettings]]:
    """The settings to check: one node, one profile, or the defaults, every profile and every node."""
    if node:
        return [(f"nodes.{node}", config.resolve(node, profile=profile))]
    if profile:
        return [(f"profiles.{profile}", config.resolve("skyvm-check", profile=profile))]
    out = [("defaults", config.resolve("skyvm-check"))]
    out += [(f"profiles.{p}", config.resolve("skyvm-check", profile=p)) for p in config.profiles]
    out += [(f"nodes.{n}", config.resolve(n)) for n in config.nodes]
    return out


def _store_probe(settings: NodeSettings) -> Callable[[], str]:
    def probe() -> str:
        from skyvm.api import node_store

        store, conn = node_store(settings, "skyvm-check")
        key = f"skyvm-check/{uuid.uuid4().hex}"
        data = b"skyvm check probe"
        store.put(key, data)
        try:
            if store.get(key) != data:
                raise RuntimeError(f"read back something else than was written to {store.url_for(key)}")
        finally:
            store.delete(key)
        detail = "wrote, read and deleted a probe object"
        if conn is not None:
            access = conn.node_store_access(store.url, node="skyvm-check", ttl_s=900, endpoint=settings.payload_store_endpoint)
            detail += f"; nodes get {access.scope or 'scoped credentials'}"
        return detail

    return probe


def _registry_login(settings: NodeSettings) -> Callable[[], str]:
    def login() -> str:
        registry = settings.registry
        auth = connectors.registry_login(settings, registry)
        if auth is None:
            return "no credentials configured: anonymous pulls only"
        user, password = auth
        try:
            from skyvm.images import docker_client

            client = docker_client()
        except Exception:  # noqa: BLE001 - no engine here: ask the registry itself
            return _http_login(registry.server, user, password)
        try:
            client.login(username=user, password=password, registry=registry.server, reauth=True)
        except Exception as exc:  # noqa: BLE001
            raise RuntimeError(f"login to {registry.server} as {user} refused ({redact.redact(str(exc))}); fix the registry password or its connector") from None
        return f"logged in as {user}"

    return login


def _http_login(server: str, user: str, password: str) -> str:
    import requests  # the same HTTP client as the connectors (REQUESTS_CA_BUNDLE and proxies apply)

    scheme = "http" if server.startswith(("127.", "localhost")) else "https"
    answer = requests.get(f"{scheme}://{server}/v2/", auth=(user, password), timeout=10)
    if answer.status_code >= 400:
        raise RuntimeError(f"{server} answered {answer.status_code} to {user}'s credentials; fix the registry password or its connector")
    return f"basic auth accepted for {user} (no Docker engine here to log in with)"


def _skypilot(settings: NodeSettings, clouds: list[str]) -> Callable[[], str]:
    def sky_check() -> str:
        from skyvm.backends.registry import skypilot_bridge

        enabled = skypilot_bridge(settings).check(clouds or None)
        missing = [c for c in clouds if c not in enabled]
        if missing:
            raise RuntimeError(f"SkyPilot cannot use {', '.join(missing)} with these credentials (enabled: {', '.join(enabled) or 'none'}); see `sky check -v`")
        return "enabled: " + ", ".join(f"{c} ({'/'.join(caps)})" for c, caps in sorted(enabled.items()))

    return sky_check


def _skypilot_available() -> bool:
    from skyvm.skypilot.bridge import sky_importable, skypilot_python

    return sky_importable() or skypilot_python() is not None


def run_checks(config: SkyVMConfig, profile: Optional[str] = None, node: Optional[str] = None, skypilot: Optional[bool] = None) -> list[Row]:
    rows: list[Row] = []
    seen: set = set()
    selection = selected_settings(config, profile, node)

    def once(key, make: Callable[[], Row]) -> None:
        if key not in seen:
            seen.add(key)
            rows.append(make())

    for _where, s in selection:
        for conn in connectors.node_connectors(s):
            once(("connector", conn.name), lambda conn=conn: _attempt("connector", f"{conn.name} ({conn.type}/{conn.method})", conn.identity))
        cloud = s.effective_cloud
        if cloud and s.backend == "skypilot" and not any(c.type == cloud for c in connectors.node_connectors(s)):
            conn = connectors.implicit(cloud)
            once(("connector", f"implicit-{cloud}"), lambda conn=conn, cloud=cloud: _attempt("connector", f"{cloud} (implicit)", conn.identity))
        if s.payload_store and "://" in s.payload_store and not s.payload_store.startswith("file://"):
            key = ("store", s.payload_store, s.payload_store_endpoint, s.payload_store_connector, tuple(s.connector_names))
            once(key, lambda s=s: _attempt("store", s.payload_store, _store_probe(s)))
        if s.registry is not None:
            once(("registry", s.registry), lambda s=s: _attempt("registry", s.registry.server, _registry_login(s)))
    if skypilot is not False:
        sky_nodes = [s for _w, s in selection if s.backend == "skypilot"]
        if sky_nodes and not _skypilot_available():
            rows.append(Row("skypilot", "sky check", SKIP, "SkyPilot is not installed here: `skyvm skypilot install` (or pip install 'skyvm[skypilot]')"))
        elif sky_nodes:
            from skyvm.skypilot.credentials import credential_set

            for s in sky_nodes:
                creds = credential_set(s)
                clouds = sorted({c.type for c in connectors.node_connectors(s)} | ({s.effective_cloud} if s.effective_cloud else set()))
                target = "sky check " + (f"with {', '.join(creds.names)}" if creds else "(SkyPilot's own credentials)")
                once(("skypilot", creds.key if creds else None, tuple(clouds)), lambda s=s, clouds=clouds, target=target: _attempt("skypilot", target, _skypilot(s, clouds)))
    return rows


def format_rows(rows: list[Row]) -> str:
    if not rows:
        return "nothing to check: the settings use no connector, remote store, registry or cloud"
    return redact.redact(tables.render([r.as_dict() for r in rows], ["check", "target", "result", "detail"]))
