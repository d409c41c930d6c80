"""What an engine-mode node no longer makes anew, each checked against what it replaces:

- the flow's serialized context: the settings part made once per process, the result store's once per flow
  run (``engine_mode._serialize_context``), equal to Prefect's own ``serialize_context()``;
- the flow's settings on the node: validated once per cluster, the nodes after it load them, secrets never
  in the file (``on_node._settings_model``);
- TLS contexts: made by the agent's parent, each handed out once (``on_node._SslWithReadyContexts``);
- events and API log records: relayed through the launcher's workers (``relay``), as Prefect's process pool
  relays its subprocesses'.
"""

from __future__ import annotations

import os
import uuid

import pytest
from prefect import flow, tags, task

from prefect_skyvm import engine_mode, on_node, relay
from skyvm.node import RELAY_MARK


@task
def _inside(x):
    from prefect.context import serialize_context

    return serialize_context(), engine_mode._serialize_context({}, None)


def test_the_serialized_context_is_prefects_own():
    @flow
    def f():
        with tags("skyvm-test"):
            return _inside(3)

    prefects, ours = f()
    assert ours == prefects
    assert ours["settings_context"]["settings"]  # the part made once: there, and whole


def test_the_settings_part_is_made_once_per_process_not_once_per_flow_run(monkeypatch):
    from prefect.context import SettingsContext

    calls = []
    real = SettingsContext.serialize
    monkeypatch.setattr(SettingsContext, "serialize", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))

    @flow
    def f():
        return engine_mode._serialize_context({}, None)  # a runner's cache of its own, as each flow run has

    first = f()
    made = len(calls)
    second = f()
    assert len(calls) == made  # the second flow run's nodes got what the first one made
    assert second["settings_context"] == first["settings_context"] and second["settings_context"]["settings"]


def test_a_copy_per_call_so_one_node_editing_its_context_leaves_the_next_ones_alone():
    cache: dict = {}

    @flow
    def f():
        first = engine_mode._serialize_context(cache, None)
        first["settings_context"]["settings"]["api"] = {"url": "edited"}
        return engine_mode._serialize_context(cache, None)

    assert f()["settings_context"]["settings"].get("api") != {"url": "edited"}


def test_the_settings_are_validated_once_and_loaded_after_without_their_secrets(tmp_path, monkeypatch):
    from prefect.context import SettingsContext
    from prefect.settings import Settings

    import skyvm.node

    monkeypatch.setattr(skyvm.node, "STATE_DIR", tmp_path)  # the node runtime's state: the cache sits beside it
    key = f"pnu_{uuid.uuid4().hex}"
    secret_paths = [(("api", "url"), "PREFECT_API_URL"), (("api", "key"), "PREFECT_API_KEY")]
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4999/api")
    monkeypatch.setenv("PREFECT_API_KEY", key)
    raw = SettingsContext.get().serialize()["settings"]
    raw.get("api", {}).pop("url", None)
    raw.get("api", {}).pop("key", None)

    def node() -> Settings:
        context = {"settings_context": {"settings": __import__("copy").deepcopy(raw)}}
        on_node._settings_model(context, secret_paths)
        return context["settings_context"]["settings"]

    first = node()
    (cached,) = list(tmp_path.glob("prefect-settings/*.pkl"))
    assert oct(cached.stat().st_mode & 0o777) == "0o600"
    assert oct(cached.parent.stat().st_mode & 0o777) == "0o700"
    assert key.encode() not in cached.read_bytes()
    second = node()
    assert second.api.key.get_secret_value() == key and str(second.api.url) == "http://127.0.0.1:4999/api"
    assert second == first == Settings(**raw)  # as hydrated_context would have made them
    assert len(list(tmp_path.glob("prefect-settings/*.pkl"))) == 1  # loaded, not made again

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:5000/api")  # another API: another answer
    assert str(node().api.url) == "http://127.0.0.1:5000/api"
    assert str(node().ui_url) == "http://127.0.0.1:5000"


def test_ready_tls_contexts_are_handed_out_once_each_and_then_made_as_usual(monkeypatch):
    import ssl

    import certifi
    import prefect.client.orchestration as client_module

    monkeypatch.setattr(client_module, "ssl", ssl)
    on_node._ready_tls_contexts()
    shim = client_module.ssl
    assert isinstance(shim, on_node._SslWithReadyContexts)
    ready = {id(context) for _identity, context in shim._ready}
    handed = [shim.create_default_context(cafile=certifi.where()) for _ in range(on_node.READY_TLS + 1)]
    assert len({id(c) for c in handed}) == len(handed)  # never the same one twice
    assert sum(id(c) in ready for c in handed) == on_node.READY_TLS  # the ready ones first, then a new one
    assert all(c.verify_mode == ssl.CERT_REQUIRED and c.check_hostname for c in handed)
    assert shim.PROTOCOL_TLS_CLIENT == ssl.PROTOCOL_TLS_CLIENT  # the rest of ssl as it is


def test_relayed_events_and_logs_reach_this_process_workers(capfd, monkeypatch):
    from prefect.events import Event
    from prefect.events.clients import AssertingEventsClient
    from prefect.events.worker import EventsWorker
    from prefect.logging import handlers

    # The node's side writes its records as lines on fd 1 (here captured, on a node the agent's pipe).
    monkeypatch.setenv(relay.ENV, "1")
    monkeypatch.setenv("SKYVM_AGENT_CHILD", "1")
    try:
        assert relay.install()
        event = Event(event="skyvm.test.relayed", resource={"prefect.resource.id": f"skyvm.test.{uuid.uuid4().hex}"})
        EventsWorker.instance().send(event)
        EventsWorker.drain_all()  # as the node does before it ends
        handlers.emit_api_log({"name": "prefect.task_runs", "level": 20, "message": "from the node", "timestamp": "2026-12-03T00:00:00Z"})
    finally:
        EventsWorker.set_client_override(None)
        handlers.set_api_log_sink(None)
    lines = capfd.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith(RELAY_MARK) for line in lines)

    # The launcher's side hands them to its own workers.
    sent_logs = []
    monkeypatch.setattr(handlers.APILogWorker, "instance", classmethod(lambda cls, *a: type("W", (), {"send": lambda self, item: sent_logs.append(item)})()))
    EventsWorker.set_client_override(AssertingEventsClient)
    try:
        deliver = relay.Deliverer("n")
        assert all(deliver(line) for line in lines)
        assert not deliver("an ordinary line")
        EventsWorker.drain_all()
        assert [e.id for e in AssertingEventsClient.last.events] == [event.id]
    finally:
        EventsWorker.set_client_override(None)
    assert [log["message"] for log in sent_logs] == ["from the node"]


def test_relay_is_off_outside_an_agents_node(monkeypatch):
    monkeypatch.setenv(relay.ENV, "1")
    monkeypatch.delenv("SKYVM_AGENT_CHILD", raising=False)
    assert not relay.install()  # an exec'd node: its output may be read only at its end, so it sends itself
