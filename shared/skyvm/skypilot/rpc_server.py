"""The bridge's RPC server: answers ``SubprocessBridge``'s JSON-lines calls in SkyPilot's environment.

``python -m skyvm.skypilot.bridge --serve`` runs ``main``: the SDK adapter (``sdk.InProcessBridge``)
served by ``serve``, which the tests' stand-ins use too. ``read_log`` is answered by the bridge's
own, or else by ``logs.LogFollowers`` over its ``tail_logs`` and ``jobs_logs``.

May import: the standard library and ``skyvm.skypilot`` (interface, logs, server_guard, sdk).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any, Callable

from skyvm.skypilot.interface import ANSI, CALLS, LOGGING_CALLS
from skyvm.skypilot.logs import LogFollowers
from skyvm.skypilot.server_guard import local_server_guard


def serve(make_bridge: Callable[[], Any]) -> int:
    """Answer calls until stdin closes: one JSON request per line in (``id``, ``call``,
    ``kwargs``), JSON lines out tagged with the request's id (``log``, then ``result`` or
    ``error``). Each call runs in its own thread, so a long ``tail_logs`` blocks nothing.

    Whatever SkyPilot (or a process it starts) prints goes to stderr: the real stdout is kept
    for the protocol alone, so a chatty call can never corrupt an answer.
    """
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out_lock = threading.Lock()

    def send(obj: dict) -> None:
        with out_lock:
            out.write(json.dumps(obj, default=str) + "\n")
            out.flush()

    try:
        bridge, broken = make_bridge(), None
    except Exception as exc:  # noqa: BLE001 - e.g. SkyPilot not importable: every call says so
        bridge, broken = None, f"{type(exc).__name__}: {exc}"
    guard = local_server_guard()
    guard_lock = threading.Lock()
    # A bridge without a read_log of its own (a stand-in) reads through followers of its tail_logs.
    read_log = getattr(bridge, "read_log", None) or (LogFollowers(bridge).read if bridge is not None else None)

    def handle(msg: dict) -> None:
        call_id, name, kwargs = msg.get("id"), msg.get("call"), dict(msg.get("kwargs") or {})
        if broken is not None:
            return send({"id": call_id, "error": broken})
        if name not in CALLS:
            return send({"id": call_id, "error": f"unknown call {name!r}; known: {', '.join(CALLS)}"})
        if name in LOGGING_CALLS:
            kwargs["on_log"] = lambda line: send({"id": call_id, "log": line})
        try:
            if guard is not None and name != "optimize":  # planning asks no server
                with guard_lock:
                    guard.check()
            result = read_log(**kwargs) if name == "read_log" else getattr(bridge, name)(**kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure goes back as an answer
            return send({"id": call_id, "error": ANSI.sub("", f"{type(exc).__name__}: {exc}").strip()})
        send({"id": call_id, "result": result})

    for line in sys.stdin:
        if line.strip():
            threading.Thread(target=handle, args=(json.loads(line),), daemon=True).start()
    # stdin closed: the engine's process is done with SkyPilot (or gone). Calls still in flight
    # have nobody to answer; SkyPilot's API server keeps any request it already accepted.
    out.flush()
    os._exit(0)


def main() -> int:
    if sys.argv[1:] != ["--serve"]:
        print("usage: python -m skyvm.skypilot.bridge --serve   (skyvm's SubprocessBridge runs this)", file=sys.stderr)
        return 2
    from skyvm.skypilot.sdk import InProcessBridge

    return serve(InProcessBridge)
