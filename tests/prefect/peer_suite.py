"""What the ports of prefect-dask's and prefect-ray's task-runner suites share (issue 19).

Both modules run their flows on one settings dict, so they share its warm clusters
(``down: false``: a cluster outlives the flow run that started it and the next flow run of the
same signature takes it); ``warm_clusters_removed`` removes them once the session is over.

Holds: ``SETTINGS``, ``runner``, ``warm_clusters_removed``, ``sleep_task``.
May import: pytest, prefect, prefect_skyvm, skyvm's local backend (gc).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from prefect import task

from prefect_skyvm import SkyVMTaskRunner
from skyvm.backends.local import gc

SETTINGS = {"defaults": {"cpus": 0.5, "memory": 0.5, "down": False, "prefect_engine": True, "labels": {"suite": "prefect-peer-suites"}}}


def runner(**overrides: Any) -> SkyVMTaskRunner:
    """A runner on the shared settings (upstream's ``DaskTaskRunner()`` / ``RayTaskRunner()``)."""
    return SkyVMTaskRunner(SETTINGS, **overrides)


@pytest.fixture(scope="session", autouse=True)
def warm_clusters_removed(docker_engine):
    """After the session's last flow: the warm clusters these suites kept go (no run owns them then)."""
    yield
    gc()


@task
def sleep_task(seconds):
    """Both suites' test_as_completed_yields_correct_order sleep in it (prefect-ray's calls it task_a)."""
    time.sleep(seconds)
    return seconds
