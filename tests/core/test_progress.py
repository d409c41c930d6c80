"""Progress on long steps: log lines where no one watches a terminal, a rich display where one does.

The lines are what a Prefect or Airflow task's log shows during a first build: asserted by their
words, never their timing (a tiny heartbeat interval makes the every-10-s line appear at once).
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
import uuid

import pytest

from skyvm import progress
from skyvm.errors import InfrastructureError
from skyvm.images import build_node_image, build_wheels, default_base_image, docker_client, pull_image, registry_auth

DONE = re.compile(r": done in \d+(\.\d)?s$|: done in \d+m\d+\.\ds$")


def lines(caplog, logger: str = "skyvm") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith(logger)]


def wait_for(caplog, pattern: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(re.search(pattern, m) for m in lines(caplog)):
        assert time.monotonic() < deadline, f"no log line matching {pattern!r}: {lines(caplog)}"
        time.sleep(0.01)


def test_a_step_logs_its_start_a_heartbeat_with_where_it_is_and_its_end(caplog):
    caplog.set_level(logging.INFO, logger="skyvm")
    with progress.step("copying things", heartbeat_s=0.01, total=4, rich=False) as shown:
        shown.update("the second thing", completed=2)
        wait_for(caplog, r"copying things: still running after .* \(2/4, the second thing\)")
    said = lines(caplog, "skyvm.progress")
    assert said[0] == "copying things: started"
    assert DONE.search(said[-1]) and said[-1].startswith("copying things")


def test_a_failing_step_says_so_and_the_error_goes_on(caplog):
    caplog.set_level(logging.INFO, logger="skyvm")
    named = logging.getLogger("skyvm.caller")
    with pytest.raises(ValueError, match="broken on purpose"):
        with progress.step("a step that breaks", logger=named, rich=False):
            raise ValueError("broken on purpose")
    said = [r.getMessage() for r in caplog.records if r.name == "skyvm.caller"]
    assert said[0] == "a step that breaks: started" and said[-1].startswith("a step that breaks: failed after ")


def test_in_a_terminal_a_rich_display_ends_with_the_outcome_and_time(capsys):
    with progress.step("outer", rich=True):
        with progress.step("inner, nested in the same display", total=3, rich=True) as inner:
            inner.update(completed=3)
    err = capsys.readouterr().err
    assert "outer" in err and "inner, nested in the same display" in err
    assert re.search(r"done in \d", err)


@pytest.mark.usefixtures("docker_engine")
def test_a_first_build_logs_wheels_layers_push_and_pull(caplog, tmp_path, monkeypatch, registry):
    caplog.set_level(logging.INFO, logger="skyvm")
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.2)
    monkeypatch.setenv("SKYVM_PROGRESS", "plain")  # as in a worker, whatever runs the tests
    build_wheels(cache=tmp_path / "wheels")
    said = lines(caplog)
    assert said[0] == "building wheels for the node image: started" and DONE.search(said[-1]), said
    # A base of its own (the usual one with a label): a new image id, so no layer comes from Docker's cache.
    client = docker_client()
    base = f"skyvm-progress-test-base:{uuid.uuid4().hex[:8]}"
    dockerfile = f"FROM {default_base_image()}\nLABEL dev.skyvm.progress-test={base.rsplit(':', 1)[1]}\n".encode()
    client.images.build(fileobj=io.BytesIO(dockerfile), tag=base, rm=True)
    caplog.clear()
    built = None
    try:
        built = build_node_image(base=base, registry=registry)
        said = lines(caplog)
        local = f"skyvm-node:{built.content_hash}"
        assert f"building node image {local} from {base}: started" in said
        assert any(re.match(rf"building node image {local} from {base}: done in ", m) for m in said)
        # Layer by layer, from the build stream: a heartbeat says which Dockerfile step runs.
        assert any(re.search(r"still running after .*step \d+/\d+: ", m) for m in said), said
        assert f"pushing {built.ref}: started" in said and any(m.startswith(f"pushing {built.ref}: done in ") for m in said)
        client.images.remove(built.ref)
        caplog.clear()
        with pytest.raises(InfrastructureError, match=f"pulling {re.escape(built.ref)} failed: .*no basic auth credentials"):
            pull_image(client, built.ref)  # the registry asks for a login
        assert lines(caplog)[-1].startswith(f"pulling {built.ref}: failed after ")
        caplog.clear()
        pull_image(client, built.ref, registry_auth(registry, ("skyvm", os.environ["SKYVM_TEST_REGISTRY_PASSWORD"])))
        said = lines(caplog)
        assert said[0] == f"pulling {built.ref}: started" and said[-1].startswith(f"pulling {built.ref}: done in "), said
    finally:
        for ref in ([built.ref, f"skyvm-node:{built.content_hash}"] if built else []) + [base]:
            try:
                client.images.remove(ref)
            except Exception:  # noqa: BLE001 - already gone
                pass
