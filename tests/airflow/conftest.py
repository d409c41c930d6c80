"""A throwaway AIRFLOW_HOME with a migrated SQLite metadata DB, shared by the Airflow suite."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Airflow reads its configuration when first imported: set it up before that.
_HOME = Path(tempfile.mkdtemp(prefix="skyvm-airflow-home-"))
os.environ["AIRFLOW_HOME"] = str(_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
DAGS = Path(__file__).resolve().parent / "dags"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS)
os.environ["SKYVM_CONFIG"] = str(DAGS / "skyvm.yaml")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def airflow_db(docker_engine):
    out = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], capture_output=True, text=True, env=os.environ.copy())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    yield _HOME


@pytest.fixture(scope="session")
def dags(airflow_db):
    """The test DAG file, imported as Airflow would."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("skyvm_test_dags", DAGS / "skyvm_test_dags.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["skyvm_test_dags"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def warm_image(docker_engine):
    """Build the node image once up front, so no test's timing includes it."""
    from skyvm.api import node_image
    from skyvm.settings import NodeSettings

    node_image(NodeSettings())
