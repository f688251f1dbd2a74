"""The stage registry and the runner that wraps every stage in its MLflow run.

Data flows one way: clean -> [image_features] -> corpus -> shard -> train -> embed ->
[cross_locale] -> index -> evaluate. Each stage module exposes `run(spark, config) ->
StageResult` and is imported only when it runs, so a stage's heavy imports (torch, gensim)
stay out of the others. An optional stage (`enabled_by` names its switch) runs only when its
config enables it.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlflow
from pyspark.sql import SparkSession

from pipelines.core import tracking
from pipelines.core.config import Config
from pipelines.core.outputs import StageResult
from pipelines.core.spark import get_spark

__all__ = ["STAGES", "STAGE_NAMES", "Stage", "get_stage", "run_pipeline", "run_stage", "summary"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    purpose: str
    module: str  # imported only when the stage runs
    enabled_by: str | None = None  # optional stages: the boolean config key that turns it on

    def enabled(self, config: Config) -> bool:
        """False only for an optional stage whose switch is off."""
        if self.enabled_by is None:
            return True
        value: object = config
        for key in self.enabled_by.split("."):
            value = getattr(value, key)
        return bool(value)

    def load(self) -> Callable[[SparkSession, Config], StageResult]:
        return importlib.import_module(self.module).run


STAGES: tuple[Stage, ...] = (
    Stage("clean", "read catalogs, normalise, quarantine bad rows", "pipelines.stages.clean"),
    Stage(
        "image_features",
        "optional: image backbone features into the clean catalog",
        "pipelines.stages.image_features",
        enabled_by="image_features.enabled",
    ),
    Stage("corpus", "title corpus, Spark-counted vocabulary, word2vec", "pipelines.stages.corpus"),
    Stage("shard", "tokenised, labelled, split Parquet training shards", "pipelines.stages.shard"),
    Stage("train", "MRNet / master model, data-parallel from Spark", "pipelines.stages.train"),
    Stage("embed", "distributed inference into a versioned Delta table", "pipelines.stages.embed"),
    Stage(
        "cross_locale",
        "optional: one embedding space for two locales' products (MRNet section 5)",
        "pipelines.stages.cross_locale",
        enabled_by="cross_locale.enabled",
    ),
    Stage("index", "faiss index per table version, recall@10 vs exact", "pipelines.stages.index"),
    Stage(
        "evaluate", "probes vs TF-IDF, head reports, pictures, drift", "pipelines.stages.evaluate"
    ),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage {name!r}; stages are {', '.join(STAGE_NAMES)}")


def run_stage(name: str, config: Config, spark: SparkSession | None = None) -> StageResult:
    """Run one stage inside its own MLflow run (nested under a pipeline run if open). A
    disabled optional stage does nothing (a scheduler may run its job unconditionally) and
    says so in its outputs."""
    stage = get_stage(name)
    if not stage.enabled(config):
        log.warning("stage %s is disabled (%s is false): nothing to do", name, stage.enabled_by)
        return StageResult(rows={}, outputs={"skipped": f"{stage.enabled_by} is false"})
    stage_fn = stage.load()
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
    """Run every built, enabled stage in order under one parent MLflow run."""
    spark = spark or get_spark(config.spark)
    tracking.configure(config)
    results: dict[str, StageResult] = {}
    with mlflow.start_run(run_name=f"pipeline-{config.catalog.name}"):
        mlflow.set_tags({"prodvec.stage": "pipeline", "prodvec.catalog": config.catalog.name})
        for stage in STAGES:
            if not stage.enabled(config):
                continue
            results[stage.name] = run_stage(stage.name, config, spark)
    return results


def summary(config: Config, results: dict[str, StageResult]) -> str:
    """The end-of-run report: rows per stage, outputs, what is skipped, the MLflow UI."""
    lines = [f"prodvec run on catalog '{config.catalog.name}' (config {config.digest()})"]
    for name, result in results.items():
        rows = ", ".join(f"{key}={value:,}" for key, value in result.rows.items())
        lines.append(f"  {name:<9} {rows}")
        lines.extend(f"  {'':<9} {key}: {path}" for key, path in result.outputs.items())
    skipped = [
        f"{stage.name} ({stage.enabled_by}=false)" for stage in STAGES if not stage.enabled(config)
    ]
    if skipped:
        lines.append(f"  skipped (disabled): {', '.join(skipped)}")
    lines.append(
        f"  MLflow UI: mlflow ui --backend-store-uri {tracking.tracking_uri(config)}"
        + (
            f" --default-artifact-root {tracking.artifact_location(config)}"
            if tracking.artifact_location(config)
            else ""
        )
    )
    return "\n".join(lines)
