"""The evaluate stage's working set: a product_id hash sample of one embedding-table version
joined to the clean catalog (titles, categories, probe labels), collected to the driver
through Arrow; only `evaluate.max_rows` products ever leave Spark."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.analysis.retrieval import (
    list_vectors,
)
from pipelines.core.config import Config
from pipelines.data.catalog import check_sources, read_clean
from pipelines.table import EmbeddingTable
from pipelines.tasks import kind_of
from pipelines.tasks.contract import TaskSpec

__all__ = ["Sample", "collect_sample", "hash_sample", "probe_label"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """A product_id hash sample of one table version joined to the clean catalog."""

    product_ids: np.ndarray  # [n] object
    titles: np.ndarray  # [n] object
    top_category: np.ndarray  # [n] object, None where a product has no category
    leaf_category: np.ndarray  # [n] object, the deepest category node (None: no category)
    labels: dict[str, np.ndarray]  # probe name -> [n] object (string label or None)
    vectors: np.ndarray  # [n, d] float32


def hash_sample(frame: DataFrame, rows: int, seed: int) -> DataFrame:
    """`rows` products chosen by a seeded hash of product_id: the same products on every
    run and for every version (so drift compares like with like), one top-k in Spark."""
    return frame.orderBy(F.xxhash64(F.col("product_id"), F.lit(seed))).limit(rows)


def probe_label(task: TaskSpec) -> F.Column:
    """The probe's raw label as a string (binary probes: 'true'/'false'), null when absent."""
    kind = kind_of(task.kind)
    return kind.probe_label(task, kind.raw(task))


def collect_sample(spark: SparkSession, config: Config, version: int) -> tuple[Sample, int]:
    """(the joined sample, embedded products of the version that the clean catalog lacks)."""
    settings = config.evaluate
    check_sources(list(settings.probes))
    embeddings = (
        EmbeddingTable.from_config(config)
        .read_spark(spark, version)
        .select("product_id", "embedding")
    )
    catalog = read_clean(spark, config).select(
        "product_id",
        "title",
        F.try_element_at("category_path", F.lit(1)).alias("top_category"),
        F.try_element_at("category_path", F.lit(-1)).alias("leaf_category"),
        *[probe_label(task).alias(f"probe_{task.name}") for task in settings.probes],
    )
    joined = embeddings.join(catalog, "product_id", "left")
    missing = joined.filter(F.col("title").isNull()).count()
    if missing:
        log.warning(
            "evaluate: %d embedded products of version %d are not in the clean catalog "
            "(left out of probes and pictures)",
            missing,
            version,
        )
    table = hash_sample(
        joined.filter(F.col("title").isNotNull()), settings.max_rows, config.seed
    ).toArrow()
    sample = Sample(
        product_ids=table["product_id"].to_numpy(),
        titles=table["title"].to_numpy(),
        top_category=table["top_category"].to_numpy(),
        leaf_category=table["leaf_category"].to_numpy(),
        labels={task.name: table[f"probe_{task.name}"].to_numpy() for task in settings.probes},
        vectors=list_vectors(table["embedding"], f"table version {version}"),
    )
    return sample, missing
