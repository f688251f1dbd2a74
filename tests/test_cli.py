"""The `prodvec` command line as a user runs it: exit codes, one-line errors, the run summary."""

from __future__ import annotations

import logging

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.analysis.retrieval import list_vectors
from pipelines.cli import main
from pipelines.core.config import load_config
from pipelines.data.synthetic import generate_catalog
from pipelines.stages.registry import STAGES
from pipelines.table import EmbeddingTable


def test_config_command_prints_resolved_yaml(capsys):
    assert main(["config", "seed=5"]) == 0
    out = capsys.readouterr().out
    assert "seed: 5" in out and "catalog:" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["config", "clean.nope=1"], "unknown key 'clean.nope'"),
        (["config", "--conf", "nope"], "no overlay named 'nope'"),
    ],
)
def test_expected_failures_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_run_executes_built_stages_and_summarises(spark, tmp_path, capsys):
    argv = [
        "run",
        f"workdir={tmp_path}",
        "catalog.synthetic.rows=400",
        "spark.shuffle_partitions=2",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "prodvec run on catalog 'synthetic'" in out
    assert "clean" in out and "MLflow UI: mlflow ui --backend-store-uri sqlite:///" in out
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["prodvec"], output_format="list")
    parents = [run for run in runs if run.data.tags.get("prodvec.stage") == "pipeline"]
    children = [
        run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    ]
    assert len(parents) == 1
    # Optional stages are off by default: skipped, listed as such, no MLflow run.
    assert "skipped (disabled): image_features (image_features.enabled=false)" in out
    built = [stage.name for stage in STAGES if stage.enabled_by is None]
    assert sorted(run.data.tags["prodvec.stage"] for run in children) == sorted(built)
    clean_run = next(run for run in children if run.data.tags["prodvec.stage"] == "clean")
    assert clean_run.data.metrics["rows_in"] == 400
    assert clean_run.data.params["catalog.synthetic.rows"] == "400"


@pytest.mark.slow
def test_a_catalog_of_ids_and_titles_runs_the_whole_pipeline(spark, tmp_path, capsys, caplog):
    """Issue 18: an overlay that maps only product_id and title runs on the defaults. Tasks
    and probes whose source the catalog lacks are left out, saying so, and the split falls
    back to unstratified; every clean product gets a unit-length embedding."""
    products = generate_catalog(rows=400, seed=3, dirty_fraction=0.0)
    catalog = tmp_path / "titles.csv"
    products[["sku", "name"]].rename(columns={"sku": "id"}).to_csv(catalog, index=False)
    overlay = tmp_path / "titles_only.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {"catalog": {"name": "titles_only", "format": "csv", "path": str(catalog),
                         "columns": {"product_id": "id", "title": "name"}}}
        )
    )  # fmt: skip
    argv = ["run", "--conf", str(overlay), f"workdir={tmp_path / 'work'}",
            "spark.shuffle_partitions=2", "train.epochs=2"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    logged = caplog.text
    assert "does not map the source of category (category_path)" in logged
    assert "the stratification task subcategory is left out" in logged
    config = load_config([str(overlay)], [f"workdir={tmp_path / 'work'}"])
    clean = pq.read_table(config.outputs.clean_catalog, columns=["product_id"])
    table = EmbeddingTable.from_config(config).snapshot()
    embeddings = pa.concat_tables(
        pq.read_table(path, columns=["product_id", "embedding"]) for path in table.files
    )
    assert sorted(embeddings.column("product_id").to_pylist()) == sorted(
        clean.column("product_id").to_pylist()
    )
    vectors = list_vectors(embeddings.column("embedding"), "the embedding table")
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert "titles_only" in capsys.readouterr().out
