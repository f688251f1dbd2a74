"""The stages on a real distributed engine: a Spark standalone cluster (a master and two
workers, each its own JVM, started from the pyspark package on 127.0.0.1), where executors
share no Python process and no files with the driver but what Spark ships them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pyspark
import pytest

from pipelines.table import EmbeddingTable

REPO = Path(__file__).resolve().parent.parent
SPARK_CLASS = Path(pyspark.__file__).parent / "bin" / "spark-class"
WORKERS = 2

pytestmark = pytest.mark.cluster


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


@pytest.mark.slow
def test_embed_on_the_cluster_writes_the_table_local_mode_writes(
    standalone_cluster, embedded_pipeline, tmp_path
):
    """`prodvec embed` against the cluster (the model folder shipped as an archive each
    executor unpacks) into a new table: every clean product, with the embeddings local mode
    committed."""
    config, results = embedded_pipeline
    table = tmp_path / "table"
    command = [
        sys.executable, "-m", "pipelines.cli", "embed",
        f"workdir={config.workdir}",
        "catalog.synthetic.rows=2000",
        f"spark.master={standalone_cluster}",
        "spark.shuffle_partitions=2",
        f"embed.table_path={table}",
    ]  # fmt: skip
    run = subprocess.run(
        command, check=False, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-4000:]
    on_cluster = EmbeddingTable(table).snapshot()
    local = EmbeddingTable.from_config(config)
    assert on_cluster.rows == results["embed"].rows["table"]

    def by_id(files: tuple[str, ...]) -> dict[str, np.ndarray]:
        rows = pq.read_table(list(files), columns=["product_id", "embedding"]).to_pylist()
        return {row["product_id"]: np.asarray(row["embedding"]) for row in rows}

    cluster_rows, local_rows = by_id(on_cluster.files), by_id(local.snapshot().files)
    assert cluster_rows.keys() == local_rows.keys()
    assert all(np.allclose(cluster_rows[key], local_rows[key], atol=1e-5) for key in local_rows)
