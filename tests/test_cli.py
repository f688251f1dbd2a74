"""The `prodvec` command line as a user runs it: exit codes, one-line errors, the run summary."""

from __future__ import annotations

import mlflow
import pytest

from pipelines.cli import main
from pipelines.stages.registry import STAGES


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
