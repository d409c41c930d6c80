"""The node image: built from host wheels with pip --no-index, tagged by content, skipped when unchanged, pushed."""

from __future__ import annotations

import subprocess

import pytest

from skyvm.images import build_node_image

pytestmark = pytest.mark.usefixtures("docker_engine")


def run_in(image: str, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", "run", "--rm", "--network", "host", image, *cmd], capture_output=True, text=True, timeout=120)


def test_unchanged_build_is_skipped_and_the_image_runs_the_runtime():
    first = build_node_image()
    again = build_node_image()
    assert again.ref == first.ref and again.content_hash == first.content_hash
    assert again.built is False
    out = run_in(first.ref, "python3", "-m", "skyvm.node", "check")
    assert out.returncode == 0, out.stderr
    assert "node runtime ready" in out.stdout
    # The node's Python matches the host's minor version, so cloudpickled payloads load.
    import sys

    ver = run_in(first.ref, "python3", "-c", "import sys; print(sys.version_info[:2])").stdout.strip()
    assert ver == str(sys.version_info[:2])


def test_requirements_make_another_image_built_offline():
    plain = build_node_image()
    with_six = build_node_image(requirements=["six"])
    assert with_six.ref != plain.ref
    out = run_in(with_six.ref, "python3", "-c", "import six, boto3; print(six.__name__)")
    assert out.returncode == 0 and out.stdout.strip() == "six", out.stderr
    # The container had no index to install from: pip saw only the copied wheels.
    history = subprocess.run(["docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", with_six.ref], capture_output=True, text=True).stdout
    assert "--no-index" in history


def test_push_to_a_registry_with_auth(registry):
    pushed = build_node_image(registry=registry)
    assert pushed.pushed and pushed.ref.startswith(registry.server + "/skyvm-node:")
    import base64
    import json
    import os
    import urllib.request

    repo, _, tag = pushed.ref.partition("/")[2].rpartition(":")
    req = urllib.request.Request(f"http://{registry.server}/v2/{repo}/tags/list")
    token = base64.b64encode(f"skyvm:{os.environ['SKYVM_TEST_REGISTRY_PASSWORD']}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(req) as resp:
        assert tag in json.load(resp)["tags"]


def test_missing_base_image_is_a_clear_error(monkeypatch):
    from skyvm.errors import InfrastructureError

    with pytest.raises(InfrastructureError, match="base image 'skyvm-no-such-base:1' is neither present nor pullable"):
        build_node_image(base="skyvm-no-such-base:1")
