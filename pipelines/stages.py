"""The stage registry and the runner that wraps every stage in its MLflow run.

Data flows one way: clean -> corpus -> shard -> train -> embed -> evaluate. Each
stage module exposes `run(spark, config) -> StageResult` and is imported only when
it runs, so a stage's heavy imports (torch, gensim) stay out of the others.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlflow
from pyspark.sql import SparkSession

from pipelines import tracking
from pipelines.config import Config
from pipelines.errors import StageNotBuilt
from pipelines.spark import get_spark

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageResult:
    """What a stage reports: row counts, where its outputs are, extra metrics."""

    rows: dict[str, int]
    outputs: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str
    purpose: str
    module: str | None  # None until the stage is built

    def load(self) -> Callable[[SparkSession, Config], StageResult]:
        if self.module is None:
            raise StageNotBuilt(f"stage '{self.name}' ({self.purpose}) is not built yet")
        return importlib.import_module(self.module).run


STAGES: tuple[Stage, ...] = (
    Stage("clean", "read catalogs, normalise, quarantine bad rows", "pipelines.clean"),
    Stage("corpus", "title corpus, Spark-counted vocabulary, word2vec", "pipelines.corpus"),
    Stage("shard", "tokenised, labelled, split Parquet training shards", "pipelines.shard"),
    Stage("train", "MRNet / master model, data-parallel from Spark", "pipelines.train"),
    Stage("embed", "distributed inference into a versioned Delta table", "pipelines.embed"),
    Stage("evaluate", "probes, retrieval recall, indexes, drift", None),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage {name!r}; stages are {', '.join(STAGE_NAMES)}")


def run_stage(name: str, config: Config, spark: SparkSession | None = None) -> StageResult:
    """Run one stage inside its own MLflow run (nested under a pipeline run if open)."""
    stage_fn = get_stage(name).load()
    spark = spark or get_spark(config.spark)
    log.info("stage %s: resolved config (hash %s)\n%s", name, config.digest(), config.to_yaml())
    started = time.perf_counter()
    with tracking.stage_run(config, name):
        result = stage_fn(spark, config)
        seconds = time.perf_counter() - started
        mlflow.log_metrics({f"rows_{key}": value for key, value in result.rows.items()})
        mlflow.log_metrics({**result.metrics, "seconds": seconds})
        mlflow.log_dict(result.outputs, "outputs.json")
    log.info("stage %s done in %.1f s: %s", name, seconds, result.rows)
    return result


def run_pipeline(config: Config, spark: SparkSession | None = None) -> dict[str, StageResult]:
    """Run every built stage in order under one parent MLflow run."""
    spark = spark or get_spark(config.spark)
    tracking.configure(config)
    results: dict[str, StageResult] = {}
    with mlflow.start_run(run_name=f"pipeline-{config.catalog.name}"):
        mlflow.set_tags({"prodvec.stage": "pipeline", "prodvec.catalog": config.catalog.name})
        for stage in STAGES:
            if stage.module is None:
                continue
            results[stage.name] = run_stage(stage.name, config, spark)
    return results


def summary(config: Config, results: dict[str, StageResult]) -> str:
    """The end-of-run report: rows per stage, outputs, what is not built, the MLflow UI."""
    lines = [f"prodvec run on catalog '{config.catalog.name}' (config {config.digest()})"]
    for name, result in results.items():
        rows = ", ".join(f"{key}={value:,}" for key, value in result.rows.items())
        lines.append(f"  {name:<9} {rows}")
        lines.extend(f"  {'':<9} {key}: {path}" for key, path in result.outputs.items())
    missing = [stage.name for stage in STAGES if stage.module is None]
    if missing:
        lines.append(f"  not built yet: {', '.join(missing)}")
    lines.append(
        f"  MLflow UI: mlflow ui --backend-store-uri {tracking.tracking_uri(config)}"
        + (
            f" --default-artifact-root {tracking.artifact_location(config)}"
            if tracking.artifact_location(config)
            else ""
        )
    )
    return "\n".join(lines)
