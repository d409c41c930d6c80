"""Fault trials: the engine suites' own fixtures (imported from their conftests, not copied), each
trial repeated ``$SKYVM_FAULT_TRIALS`` times (default once), and every trial's outcome appended to
``$SKYVM_FAULT_REPORT`` (JSON lines) for ``python -m bench faults``."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
REPEAT = int(os.environ.get("SKYVM_FAULT_TRIALS") or 1)
REPORT = os.environ.get("SKYVM_FAULT_REPORT")


def _suite_conftest(suite: str):
    """tests/<suite>/conftest.py, loaded under a name of its own (its helpers' modules on the path)."""
    sys.path.insert(0, str(TESTS / suite))
    spec = importlib.util.spec_from_file_location(f"skyvm_{suite}_suite_conftest", TESTS / suite / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def installed(distribution: str) -> bool:
    # By distribution, not module: tests/airflow and tests/prefect are importable namespace packages here.
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# Each engine's environment holds one engine: its suite's fixtures are this suite's there.
if installed("apache-airflow"):
    _airflow = _suite_conftest("airflow")
    airflow_db, dags, warm_image = _airflow.airflow_db, _airflow.dags, _airflow.warm_image
elif installed("prefect"):
    _prefect = _suite_conftest("prefect")
    prefect_api, warm_image = _prefect.prefect_api, _prefect.warm_image


@pytest.fixture(autouse=True)
def fault_round(request):
    """Which repetition of the trial this is (``$SKYVM_FAULT_TRIALS`` of each)."""
    return getattr(request, "param", 0)


def pytest_generate_tests(metafunc):
    if REPEAT > 1 and "fault_round" in metafunc.fixturenames:
        metafunc.parametrize("fault_round", range(REPEAT), indirect=True, ids=lambda i: f"round{i + 1}")


@pytest.fixture
def judge(request):
    """``judge(outcome)``: record what the trial saw and left, and fail when anything was left behind."""

    def check(outcome):
        request.node.fault_outcome = outcome
        assert outcome.left_total == 0, f"left behind: {outcome.left} (observed: {outcome.observed})"
        return outcome

    return check


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    result = yield
    rep = result.get_result()
    # Every trial's call; a setup or teardown only when it failed (the trial could not run, or left a mess).
    if not REPORT or (rep.when != "call" and not rep.failed):
        return
    outcome = getattr(item, "fault_outcome", None)
    params = {k: v for k, v in getattr(getattr(item, "callspec", None), "params", {}).items() if k != "fault_round"}
    trial = item.originalname + (f"[{'-'.join(map(str, params.values()))}]" if params else "")
    record = {
        "trial": trial,
        "nodeid": item.nodeid,
        "phase": rep.when,
        "outcome": rep.outcome,
        "duration_s": round(rep.duration, 3),
        "left": outcome.left if outcome else None,
        "observed": outcome.observed if outcome else None,
        "error": str(rep.longrepr)[-1500:] if rep.failed else None,
    }
    with open(REPORT, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
