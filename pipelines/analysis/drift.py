"""Drift between two versions of the embedding table: cosine(old, new) per shared product when
the dimensions match, neighbour overlap@k always (a hash sample of the shared products)."""

from __future__ import annotations

from typing import Any

import numpy as np
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines.analysis.retrieval import (
    exact_neighbours,
    list_vectors,
    others,
)
from pipelines.analysis.sample import hash_sample
from pipelines.core.errors import EvaluateError
from pipelines.table import EmbeddingTable

__all__ = ["PERCENTILES", "embedding_drift", "table_drift"]

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def embedding_drift(old: np.ndarray, new: np.ndarray, k: int) -> dict[str, Any]:
    """Drift of one set of products (row i of `old` and `new` is the same product): cosine
    (old, new) statistics when the dimensions match, and the mean overlap of each product's
    k nearest other products in the old space and in the new."""
    if len(old) != len(new):
        raise EvaluateError(f"drift needs aligned rows: {len(old)} old, {len(new)} new")
    report: dict[str, Any] = {"compared": len(old), "k": min(k, len(old) - 1)}
    if old.shape[1] == new.shape[1]:
        a = old / np.maximum(np.linalg.norm(old, axis=1, keepdims=True), 1e-12)
        b = new / np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
        cosine = (a * b).sum(axis=1)
        report["cosine"] = {
            "mean": float(cosine.mean()),
            **{
                f"p{p}": float(v)
                for p, v in zip(PERCENTILES, np.percentile(cosine, PERCENTILES), strict=True)
            },
        }
    else:
        report["cosine"] = None
        report["cosine_skipped"] = (
            f"dimensions differ ({old.shape[1]} -> {new.shape[1]}): cosine(old, new) is undefined"
        )
    if report["k"] < 1:
        report["overlap"] = None
        report["overlap_skipped"] = f"{len(old)} shared product(s): no neighbours to compare"
        return report
    rows = np.arange(len(old))
    kk = report["k"]
    before, _ = others(exact_neighbours(old, old, kk + 1)[1], rows, kk)
    after, _ = others(exact_neighbours(new, new, kk + 1)[1], rows, kk)
    overlap = (before[:, :, None] == after[:, None, :]).any(axis=2).mean(axis=1)
    report["overlap"] = {
        "mean": float(overlap.mean()),
        **{
            f"p{p}": float(v)
            for p, v in zip(PERCENTILES, np.percentile(overlap, PERCENTILES), strict=True)
        },
    }
    return report


def table_drift(
    spark: SparkSession,
    table: EmbeddingTable,
    old_version: int,
    new_version: int,
    *,
    k: int = 10,
    max_rows: int = 20_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Drift between two versions of an embedding table, for downstream teams deciding
    whether to re-index. Counts are over the whole versions; cosine and overlap over a
    product_id hash sample of `max_rows` shared products (neighbours within that sample)."""
    for version in (old_version, new_version):
        if version > (table.version() or 0) or version < 0:
            raise EvaluateError(f"{table.uri} has no version {version} (latest: {table.version()})")
    old = table.read_spark(spark, old_version).select("product_id", F.col("embedding").alias("old"))
    new = table.read_spark(spark, new_version).select("product_id", F.col("embedding").alias("new"))
    counts = (
        old.join(new, "product_id", "full_outer")
        .select(
            F.count_if(F.col("old").isNotNull() & F.col("new").isNotNull()).alias("shared"),
            F.count_if(F.col("new").isNull()).alias("only_old"),
            F.count_if(F.col("old").isNull()).alias("only_new"),
        )
        .collect()[0]
    )
    report: dict[str, Any] = {
        "old_version": old_version,
        "new_version": new_version,
        **counts.asDict(),
    }
    if counts["shared"] == 0:
        report["skipped"] = "no product is in both versions"
        return report
    joined = hash_sample(old.join(new, "product_id"), max_rows, seed).toArrow()
    where = f"{table.uri} versions {old_version}/{new_version}"
    report.update(
        embedding_drift(list_vectors(joined["old"], where), list_vectors(joined["new"], where), k)
    )
    return report
