"""The stages on a real distributed engine: a Spark standalone cluster (a master and two
workers, each its own JVM, started from the pyspark package on 127.0.0.1), where executors
share no Python process and no files with the driver but what Spark ships them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.table import EmbeddingTable

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.cluster


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
