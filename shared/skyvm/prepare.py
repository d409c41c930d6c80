"""Preparing a node, on the launching host, before any backend is asked: submit -> prepare -> pool.

Holds: which backend runs a node (``backend_for``), what a backend refuses up front
(``check_launchable``), secret resolution, the node's payload store and its minted
store credentials, the node image (through the context's cache), attempt ids, and
``prepare()``, which stores the payload and plans the node into a ``TaskSpec``.

May import: skyvm.context, skyvm.images (when asked for), skyvm.plan, skyvm.payloads, skyvm.settings, skyvm.errors,
skyvm.redact, skyvm.connectors, and (when asked for) the backends. Never the handle, Run or api.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import uuid
from typing import Optional

from skyvm import redact
from skyvm.connectors.base import DEFAULT_NODE_TTL_S
from skyvm.context import Context, builds_image, current
from skyvm.errors import InfrastructureError, SettingsError, SkyVMError
from skyvm.payloads import content_key, open_store
from skyvm.plan import TaskSpec, plan_node
from skyvm.settings import NodeSettings

log = logging.getLogger("skyvm")

# A backend's name (NodeRef.backend) -> the ``backend`` setting that reaches it. The local backend is
# Docker, or plain processes on a host without an engine: both are "local".
BACKEND_SETTING = {"local": "local", "local-process": "local", "skypilot": "skypilot"}


def backend_for(settings: NodeSettings, name: Optional[str] = None):
    """The backend that runs nodes of these settings, or, given ``name`` (a ``NodeRef.backend``: a node
    found again), the one that launched it, whatever ``settings.backend`` says."""
    kind = settings.backend if name is None else BACKEND_SETTING.get(name)
    if kind == "local":
        from skyvm.backends.local import local_backend

        return local_backend()
    if kind == "skypilot":
        from skyvm.backends.skypilot import skypilot_backend

        return skypilot_backend(settings if settings.backend == "skypilot" else settings.model_copy(update={"backend": "skypilot"}))
    what = f"backend name {name!r}" if name is not None else f"backend {settings.backend!r}"
    raise SettingsError([("backend", f"unknown {what}: accepted are {', '.join(BACKEND_SETTING)}")])


def check_launchable(node: str, settings: NodeSettings) -> None:
    """Refuse, before any image build or upload, a node its backend could not run.

    Settings validate one file; what a backend needs (a VM reaches no local
    directory and no local image) is checked here, where the backend is known,
    and so is the node image's base: its Python must be the launcher's.
    """
    if settings.backend == "skypilot":
        from skyvm.backends.skypilot import missing_for_vms

        problems = missing_for_vms(settings)
        if problems:
            raise SettingsError([(f"nodes.{node}.{field}", msg) for field, msg in problems], source=f"node '{node}'")
    if builds_image(settings) and getattr(backend_for(settings), "needs_image", True):
        from skyvm.images import check_launcher_base

        try:
            check_launcher_base()
        except InfrastructureError as exc:
            raise InfrastructureError(f"node '{node}': {exc}") from None


def resolve_secret(name: str, value: str) -> str:
    """A reference (``env:VAR``, ``file:PATH``, ``airflow:CONN_ID``, ``prefect:secret/NAME``) is read
    in the launching process; anything else is the value itself. Either way it is redacted from now on."""
    from skyvm.connectors import refs

    if refs.is_reference(value):
        try:
            return refs.resolve(value, f"secrets.{name}")
        except SkyVMError as exc:
            raise InfrastructureError(f"secret {name}: {exc}") from None
    redact.register(value)
    return value


def node_store(settings: NodeSettings, node: str):
    """The node's payload store, opened on this host with its connector's credentials: (store, connector)."""
    from skyvm import connectors

    conn = connectors.for_store(settings, settings.payload_store)
    options = conn.renewing_fs_options(settings.payload_store, settings.payload_store_endpoint) if conn else None
    return open_store(settings.payload_store, settings.payload_store_endpoint, storage_options=options, node=node), conn


def node_image(settings: NodeSettings) -> str:
    """The image a node runs in (the current context's cache): ``image`` as given, else skyvm's node image."""
    return current().node_image(settings)


def new_attempt_id(node: str) -> str:
    """Unique per attempt; safe in file names and object keys."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", node[:40]) + "-" + uuid.uuid4().hex[:12]


def _registry_prefix(settings: NodeSettings) -> str:
    """Images under this prefix come from the node's registry (and need its login)."""
    return settings.registry.server.rstrip("/") + "/" if settings.registry else "\0"


def prepare(run_id: str, node: str, attempt_id: str, s: NodeSettings, payload: bytes, backend, ctx: Optional[Context] = None) -> tuple:
    """Store the payload and plan the node: (store, TaskSpec). Secrets are resolved here, on the launching host."""
    from skyvm import connectors

    store, conn = node_store(s, node)
    pending = store if len(payload) <= backend.inline_limit(store) else None
    # A small payload goes inline where it can (a warm cluster's agent): no store round trip; stored only if the backend must.
    payload_url = store.url_for(content_key(payload)) if pending is not None else store.put_payload(payload)
    result_url = store.url_for(f"results/{attempt_id}")
    envs: dict[str, str] = {}
    secrets: dict[str, str] = {}
    if conn is not None:
        # The node's own short-lived credentials, scoped to this store: never the launcher's keys.
        ttl = max(DEFAULT_NODE_TTL_S, int((s.timeout or 0) + 600))
        access = conn.node_store_access(store.url, node=node, ttl_s=ttl, endpoint=s.payload_store_endpoint)
        envs.update(access.envs)
        secrets.update(access.secrets)
        log.debug("node %s reaches %s with %s", node, store.url, access.scope)
    secrets.update({name: resolve_secret(name, value) for name, value in s.secrets.items()})
    settings = s.model_copy(update={"envs": {**envs, **s.envs}})
    # Plain processes run the host's own Python: no image to build.
    image = (ctx or current()).node_image(s) if getattr(backend, "needs_image", True) else "host-python"
    spec: TaskSpec = plan_node(
        settings,
        node=node,
        run_id=run_id,
        attempt_id=attempt_id,
        payload_url=payload_url,
        result_url=result_url,
        image=image,
        secrets=secrets,
        # Minted now, for this attempt: every launch and every exec logs in with a fresh token.
        registry_auth=connectors.registry_login(s, s.registry) if image.startswith(_registry_prefix(s)) else None,
        payload=payload,
    )
    return store, dataclasses.replace(spec, pending_store=pending)
