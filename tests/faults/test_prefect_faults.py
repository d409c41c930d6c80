"""Fault trials of the Prefect adapter (prefect environment), against the suite's real Prefect API."""

from __future__ import annotations

import pytest

pytest.importorskip("prefect_skyvm")
pytest.importorskip("prefect.deployments")

import trials  # noqa: E402


def test_flow_run_cancelled_through_the_api_while_a_task_runs(judge):
    out = judge(trials.prefect_flow_run_cancelled_through_the_api())
    assert out.observed["state"].startswith("CANCELLED")
