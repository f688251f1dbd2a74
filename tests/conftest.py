"""Shared fixtures: ONE local[2] SparkSession for the whole test session
(start-up costs 10-40 s), and a scratch workdir per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.core.config import SparkConfig
from pipelines.core.spark import get_spark

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("PRODVEC_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the whole embedded pipeline run (directly or through another
    fixture) is an end-to-end test: the `slow` tier."""
    for item in items:
        if "embedded_pipeline" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


# Many small jobs: the client compiler alone and the serial collector cost a third less JVM
# CPU than the server defaults that suit one long production job.
TEST_JVM_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"


@pytest.fixture(scope="session")
def spark():
    session = get_spark(
        SparkConfig(
            master="local[2]",
            shuffle_partitions=4,
            driver_memory="2g",
            conf={"spark.driver.extraJavaOptions": TEST_JVM_OPTIONS},
        )
    )
    yield session
    session.stop()


@pytest.fixture(scope="session")
def shared_tracking(tmp_path_factory) -> str:
    """A `tracking.uri=` override naming one sqlite store for the tests that never read their
    MLflow runs back: a new store runs MLflow's schema migrations, about a second each."""
    return f"tracking.uri=sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; tests that need it skip, saying so, when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared catalogs not found at {SHARED_DATA} (set PRODVEC_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def embedded_pipeline(spark, tmp_path_factory):
    """clean -> corpus -> shard -> train -> embed once on a 2,000-product synthetic catalog,
    for the stages downstream of the embedding table: (config, {stage: StageResult}).
    Read it, never write into it: every test of the session shares it."""
    from pipelines.core.config import load_config
    from pipelines.stages.registry import run_stage

    workdir = tmp_path_factory.mktemp("pipeline")
    config = load_config(
        overrides=[
            f"workdir={workdir}",
            "catalog.synthetic.rows=2000",
            "spark.shuffle_partitions=2",
            "train.epochs=2",
            "word2vec.epochs=3",
        ]
    )
    results = {
        name: run_stage(name, config, spark)
        for name in ("clean", "corpus", "shard", "train", "embed")
    }
    return config, results
