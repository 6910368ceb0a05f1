"""Fixtures shared by every test: paths, the data directory, and a kit server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real public data sets beside the checkout (../shared/data), or RECSYS_DATA_DIR."""
    path = Path(os.environ.get("RECSYS_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.fail(f"data directory {path} is missing: set RECSYS_DATA_DIR")
    return path
