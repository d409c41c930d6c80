"""Fault trials on the local backend and the SkyPilot stand-in (core environment): each does the
fault for real, checks what the user sees, and fails when anything is left behind."""

from __future__ import annotations

import importlib.util

import pytest

import trials

pytestmark = pytest.mark.usefixtures("docker_engine")


def test_cancel_while_queued_behind_max_clusters(judge):
    out = judge(trials.cancel_while_queued())
    assert out.observed["cancel_s"] <= trials.CANCEL_BOUND_S


def test_sigkill_of_the_launching_process_then_gc(judge):
    judge(trials.sigkill_then_gc())


def test_bucket_unreachable_mid_run_names_the_store(judge):
    judge(trials.bucket_unreachable())


@pytest.fixture(scope="module")
def node_image_ref(docker_engine):
    """skyvm's node image, built once here: both installs of a trial name it, so neither builds."""
    from skyvm.api import node_image
    from skyvm.settings import NodeSettings

    return node_image(NodeSettings())


@pytest.mark.parametrize("down", ["down-true", "down-false"])
def test_two_installs_on_one_engine_never_share_a_cluster(judge, node_image_ref, down):
    out = judge(trials.two_installs(node_image_ref, down=down == "down-true"))
    assert out.observed["a_cluster"] not in (out.observed["b_beside_busy"], out.observed["b_beside_idle"])


@pytest.fixture
def standin(standin_vm):
    if importlib.util.find_spec("sky") is not None:
        pytest.skip("the SkyPilot stand-in is reached from an environment without SkyPilot (the core one)")
    return standin_vm


def test_cancel_while_provisioning_downs_the_half_made_cluster(judge, standin, s3_server, registry):
    out = judge(trials.cancel_while_provisioning(standin.dir, s3_server, registry.model_dump()))
    assert out.observed["downs"] >= 1


def test_skypilot_process_killed_mid_node(judge, standin, s3_server, registry):
    judge(trials.bridge_killed_mid_node(standin.dir, s3_server, registry.model_dump()))


@pytest.fixture(scope="module")
def private_engine(node_image_ref):
    """A Docker engine of these trials' own, with skyvm's node image loaded (built in the shared one)."""
    with trials.private_dockerd(node_image_ref) as engine:
        yield engine, node_image_ref
    assert engine.processes() == 0, "the private dockerd (or its containerd) is still running"


def test_dockerd_restarted_mid_node_then_gc(judge, private_engine):
    engine, image = private_engine
    judge(trials.dockerd_restarted_mid_node(engine, image))
