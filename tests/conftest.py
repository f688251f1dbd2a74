"""Shared fixtures: ONE local SparkSession for the whole test session
(start-up costs 10-40 s), and a scratch workdir per test."""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyspark
import pytest

from pipelines.core.config import Config, SparkConfig
from pipelines.core.spark import get_spark

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("PRODVEC_DATA", REPO.parent / "shared" / "data"))


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the whole embedded pipeline run (directly or through another
    fixture) is an end-to-end test: the `slow` tier. For `pytest -n 2 --dist loadgroup`
    (`make test-fast`), the tests of one module and the users of one session-wide pipeline
    fixture stay in one worker, so each module and pipeline fixture is built once."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "embedded_pipeline" in fixtures:
            item.add_marker(pytest.mark.slow)
        shared = [name for name in PIPELINE_FIXTURES if name in fixtures]
        item.add_marker(pytest.mark.xdist_group(shared[0] if shared else item.path.stem))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move what collection imported (torch, MLflow, scikit-learn, pyspark: a few million
    objects) out of the collector's reach: the full collections that MLflow, pyspark and
    pytest's own end-of-session check run then scan only what the tests made."""
    gc.freeze()


# Many small jobs, each with its own generated code: the client compiler alone, the serial
# collector and a code cache that is never swept cost about half the JVM CPU of the server
# defaults that suit one long production job (sweeping alone recompiled a third of it).
TEST_JVM_OPTIONS = (
    "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC "
    "-XX:ReservedCodeCacheSize=512m -XX:-UseCodeCacheFlushing"
)


def local_master() -> str:
    """`local[N]` with this process's share of the cores (cores / `pytest -n` workers), at
    most the 2 the suite's partition counts were written for: `local[2]` for `make test`,
    `local[1]` in each of `make test-fast`'s two workers on 2 cores, where two `local[2]`
    sessions spent about a tenth of the tier's time contending for them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return f"local[{max(1, min(2, (os.cpu_count() or 1) // workers))}]"


@pytest.fixture(scope="session")
def spark():
    session = get_spark(
        SparkConfig(
            master=local_master(),
            shuffle_partitions=2,
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
def small_shards(spark, tmp_path_factory) -> Config:
    """An 800-row synthetic catalog through clean, corpus and shard, for the training and
    similarity tests: every task kind of conf/base.yaml, 16-d word vectors, and small row
    groups so two ranks get even shares. Tests read it and write their runs elsewhere."""
    from pipelines.core.config import load_config
    from pipelines.stages.registry import run_stage

    config = load_config(
        overrides=[
            f"workdir={tmp_path_factory.mktemp('small-shards')}",
            "catalog.synthetic.rows=800",
            "word2vec.epochs=2",
            "word2vec.min_count=2",
            "word2vec.dims=16",
            "shard.row_group_rows=64",
            "shard.text_fields={title: 16}",
            "shard.subwords.width=96",
            "train.embedding_size=16",
            "train.batch_size=32",
            "train.epochs=3",
            "train.lr=0.01",
            "train.threads_per_process=1",
            "train.distributed=false",
            "train.calibration_batches=5",
        ]
    )
    for name in ("clean", "corpus", "shard"):
        run_stage(name, config, spark)
    return config


# Session fixtures that run stages: their users share one xdist worker.
PIPELINE_FIXTURES = ("embedded_pipeline", "small_shards")


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


SPARK_CLASS = Path(pyspark.__file__).parent / "bin" / "spark-class"
WORKERS = 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _alive_workers(ui_port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=2) as page:
            return int(json.load(page).get("aliveworkers", 0))
    except OSError:
        return 0


@pytest.fixture(scope="module")
def standalone_cluster(tmp_path_factory) -> Iterator[str]:
    """`spark://127.0.0.1:<port>`: a master and two one-core workers, stopped afterwards."""
    root = tmp_path_factory.mktemp("standalone")
    port, ui_port = _free_port(), _free_port()
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOG_DIR": str(root)}
    daemon = "org.apache.spark.deploy"
    commands = [
        [f"{daemon}.master.Master", "--host", "127.0.0.1", "--port", str(port),
         "--webui-port", str(ui_port)],
        *[
            [f"{daemon}.worker.Worker", "--host", "127.0.0.1", "--cores", "1", "--memory", "2g",
             "--webui-port", str(_free_port()), "--work-dir", str(root / f"worker{i}"),
             f"spark://127.0.0.1:{port}"]
            for i in range(WORKERS)
        ],
    ]  # fmt: skip
    processes = []
    try:
        for i, command in enumerate(commands):
            with (root / f"daemon{i}.log").open("w") as log:
                processes.append(
                    subprocess.Popen([str(SPARK_CLASS), *command], env=env, stdout=log, stderr=log)
                )
        deadline = time.monotonic() + 120
        while _alive_workers(ui_port) < WORKERS:
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                logs = "\n".join(p.read_text()[-2000:] for p in root.glob("daemon*.log"))
                pytest.fail(f"the standalone cluster did not come up:\n{logs}")
            time.sleep(1)
        yield f"spark://127.0.0.1:{port}"
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
