"""SkyPilot suite: catalogs kept in the repo (a subset of SkyPilot's public catalog, see catalog/README.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

CATALOG = Path(__file__).resolve().parent / "catalog"


@pytest.fixture(scope="session")
def catalog_dir() -> str:
    return str(CATALOG)
