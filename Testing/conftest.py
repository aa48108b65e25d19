"""Shared fixtures: the real data in ../shared/data (a test that needs it fails when it is missing)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real public test cases; missing data is a failure, never a skip."""
    if not (SHARED_DATA / "MANIFEST.md").is_file():
        pytest.fail(f"real test data not found at {SHARED_DATA}: it must sit beside the repository as ../shared/data")
    return SHARED_DATA
