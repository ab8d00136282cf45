"""Shared fixtures: the real H&E test data in ../shared/data (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository; tests that need it skip in a bare clone."""
    if not (SHARED_DATA / "real_he_labeled").is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (../shared is absent in this checkout)")
    return SHARED_DATA
