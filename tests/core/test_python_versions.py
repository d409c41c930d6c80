"""Launchers of Python 3.10 to 3.13: a node's base holds the launcher's minor version, and another is refused at submit.

``./dev test`` runs this file under 3.11 (the core environment) and 3.13 (core313); the bases are
./dev's (``./dev base X.Y``: skyvm-base:py3.11-bookworm and skyvm-base:py3.13-trixie at least).
"""

from __future__ import annotations

import io
import sys
import uuid

import docker
import pytest

from skyvm import InfrastructureError, Run
from skyvm.backends.local import list_managed
from skyvm.images import BASE_REPOSITORY, base_python, build_node_image, default_base_image, launcher_python

pytestmark = pytest.mark.usefixtures("docker_engine")

MINOR = launcher_python()


def node_python():
    import sys

    return list(sys.version_info[:2])


def local_bases() -> dict[str, str]:
    """./dev's bases here: tag -> the Python minor version its tag names."""
    client = docker.from_env()
    return {tag: tag.split(":py", 1)[1].split("-", 1)[0] for image in client.images.list(name=BASE_REPOSITORY) for tag in image.tags}


def other_base() -> str:
    others = sorted(tag for tag, minor in local_bases().items() if minor != MINOR)
    if not others:
        pytest.fail(f"no base of a Python other than {MINOR} here: ./dev test makes them (./dev base 3.11, ./dev base 3.13)")
    return others[0]


def containers_of(run_id):
    return [r for r in list_managed() if r["run_id"] == run_id]


def test_the_launcher_uses_the_base_of_its_python_and_its_node_runs(monkeypatch):
    monkeypatch.delenv("SKYVM_BASE_IMAGE", raising=False)
    base = default_base_image()
    assert base.startswith(f"{BASE_REPOSITORY}:py{MINOR}-"), f"no ./dev base for Python {MINOR}: ./dev base {MINOR}"
    client = docker.from_env()
    assert base_python(client, client.images.get(base)) == MINOR
    with Run({"defaults": {"cpus": 1, "memory": 0.5}}) as run:
        # A closure travels by value (cloudpickle): it loads only on the launcher's minor version.
        offset = sys.version_info.micro
        handle = run.submit(lambda: node_python() + [offset], node="versioned")
        assert handle.result(600) == [sys.version_info.major, sys.version_info.minor, offset]
    # The node image was built on that base: its layers start with the base's.
    node_layers = client.images.get(build_node_image().ref).attrs["RootFS"]["Layers"]
    base_layers = client.images.get(base).attrs["RootFS"]["Layers"]
    assert node_layers[: len(base_layers)] == base_layers


def test_a_base_of_another_python_is_refused_at_submit_naming_both_versions(monkeypatch):
    other = other_base()
    monkeypatch.setenv("SKYVM_BASE_IMAGE", other)
    with Run() as run:
        with pytest.raises(InfrastructureError) as info:
            run.submit(node_python, node="mismatched")
        assert containers_of(run.run_id) == []  # refused before anything started
    text = str(info.value)
    theirs = local_bases()[other]
    assert "node 'mismatched'" in text and repr(other) in text
    assert f"has Python {theirs}" in text and f"this launcher runs Python {MINOR}" in text
    assert f"./dev base {MINOR}" in text and "SKYVM_BASE_IMAGE" in text


def test_a_base_without_the_label_is_asked_its_python_and_refused_the_same(monkeypatch):
    """The label is ./dev's; any other base is asked (``python3`` in a container), once per image id."""
    client = docker.from_env()
    other = other_base()
    tag = f"skyvm-test-unlabelled:{uuid.uuid4().hex[:12]}"
    # An empty label is no label: what any image made elsewhere looks like.
    client.images.build(fileobj=io.BytesIO(f"FROM {other}\nLABEL dev.skyvm.python=\n".encode()), tag=tag, network_mode="host", rm=True)
    try:
        image = client.images.get(tag)
        assert not (image.labels or {}).get("dev.skyvm.python")
        assert base_python(client, image) == local_bases()[other]
        monkeypatch.setenv("SKYVM_BASE_IMAGE", tag)
        with Run() as run, pytest.raises(InfrastructureError, match=rf"'{tag}' has Python {local_bases()[other]}, but this launcher runs Python {MINOR}"):
            run.submit(node_python, node="unlabelled")
    finally:
        client.images.remove(tag, force=True)


def test_a_base_no_one_serves_is_refused_at_submit_naming_the_launchers_python(monkeypatch):
    monkeypatch.setenv("SKYVM_BASE_IMAGE", "python:3.99-slim")
    with Run() as run:
        with pytest.raises(InfrastructureError) as info:
            run.submit(node_python, node="unserved")
        assert containers_of(run.run_id) == []
    text = str(info.value)
    assert "node 'unserved'" in text and f"no base image for this launcher's Python {MINOR}" in text
    assert "'python:3.99-slim' is neither present nor pullable" in text
    assert f"./dev base {MINOR}" in text and "skyvm-base:py" in text  # the local bases, listed
