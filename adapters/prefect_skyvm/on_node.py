"""What runs on a node for ``SkyVMTaskRunner``: Prefect's own task engine (engine mode), or the task's
function body inside a Prefect logging context (body mode).

Engine mode is what Prefect's ``ProcessPoolTaskRunner`` does in its subprocesses, on another machine:
the flow's serialized context is hydrated, ``run_task_sync``/``run_task_async`` runs the task (states,
retries, logs, artifacts, events and nested submissions as in Prefect), the events and log workers are
flushed, and the final State is the node's return value.

What may not travel in the payload (the API URL, the API key: any setting Prefect keeps as a secret) was
taken out of the serialized settings by the launcher and reaches the node's environment as skyvm secrets;
``_settings_model`` puts them back from there.

Imported on every node whose image has Prefect (the resident agent imports it ahead of the nodes, so a
warm node pays no import): Prefect's task engine at module level, nothing of the launcher's side (no
docker, no skyvm.api/run/pool). May import: the standard library, cloudpickle, Prefect (when installed), skyvm.redact and skyvm.node.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
import pickle
import ssl as _ssl
import typing
from typing import Any, Optional

from prefect_skyvm import relay

try:  # an image without Prefect still runs bodies (body mode)
    from prefect.context import hydrated_context
    from prefect.events.worker import EventsWorker
    from prefect.task_engine import run_task_async, run_task_sync

    from prefect_skyvm.deferred_client import client_context, deferred_client
except ImportError:  # pragma: no cover - exercised by images without Prefect
    hydrated_context = None

# Set by the launcher in an engine-mode task's environment: Prefect's settings come with the run's context.
SETTINGS_FROM_CONTEXT = "SKYVM_PREFECT_SETTINGS_FROM_CONTEXT"

# (path in the serialized settings, environment variable) pairs: the settings that travel as skyvm secrets.
SecretPaths = list[tuple[tuple[str, ...], str]]


def agent_preload() -> None:
    """In a cluster agent's pristine parent (``skyvm.agent``): the work ``hydrated_context`` would do in every
    node before its task runs, once: Prefect's logging configured, its run contexts' models rebuilt."""
    if hydrated_context is None:
        return
    from prefect._internal.result_records import ResultRecordMetadata
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.flows import Flow
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.tasks import Task

    # Prefect's top-level API (``from prefect import get_run_logger``, in most tasks) imports prefect.main, which
    # sets Prefect's logging up again at its import: in a node that would be ~90 ms of CPU, and the console
    # handler put back after the node took it off (each line twice in the task run's logs). Imported here, once.
    import prefect.main  # noqa: F401

    ensure_logging_setup()
    types = dict(Flow=Flow, Task=Task, ResultRecordMetadata=ResultRecordMetadata)
    FlowRunContext.model_rebuild(_types_namespace=types)
    TaskRunContext.model_rebuild(_types_namespace=types)
    # Prefect's models build their validators when first used (defer_build): in every node, its contexts,
    # events, log records and states would be built anew (tens of ms). Built here once, about 0.1 s.
    for model in _deferred_models():
        try:
            model.model_rebuild(force=True)
        except Exception:  # noqa: BLE001 - one that cannot be built yet is built where it is used, as before
            pass
    # The installed collections' block types, which a node's result storage looks up: entry points scanned once.
    from prefect._internal.plugins.collections import load_prefect_collections

    load_prefect_collections()
    _ready_tls_contexts()
    global _AGENT_LOGGING
    from prefect.settings import get_current_settings

    _AGENT_LOGGING = _logging_inputs(get_current_settings())


# What Prefect's logging was configured from in the agent's parent (``_logging_inputs``): a node whose flow
# has other logging settings gets its own (``_logging_as_flows``).
_AGENT_LOGGING: Optional[tuple] = None

# The loggers Prefect's logging configuration (logging.yml) sets to the PREFECT_LOGGING_LEVEL setting.
_LEVEL_LOGGERS = ("prefect", "prefect.extra", "prefect.client", "prefect.infrastructure")
# The environment variables Prefect's setup reads over logging.yml's entries (its top-level sections).
_OVERRIDES = tuple(
    f"PREFECT_LOGGING_{section}"
    for section in ("VERSION", "INCREMENTAL", "DISABLE_EXISTING_LOGGERS", "FORMATTERS_", "FILTERS_", "HANDLERS_", "LOGGERS_", "ROOT_")
)


def _logging_inputs(settings) -> tuple:
    """(the level, everything else Prefect's logging setup reads: the configuration file that exists,
    the internal level, the PREFECT_LOGGING_* overrides of logging.yml in the environment)."""
    path = settings.logging.config_path
    overrides = sorted((k, v) for k, v in os.environ.items() if k.startswith(_OVERRIDES))
    return settings.logging.level, (str(path) if path and path.exists() else None, settings.internal.logging_level, tuple(overrides))


def _logging_as_flows(settings) -> None:
    """Prefect's logging in a node as the flow's settings configure it (``PREFECT_LOGGING_LEVEL=WARNING``
    in the flow's process keeps a task's INFO lines out of the API, as with Prefect's own runners), not as
    the agent's parent configured it from its own environment. A level is set on its loggers (what
    logging.yml sets from it); other differences mean Prefect's whole setup again (about 90 ms)."""
    if settings is None or _AGENT_LOGGING is None or not hasattr(settings, "logging"):
        return
    level, rest = _logging_inputs(settings)
    if rest != _AGENT_LOGGING[1]:
        from prefect.context import SettingsContext
        from prefect.logging.configuration import setup_logging

        with SettingsContext(profile=SettingsContext.get().profile, settings=settings):  # what the setup reads
            setup_logging(incremental=False)
    elif level != _AGENT_LOGGING[0]:
        for name in _LEVEL_LOGGERS:
            logging.getLogger(name).setLevel(level)


def _deferred_models() -> list:
    from pydantic import BaseModel
    from pydantic._internal._mock_val_ser import MockValSer

    found, todo = {}, [BaseModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found[sub] = None
                todo.append(sub)
    return [m for m in found if m.__module__.startswith("prefect") and isinstance(m.__dict__.get("__pydantic_validator__"), MockValSer)]


# TLS contexts made by the agent's parent, each handed to at most one caller in a node (never shared: httpcore
# sets a context's ALPN protocols per connection). Loading the CA bundle into a context is what makes one
# slow (~70 ms of CPU): a node's API client and its events and log workers each make one.
READY_TLS = 3


class _SslWithReadyContexts:
    """``ssl`` as Prefect's client modules see it in an agent's nodes: ``create_default_context(cafile=F)``
    hands out a context the parent made for F (unchanged since) while any is left, and makes one after that."""

    def __init__(self, ready: list) -> None:
        self._ready = ready  # (the CA file's identity, context)

    def __getattr__(self, name: str):
        return getattr(_ssl, name)

    def create_default_context(self, purpose=None, *, cafile=None, capath=None, cadata=None):
        purpose = _ssl.Purpose.SERVER_AUTH if purpose is None else purpose
        if cafile is not None and capath is None and cadata is None and purpose == _ssl.Purpose.SERVER_AUTH:
            wanted = _ca_identity(cafile)
            for i, (made_for, context) in enumerate(self._ready):
                if made_for == wanted:
                    del self._ready[i]
                    return context
        return _ssl.create_default_context(purpose, cafile=cafile, capath=capath, cadata=cadata)


def _ca_identity(cafile: str):
    try:
        real = os.path.realpath(cafile)
        return real, os.stat(real).st_mtime_ns
    except OSError:
        return None


def _ready_tls_contexts() -> None:
    """The contexts a node's clients will ask for: for certifi's bundle (Prefect's default), the system's
    (what ``SSL_CERT_FILE`` or Prefect's ``api.ssl_cert_file`` name on most machines) and the one this
    environment's settings name."""
    import certifi
    import prefect._internal.websockets as websockets_module
    import prefect.client.orchestration as client_module
    from prefect.settings import PREFECT_API_SSL_CERT_FILE

    candidates = [certifi.where(), _ssl.get_default_verify_paths().openssl_cafile, PREFECT_API_SSL_CERT_FILE.value()]
    ready = []
    for identity in dict.fromkeys(_ca_identity(f) for f in candidates if f):
        if identity is not None:
            ready += [(identity, _ssl.create_default_context(cafile=identity[0])) for _ in range(READY_TLS)]
    shim = _SslWithReadyContexts(ready)
    for module in (client_module, websockets_module):
        if getattr(module, "ssl", None) is _ssl:
            module.ssl = shim


def agent_child_env() -> None:
    """In a node the agent forked, once its environment is the node's: Prefect's global settings read again
    (the parent read them from its own environment at import: a flow node's PREFECT_API_URL was not there).
    Not in an engine-mode task's node (about 20 ms of CPU): its settings are the flow's, in its run context."""
    if hydrated_context is None or os.environ.get(SETTINGS_FROM_CONTEXT) == "1":
        return
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()


def run_task(
    *, env: dict[str, str], secret_paths: SecretPaths, context: dict[str, Any], related: Optional[dict[str, Any]] = None, **engine_kwargs: Any
):
    """Run one task with Prefect's engine (``engine_kwargs`` are ``run_task_sync``'s); returns its final State.

    Its events (the task run's own states among them: the API records task runs from them) go as they
    happen, through the launcher's events worker where the launcher reads them live (``relay``), else
    through the node's own, so the UI shows the run while it runs."""
    os.environ.update(env)
    relayed = relay.install()  # events and API logs through the launcher, when it reads them live
    _settings_model(context, secret_paths)
    _logging_as_flows((context.get("settings_context") or {}).get("settings"))
    _quiet_console()  # after any setup above, which puts the console handler back
    _version_checked()
    relay.seed_related(related or {})
    task = engine_kwargs["task"] = _scrubbing(engine_kwargs["task"])
    client = deferred_client(context.get("settings_context"))
    with hydrated_context(context, client=client), client_context(client) if client else contextlib.nullcontext():
        try:
            if task.isasync:
                import asyncio

                return asyncio.run(run_task_async(**engine_kwargs))
            return run_task_sync(**engine_kwargs)
        finally:
            # The node's process ends with the call: what the task logged and emitted must reach the API first
            # (a crash included: the engine has just proposed the Crashed state).
            _flush(relayed)


def _version_checked() -> None:
    """Prefect's clients check the API's version once per process: the flow's process did, against the same
    API and this very Prefect (a node's is pinned to the flow's version), so a node need not ask again."""
    url = os.environ.get("PREFECT_API_URL")
    try:
        import prefect
        from prefect._internal.version_checking import _api_version_check_key, _cache_api_version_check
    except ImportError:
        return  # another Prefect: its clients ask, as before
    if url:
        for form in (url.rstrip("/"), url.rstrip("/") + "/"):  # as given, and as an HTTP client's base URL
            _cache_api_version_check(_api_version_check_key(form, prefect.__version__))


def _scrubbing(task):
    """The task with its function's exceptions redacted in place as they leave it: Prefect's engine, on this
    node, makes the failed (or crashed) state's message, the traceback it logs and the result it persists from
    the exception's text, and sends them to the API itself, where the launcher's redaction never sees them.
    Log records are scrubbed at creation already (the node registered its secrets with ``skyvm.redact``)."""
    from skyvm import redact

    fn = task.fn
    if not redact.known() or inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        return task  # a generator task's values leave it one by one: its exceptions are left as they are
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def scrubbed(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except BaseException as exc:
                _scrub_chain(exc)
                raise

    else:

        @functools.wraps(fn)
        def scrubbed(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except BaseException as exc:
                _scrub_chain(exc)
                raise

    task.fn = scrubbed
    return task


def _scrub_chain(exc: BaseException) -> None:
    from skyvm import redact

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:  # the cause and context Prefect's traceback shows too
        seen.add(id(exc))
        redact.scrub_exception(exc)
        exc = exc.__cause__ or exc.__context__


def run_body(fn, args: tuple, kwargs: dict, context_blob: Optional[bytes]):
    """Body mode: the task's function itself, inside the task run's Prefect context when Prefect is
    installed, so ``get_run_logger()`` works. Its records go to the node's output (never to the API, which
    this node may not reach), which the launcher streams into the task run's logs."""
    if hydrated_context is None or context_blob is None:
        return fn(*args, **kwargs)
    import cloudpickle
    from prefect.client.orchestration import SyncPrefectClient

    context = cloudpickle.loads(context_blob)
    # A client is part of a run context; this one is never used (no API from a body-mode node).
    with hydrated_context(context, client=SyncPrefectClient("http://skyvm-body-mode.invalid/api")):
        return fn(*args, **kwargs)


def _quiet_console() -> None:
    """Prefect's console lines off on the node: its engine sends them to the API itself, and the node's
    output (what the task prints) goes to the task run's logs through the launcher: once each."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in [logging.getLogger(), *(l for l in logging.Logger.manager.loggerDict.values() if isinstance(l, logging.Logger))]:
        for handler in [h for h in logger.handlers if isinstance(h, PrefectConsoleHandler)]:
            logger.removeHandler(handler)


def _settings_model(context: dict[str, Any], secret_paths: SecretPaths) -> None:
    """The flow's settings as a model, the secrets put back from the node's environment.

    ``hydrated_context`` would build them as ``Settings(**dict)``, which reads every settings source
    (environment, profiles, .env, toml) for each of Prefect's ~50 settings models: tens of milliseconds of
    CPU a node, hundreds on a loaded machine, for the same answer each time. So a node validates them once
    per cluster and pickles the model, without its secrets, beside the agent's other files; the nodes after
    it load that (a fraction of a millisecond). The key holds everything the answer depends on: the flow's
    settings, the node's Prefect variables, and Prefect's version."""
    settings_context = context.get("settings_context") or {}
    raw = settings_context.get("settings")
    if not isinstance(raw, dict):
        return
    from prefect.settings import Settings

    # The secrets count too (settings derived from the API's URL, the UI's, are kept): only their digest is in the name.
    key = hashlib.sha256(
        json.dumps(
            [_prefect_version(), raw, sorted((k, v) for k, v in os.environ.items() if k.startswith("PREFECT_"))],
            sort_keys=True, default=repr,
        ).encode()
    ).hexdigest()[:32]
    cached = _settings_cache_dir() / f"{key}.pkl"
    model = None
    try:
        with open(cached, "rb") as fh:
            model = pickle.load(fh)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError):
        pass  # not made yet on this cluster (or unreadable): made below
    if not isinstance(model, Settings):
        model = Settings.model_validate(raw)
        for path, _name in secret_paths:  # the file never holds a secret: each node puts its own back
            model = _replace(model, path, None)
        _write_private(cached, pickle.dumps(model))
    for path, name in secret_paths:
        if os.environ.get(name):
            model = _replace(model, path, os.environ[name])
    settings_context["settings"] = model


def _prefect_version() -> str:
    import prefect

    return prefect.__version__


def _settings_cache_dir():
    """Beside the node runtime's own state on this machine (its attempts' logs and exit codes), private. Not
    under ``tempfile.gettempdir()``: its first call in a process (every node is a fresh one) probes the
    directory with a file written and removed, about half a millisecond of a node's CPU."""
    from skyvm.node import STATE_DIR

    place = STATE_DIR / "prefect-settings"
    place.mkdir(mode=0o700, parents=True, exist_ok=True)
    return place


def _write_private(path, data: bytes) -> None:
    """Written whole or not at all (a node killed mid-write leaves no half file for the next one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only or full /tmp: the next node validates again


def _replace(model, path: tuple[str, ...], value: Any):
    """``model`` with the field at ``path`` (nested settings models) set to ``value``, as its type holds it."""
    name = path[0]
    if len(path) > 1:
        return model.model_copy(update={name: _replace(getattr(model, name), path[1:], value)})
    if value is not None:
        from pydantic import SecretStr

        field = type(model).model_fields.get(name)
        annotation = getattr(field, "annotation", None)
        if annotation is SecretStr or SecretStr in typing.get_args(annotation):
            value = SecretStr(value)
    return model.model_copy(update={name: value})


def _flush(relayed: bool) -> None:
    # Prefect's services (the events worker, the API log worker) share one table of instances: draining
    # through one drains them all. None running: nothing to send, and no client made for nothing.
    with EventsWorker._instance_lock:
        running = bool(EventsWorker._instances)
    if not running:
        return
    quiet = logging.getLogger(EventsWorker.__name__)  # a service's own logger, named for its class
    if relayed:
        # Relayed, its last events are lines still to write, not sends: a drain that finds them warns "Still
        # processing items" on the node's output, once a node, into the task's log. Not a user's concern.
        quiet.setLevel(logging.ERROR)
    EventsWorker.drain_all(timeout=60)
