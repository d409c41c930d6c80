"""A real Prefect API for the whole Prefect suite, as prefect-dask's conftest does."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_api(docker_engine):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session", autouse=True)
def warm_image(docker_engine):
    """Build the node image once up front, so no test's timing includes it."""
    from skyvm.api import node_image
    from skyvm.settings import NodeSettings

    node_image(NodeSettings())
