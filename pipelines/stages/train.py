"""Train stage: the model type `train.model` names, trained on the shard stage's output with
data-parallel PyTorch launched from Spark, logged to the stage's MLflow run and registered.

How a run goes, on the driver:
1. Check the shards (present, one vocabulary) and decide how processes start
   (`pipelines.training.launch.plan_launch`), failing at once when the machine or cluster has
   fewer slots than `train.num_processes`.
2. Align the corpus stage's word2vec vectors with the shards' vocabulary (the embedding
   layer's initial weights, `pipelines.training.inputs.word_vectors`).
3. Hand the rest to the model type (`pipelines.model_types`): it trains through the shared
   loop (`pipelines.training.loop`, in every TorchDistributor process), reads what rank 0
   wrote, logs it from here (the driver is the only process that talks to MLflow), and
   registers its served form with the alias `candidate`.
"""

from __future__ import annotations

import logging

import mlflow
from pyspark.sql import SparkSession

from pipelines.core.config import Config
from pipelines.core.errors import TrainingError
from pipelines.core.outputs import StageResult
from pipelines.data.shards import MANIFEST, load_manifest, shard_sets
from pipelines.model_types.contract import TrainingRun
from pipelines.model_types.registry import model_type
from pipelines.training.inputs import word_vectors
from pipelines.training.launch import plan_launch

__all__ = ["run"]

log = logging.getLogger(__name__)


def run(spark: SparkSession, config: Config) -> StageResult:
    """Train the configured model type on the shards, log it and register it."""
    shard_root = config.outputs.shards
    if not (shard_root / MANIFEST).is_file():
        raise TrainingError(f"no shards at {shard_root}: run `prodvec shard` first")
    sets = shard_sets(shard_root)
    vocabularies = {load_manifest(path)["vocabulary"]["sha256"] for path in sets.values()}
    if len(vocabularies) > 1:
        raise TrainingError(
            f"the shard sets under {shard_root} were built with different "
            "vocabularies: rerun `prodvec shard`"
        )
    launch = plan_launch(spark, config.train)
    out = config.outputs.training
    out.mkdir(parents=True, exist_ok=True)
    vectors = word_vectors(config, next(iter(sets.values())), out)
    mlflow.log_params(
        {
            "launch.mode": launch.mode,
            "launch.processes": launch.processes,
            "launch.use_gpu": launch.use_gpu,
            "launch.threads": launch.threads,
        }
    )
    return model_type(config.train.model).train(TrainingRun(config, launch, sets, vectors, out))
