"""An engine-mode node's Prefect API client, made when the task first uses it.

Why: Prefect's engine puts a sync API client in the task's run contexts before the task starts (one for the
flow run's context, one for the client context), and making one (an httpx client: its URL parsed, its
proxies read from the environment, its transport and TLS set up) is a fifth of a trivial node's CPU in a
fresh process. A task's states and logs travel as events and records (``relay``), so most tasks never call
the API; one that does (``Variable.get``, an artifact, a nested task's result) gets the same client Prefect's
``get_client(sync_client=True)`` would have made, at that moment.

May import: prefect and the standard library (this module is imported on the node).
"""

from __future__ import annotations

import threading
from typing import Any, Optional

from prefect.client.orchestration import SyncPrefectClient
from prefect.context import SyncClientContext
from prefect.settings import get_current_settings


class DeferredSyncClient(SyncPrefectClient):
    """A ``SyncPrefectClient`` whose construction waits for the first attribute it lacks: any method that
    reaches the client's state makes it then, with the arguments ``get_client`` would have used. Entering it
    and its once-per-process version check (answered from the cache already, see ``on_node``) wait too."""

    def __init__(self, arguments: dict[str, Any]) -> None:  # noqa: D107 - Prefect's __init__ runs on first use
        self._deferred: Optional[dict[str, Any]] = arguments
        self._deferred_lock = threading.Lock()
        self._deferred_entered = 0
        self._deferred_check = False

    def __getattr__(self, name: str) -> Any:
        # Only for an attribute the instance lacks: Prefect's __init__ has not run yet.
        if name.startswith("_deferred") or self.__dict__.get("_deferred") is None:
            raise AttributeError(name)
        self._deferred_make()
        return object.__getattribute__(self, name)

    def _deferred_make(self) -> None:
        with self._deferred_lock:
            arguments, self._deferred = self._deferred, None
            if arguments is None:
                return  # another thread made it first
            SyncPrefectClient.__init__(self, **arguments)
            for _ in range(self._deferred_entered):  # entered as often as it was while deferred
                SyncPrefectClient.__enter__(self)
            if self._deferred_check:
                SyncPrefectClient.raise_for_api_version_mismatch_once(self)

    def __enter__(self) -> "DeferredSyncClient":
        if self._deferred is not None:
            self._deferred_entered += 1
            return self
        return SyncPrefectClient.__enter__(self)

    def __exit__(self, *exc_info: Any) -> None:
        if self._deferred is not None:
            self._deferred_entered -= 1
            return None
        return SyncPrefectClient.__exit__(self, *exc_info)

    def raise_for_api_version_mismatch_once(self) -> None:
        if self._deferred is not None:
            self._deferred_check = True
            return
        SyncPrefectClient.raise_for_api_version_mismatch_once(self)


def deferred_client(settings_context: Optional[dict[str, Any]]) -> Optional[DeferredSyncClient]:
    """A deferred client for the run's settings, or None where Prefect would not make a plain one (no API
    URL: it starts a temporary server instead). Read from the settings model itself: entering a settings
    context for three values validates the whole context, a few milliseconds a node."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY, PREFECT_API_URL, Settings

    settings = (settings_context or {}).get("settings")
    if not isinstance(settings, Settings):
        settings = get_current_settings()
    api = PREFECT_API_URL.value_from(settings)
    if not api:
        return None
    return DeferredSyncClient(
        dict(api=api, auth_string=PREFECT_API_AUTH_STRING.value_from(settings), api_key=PREFECT_API_KEY.value_from(settings))
    )


def client_context(client: DeferredSyncClient) -> SyncClientContext:
    """The client context the engine enters (``SyncClientContext.get_or_create``), holding ``client``:
    its own constructor would make a client at once."""
    return SyncClientContext.model_construct(client=client)

