"""Shared fixtures: ONE local[2] SparkSession for the whole test session
(start-up costs 10-40 s), and a scratch workdir per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.config import SparkConfig
from pipelines.spark import get_spark

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("PRODVEC_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def spark():
    session = get_spark(SparkConfig(master="local[2]", shuffle_partitions=4, driver_memory="2g"))
    yield session
    session.stop()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; tests that need it skip, saying so, when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared catalogs not found at {SHARED_DATA} (set PRODVEC_DATA)")
    return SHARED_DATA
