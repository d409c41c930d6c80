"""Where a task's Prefect engine runs, and what travels for it: the launcher's side of engine mode.

The rule (``prefect_engine``, a node setting; Airflow ignores it):

- ``false``: body mode. Prefect's task engine runs in the flow's process and only the function body
  runs on the node (no route to the API needed, no Prefect needed in the image).
- unset with a user's ``image:``: body mode (skyvm cannot add Prefect to an image it did not build);
  ``true`` says the image has Prefect at the flow's version.
- unset or ``true``: engine mode when the node can reach the flow's Prefect API, which is when
  the node runs on the local backend (containers on the host's network: a loopback URL, the ephemeral
  server included, is reached as it is), or the API's URL is not a loopback one (``localhost``,
  ``127.0.0.0/8``, ``::1``; no URL means Prefect's ephemeral server, on loopback).
- The skypilot backend with a loopback API: unset falls back to body mode with an info line on the flow
  run's log; ``true`` is engine mode, the node reaching the API through a reverse forward over its
  cluster's SSH connection (the agent's; the cluster's first node goes through it too), or, with agents
  off (``SKYVM_AGENT=0``), a ``SettingsError`` at ``.submit()``.

Engine mode ships what Prefect's ``ProcessPoolTaskRunner`` hands its subprocesses: the task, its
parameters with futures replaced by their final States (the node's engine resolves them, NotReady
on a failed upstream included), ``wait_for`` as States, the flow's serialized context with the flow's
task runner replaced by a ``ThreadPoolTaskRunner`` (nested submissions run on the same node), and
Prefect's settings as environment variables. The API's URL and Prefect's secret settings (the API
key) never travel in the payload: they go to the node as skyvm secrets (``on_node`` puts them back).

Holds ``use_engine``, ``flow_travels``, ``engine_settings``, ``engine_call``, ``body_context`` and ``record_state``.
May import: prefect, skyvm.settings, skyvm.errors and skyvm.skypilot.agent_setup (whether agents are on), prefect_skyvm.flow_node (the node's Prefect
pins, the environment split), prefect_skyvm.on_node and prefect_skyvm.relay (what the node is told).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import uuid
from typing import Any, Iterable, Optional
from urllib.parse import urlsplit

from prefect_skyvm import relay
from prefect_skyvm.on_node import SETTINGS_FROM_CONTEXT
from prefect_skyvm.flow_node import node_requirements, split_env
from skyvm.errors import SettingsError
from skyvm.skypilot.agent_setup import agents_enabled
from skyvm.settings import NodeSettings

log = logging.getLogger("prefect_skyvm")


def api_url() -> Optional[str]:
    """The API the flow talks to: its client's (the ephemeral server's, when that is what runs), else the setting."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL

    ctx = FlowRunContext.get()
    client_url = getattr(getattr(ctx, "client", None), "api_url", None)
    return str(client_url) if client_url else PREFECT_API_URL.value()


def _is_loopback(url: Optional[str]) -> bool:
    host = urlsplit(url).hostname if url else None
    if host is None or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def use_engine(node: str, settings: NodeSettings, logger=None) -> bool:
    """Engine mode or body mode for one task (the rule in the module's docstring)."""
    if settings.prefect_engine is False:
        return False
    if settings.image and settings.prefect_engine is None:
        # A user's image is run as it is: skyvm cannot add Prefect to it, so the engine stays here unless
        # prefect_engine: true says the image has Prefect at the flow's version.
        return False
    url = api_url()
    if settings.backend == "local" or not _is_loopback(url):
        return True
    if settings.prefect_engine and agents_enabled():
        # The cluster's agent is reached over SSH, and the API's loopback URL is forwarded over that
        # connection (the cluster's first node included): the node reaches it with no public address.
        return True
    if settings.prefect_engine:
        raise SettingsError(
            [(
                f"nodes.{node}.prefect_engine",
                f"true, but a {settings.backend} node cannot reach the flow's Prefect API at {url or 'the ephemeral server (loopback)'} "
                "with agents off (SKYVM_AGENT=0: no SSH forward to it): turn agents on, "
                "set PREFECT_API_URL to an API the VM can reach (Prefect Cloud, a server on a public or VPN address), "
                "or set prefect_engine: false to run Prefect's engine in the flow's process and only the function body on the node",
            )],
            source=f"task '{node}'",
        )
    (logger or log).info(
        "skyvm: %s runs in body mode (Prefect's engine in this process, the function on the node): a %s node cannot reach "
        "the Prefect API at %s by itself; set prefect_engine: true to reach it through the cluster's SSH connection, "
        "PREFECT_API_URL to an address the VM reaches, or prefect_engine: false to silence this",
        node, settings.backend, url or "the ephemeral server (loopback)",
    )
    return False


def _per_settings() -> tuple[list[tuple[tuple[str, ...], str]], dict[str, str]]:
    """(where the secret settings sit, Prefect's settings as environment variables) of the current
    settings, made once per settings object (as ProcessPoolTaskRunner keeps its environment)."""
    from prefect.settings.context import get_current_settings

    current = get_current_settings()
    return _kept("settings", current, lambda: (_secret_paths(), current.to_environment_variables(exclude_unset=True)))


# What is made from Prefect's settings, kept across the flow runs of this process: its settings objects
# are the same from one flow run to the next (a new one only under ``temporary_settings``), and making
# these is tens of milliseconds of CPU each on an idle machine, ahead of a flow run's first node.
_SETTINGS_MADE: dict = {}
_SETTINGS_KEPT = 8
_SETTINGS_LOCK = threading.RLock()  # the flow's tasks are launched from many threads: each made once (a making may use another)


def _kept(kind: str, obj: Any, make):
    """``make()``, once per (kind, object) in this process; the object is kept with its answer, so its id
    is not reused while the answer is. At most ``_SETTINGS_KEPT`` objects (the oldest dropped first)."""
    key = (kind, id(obj))
    with _SETTINGS_LOCK:
        found = _SETTINGS_MADE.get(key)
        if found is None:
            found = _SETTINGS_MADE[key] = (obj, make())
            while len(_SETTINGS_MADE) > _SETTINGS_KEPT:
                del _SETTINGS_MADE[next(iter(_SETTINGS_MADE))]
        return found[1]


def _secret_paths() -> list[tuple[tuple[str, ...], str]]:
    """Where Prefect's secret settings (SecretStr) and the API URL sit in the serialized settings."""
    from pydantic import SecretBytes, SecretStr

    found = [(("api", "url"), "PREFECT_API_URL")]

    def walk(value: Any, path: tuple[str, ...]) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*path, key))
        elif isinstance(value, (SecretStr, SecretBytes)):
            found.append((path, "PREFECT_" + "_".join(path).upper()))

    from prefect.context import SettingsContext

    walk(SettingsContext.get().serialize(include_secrets=False)["settings"], ())
    return found


def _pop(settings: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path[:-1]:
        settings = settings.get(key) or {}
    return settings.pop(path[-1], None) if isinstance(settings, dict) else None


class _Pickled:
    """An object pickled once, that unpickles as the object itself (``pickle.loads`` of its bytes).

    The flow in every node's context: pickling it by value (its function, its module's code) is most of the
    cost of a node's payload in the flow's process, about half a millisecond a task, for the same bytes each
    time. Made once per flow (``_node_flow``): globals of the flow's own module travel as they were then."""

    __slots__ = ("blob",)

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def __reduce__(self):
        import pickle

        return pickle.loads, (self.blob,)


def _node_flow(cache: dict, flow) -> _Pickled:
    """The flow as a node's context holds it, pickled once per flow: a copy whose task runner is a thread pool."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from skyvm.calls import dumps, ship_by_value

    key = ("flow", id(flow))
    if key not in cache:
        ship_by_value(flow.fn)
        # The user modules of the functions it names go by value too (``dumps``): it is pickled before any of its
        # tasks is submitted.
        cache[key] = (flow, _Pickled(dumps(flow.with_options(task_runner=ThreadPoolTaskRunner()))))
    return cache[key][1]


def flow_travels(cache: dict, logger=None) -> bool:
    """Whether the flow can travel in a node's context (engine mode needs it there); checked once per flow.

    A flow that cannot be pickled (a lock, a client or an open file in its closure: a flow defined inside a
    function that made one) runs its tasks in body mode instead, which needs only the task, and says so."""
    from prefect.context import FlowRunContext

    flow = getattr(FlowRunContext.get(), "flow", None)
    if flow is None:
        return True
    key = ("travels", id(flow))
    if key not in cache:
        try:
            _node_flow(cache, flow)
            cache[key] = (flow, True)
        except Exception as exc:  # noqa: BLE001 - whatever pickling raises, the answer is the same
            cache[key] = (flow, False)
            (logger or log).info(
                "skyvm: the tasks of flow %r run in body mode (Prefect's engine in this process, the function on the node): "
                "the flow cannot travel to a node in its run's context (%s: %s); create what its closure holds inside it",
                flow.name, type(exc).__name__, exc,
            )
    return cache[key][1]


def _serialize_context(cache: dict, asset_ctx_kwargs: Optional[dict[str, Any]], settings_part: Optional[dict] = None) -> dict[str, Any]:
    """Prefect's ``serialize_context()``, with the settings' part made once per settings context:
    serializing Prefect's settings (every secret rendered) is most of its cost, tens of milliseconds a task
    on an idle machine, and they do not change within a flow run. Each call gets its own copy (callers
    edit it), unless ``settings_part`` stands for it (``_node_settings``: shared, never edited). The rest
    is Prefect's function as it stands (3.x)."""
    import copy

    from prefect import context as pc

    if not all(hasattr(pc, name) for name in ("_deployment_id", "_deployment_parameters", "EngineContext", "AssetContext")):
        return pc.serialize_context(asset_ctx_kwargs=asset_ctx_kwargs)  # another Prefect: its own function, whole
    if settings_part is None:
        settings_part = copy.deepcopy(_serialized_settings(pc.SettingsContext.get()))
    flow_run_context = pc.EngineContext.get()
    task_run_context = pc.TaskRunContext.get()
    tags_context = pc.TagsContext.get()
    deployment_id = pc._deployment_id.get()
    return {
        "flow_run_context": _engine_context(cache, flow_run_context) if flow_run_context else {},
        "task_run_context": task_run_context.serialize() if task_run_context else {},
        "tags_context": tags_context.serialize() if tags_context else {},
        "settings_context": settings_part,
        "asset_context": pc.AssetContext.from_task_and_inputs(**asset_ctx_kwargs).serialize() if asset_ctx_kwargs else {},
        "deployment_id": str(deployment_id) if deployment_id else None,
        "deployment_parameters": pc._deployment_parameters.get(),
    }


def _serialized_settings(settings_context) -> dict[str, Any]:
    """``SettingsContext.serialize()``, made once per settings context (callers copy before they edit)."""
    return _kept("settings_context", settings_context, lambda: settings_context.serialize() if settings_context else {})


def _node_settings() -> tuple[dict[str, Any], list, dict[str, str]]:
    """(the serialized settings context a node's context holds, where its secret settings were, their values
    by environment variable), made once per settings context. The secrets taken out once, not in a copy per
    node: a deep copy of Prefect's settings is about a millisecond and a half of the flow's CPU a task, more
    than the rest of the context together. Shared by every node's payload: pickled as it is, never edited."""
    import copy

    from prefect.context import SettingsContext

    settings_context = SettingsContext.get()

    def make() -> tuple[dict[str, Any], list, dict[str, str]]:
        part = copy.deepcopy(_serialized_settings(settings_context))
        settings = part.get("settings")
        paths = _per_settings()[0] if settings is not None else []
        taken = {name: str(value) for path, name in paths if (value := _pop(settings, path))}
        return part, paths, taken

    return _kept("node_settings", settings_context, make)


def _engine_context(cache: dict, ctx) -> dict[str, Any]:
    """``EngineContext.serialize()`` (3.x), its result store's part made once per flow run: dumping the
    store's block renders its JSON schema, about a millisecond a task, for the same answer each time."""
    fields = {"flow_run", "flow", "parameters", "log_prints", "start_time", "input_keyset", "persist_result"}
    serialized = ctx.model_dump(include=fields, exclude_unset=True, context={"include_secrets": True})
    store = ctx.result_store
    if store:
        key = ("result_store", id(store))
        if key not in cache:  # the store is kept with its answer: its id is not reused while it is
            cache[key] = (store, store.model_dump(serialize_as_any=True, exclude_unset=True, context={"include_secrets": True}))
        serialized["result_store"] = cache[key][1]
    return serialized


def _node_context(cache: dict, secrets: Optional[dict[str, str]] = None, asset_ctx_kwargs: Optional[dict[str, Any]] = None) -> tuple[dict[str, Any], list]:
    """(the flow's serialized context for a node, where its secret settings were): the flow's task
    runner a thread pool, the secret settings taken out (into ``secrets`` when given)."""
    # The asset context (as prefect-dask makes it): the task's upstream assets from the flow's record, and,
    # made here in the flow's process, its own assets recorded there for the tasks downstream of it.
    settings_part, paths, taken = _node_settings()
    context = _serialize_context(cache, asset_ctx_kwargs, settings_part)
    context["settings_context"] = settings_part  # another Prefect's own serialize_context() put the secrets in its copy
    flow_ctx = context.get("flow_run_context") or {}
    if flow_ctx.get("flow") is not None:
        flow_ctx["flow"] = _node_flow(cache, flow_ctx["flow"])
    if secrets is not None:
        secrets.update(taken)
    if secrets is not None and "PREFECT_API_URL" not in secrets and api_url():
        secrets["PREFECT_API_URL"] = api_url()  # the ephemeral server's: the setting is unset
    return context, paths


def engine_settings(settings: NodeSettings, secrets: dict[str, str]) -> NodeSettings:
    """The node's settings in engine mode: Prefect at the flow's version in its image, the API's secrets."""
    # A flow run on a node (the worker's) runs in an image that has Prefect at its version already, and its
    # task nodes run in that very image (SKYVM_NODE_IMAGE): nothing to add, nothing to build there.
    inherited = bool(os.environ.get("SKYVM_NODE_IMAGE"))
    extra = [] if inherited else [r for r in node_requirements() if r not in settings.requirements]
    return settings.model_copy(
        update={
            "requirements": [*settings.requirements, *extra],
            "secrets": {**settings.secrets, **secrets},
            # In the node's process from its start: the agent's child reads it before the task's call.
            "envs": {**settings.envs, SETTINGS_FROM_CONTEXT: "1"},
        }
    )


def engine_call(task, task_run_id: uuid.UUID, parameters: dict[str, Any], wait_for: Optional[Iterable], dependencies, cache: dict):
    """(kwargs of ``on_node.run_task``, secrets for the node) of one task; waits for its upstream futures."""
    from prefect.futures import PrefectFuture, wait
    from prefect.utilities.collections import visit_collection

    from skyvm.calls import ship_by_value

    wait_for_states = None
    if wait_for:
        futures = list(wait_for)
        wait(futures)
        wait_for_states = [f.state for f in futures]

    def to_state(expr: Any) -> Any:
        if isinstance(expr, PrefectFuture):
            expr.wait()
            return expr.state
        return expr

    states = {k: visit_collection(v, visit_fn=to_state, return_data=True) for k, v in parameters.items()}
    secrets: dict[str, str] = {}
    from prefect.utilities.engine import collect_task_run_inputs_sync

    # The task's inputs as its engine sees them (the futures among its parameters), for its upstream assets.
    task_inputs = {name: collect_task_run_inputs_sync(value) for name, value in parameters.items()}
    for name, inputs in (dependencies or {}).items():
        task_inputs.setdefault(name, set()).update(inputs)
    assets = {"task": task, "task_run_id": task_run_id, "task_inputs": task_inputs, "copy_to_child_ctx": True}
    context, secret_paths = _node_context(cache, secrets, asset_ctx_kwargs=assets)
    env = _per_settings()[1] | {k: v for k, v in os.environ.items() if k.startswith("PREFECT_")}
    plain_env, secret_env = split_env(env)
    if relay.available():
        plain_env[relay.ENV] = "1"  # this process reads the node's output live for its relayed records
    secrets.update(secret_env)
    ship_by_value(task.fn)
    kwargs = dict(
        task=task, task_run_id=task_run_id, parameters=states, wait_for=wait_for_states, return_type="state",
        dependencies=dependencies, context=context, env=plain_env, secret_paths=secret_paths,
        related=relay.related_objects(cache),
    )
    return kwargs, secrets


def body_context(cache: dict, task) -> Optional[bytes]:
    """The task run's context for a body-mode node with Prefect (``on_node.run_body``), pickled apart so a
    node without Prefect never unpickles it: no API (logs to the node's output), no secrets. The task in
    it is the user's ``task``, not the copy that launches the node (that one holds the live run)."""
    import cloudpickle

    try:
        context, _ = _node_context(cache)  # the flow in it is pickled here, once
        if context.get("task_run_context"):
            context["task_run_context"]["task"] = task
        settings_context = context.get("settings_context") or {}
        if settings_context.get("settings") is not None:  # shared with other nodes' contexts: edited in a copy
            settings = _with(settings_context["settings"], ("logging", "to_api", "enabled"), False)
            context["settings_context"] = {**settings_context, "settings": _with(settings, ("server", "ephemeral", "enabled"), False)}
        return cloudpickle.dumps(context)
    except Exception as exc:  # noqa: BLE001 - a flow holding what cannot travel (a lock in its closure)
        # The body still runs, without the run's context (get_run_logger() then fails on the node, as before).
        log.debug("the task run's context cannot travel to the node (%s): the body runs without it", exc)
        return None


def _with(settings: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A copy of ``settings`` with the value at ``path`` set, the dicts along the path copied, the rest shared."""
    child = settings.get(path[0])
    rest = _with(child if isinstance(child, dict) else {}, path[1:], value) if len(path) > 1 else value
    return {**settings, path[0]: rest}


def record_state(task, task_run_id: uuid.UUID, state, logger=None) -> None:
    """The final state of a task run whose node did not report one (it never ran, or died): set in the
    API too (forced), the task run made with it when its node never got to create it. Best effort: the
    flow goes on with the state either way, a failure to record it is a warning."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    try:
        with get_client(sync_client=True) as client:
            try:
                current = client.read_task_run(task_run_id)
            except ObjectNotFound:
                ctx = FlowRunContext.get()
                flow_run_id = ctx.flow_run.id if ctx and ctx.flow_run else None
                try:
                    client.create_task_run(task, flow_run_id, dynamic_key=str(task_run_id), id=task_run_id, name=task.name, state=state)
                    return
                except PrefectHTTPStatusError as exc:
                    if exc.response.status_code != 409:
                        raise
                    current = None  # its node's engine reported it meanwhile
            if current is None or current.state is None or current.state.type != state.type:
                client.set_task_run_state(task_run_id, state, force=True)
    except Exception as exc:  # noqa: BLE001 - the API being unreachable must not hide the task's own outcome
        (logger or log).warning("skyvm: could not record task run %s as %s in the Prefect API: %s", task_run_id, state.type.value, exc)
