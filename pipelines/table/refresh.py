"""Incremental refresh: which products an embed run must embed, which leave, and the file-level
copy-on-write that keeps every other row where it is.

A refresh with the model the table already holds re-embeds new and changed products only
(by content_hash); a new model, or no table, is a full refresh. Copy-on-write replaces only
the files holding a re-embedded or deleted product, with a copy of their other rows; every
other file is carried by reference. Its cost is one read of the `product_id` column of the
table plus a rewrite of the files touched, which approaches the whole table once changes
are spread over more products than there are files.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import Literal

import pyarrow as pa
from deltalake import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.core.errors import TableError
from pipelines.table.contract import (
    COLUMNS,
    ID_SCHEMA,
    SPARK_SCHEMA,
    DataFile,
    model_names,
)
from pipelines.table.storage import TableFiles

__all__ = ["Mode", "RefreshPlan", "check_one_model", "copy_on_write", "models_in", "plan"]

Mode = Literal["full", "incremental"]


@dataclass(frozen=True)
class RefreshPlan:
    """What an embed run must do: `to_embed` (catalog rows to run the model on) and, for an
    incremental refresh, `deleted` (product ids to drop); both lazy."""

    mode: Mode
    reason: str
    to_embed: DataFrame
    deleted: DataFrame | None


def plan(
    spark: SparkSession,
    files: TableFiles,
    table: DeltaTable | None,
    current: DataFrame | None,
    catalog: DataFrame,
    model: tuple[str, str],
) -> RefreshPlan:
    """Compare the catalog (product_id, content_hash, ...) with the table's `current` hashes:
    the same model re-embeds new and changed products only; a new model or no table means a
    full refresh."""
    missing = {"product_id", "content_hash"} - set(catalog.columns)
    if missing:
        raise TableError(f"the catalog lacks {sorted(missing)} (has {catalog.columns})")
    if table is None or current is None:
        return RefreshPlan("full", "no table yet", catalog, None)
    others = models_in(spark, files, table) - {model}
    if others:
        return RefreshPlan(
            "full", f"the table holds embeddings of {model_names(others)}", catalog, None
        )
    to_embed = catalog.join(
        current.select("product_id", "content_hash"), ["product_id", "content_hash"], "left_anti"
    )
    deleted = current.select("product_id").join(
        catalog.select("product_id"), "product_id", "left_anti"
    )
    return RefreshPlan("incremental", f"same model {model[0]} v{model[1]}", to_embed, deleted)


def models_in(spark: SparkSession, files: TableFiles, table: DeltaTable) -> set[tuple[str, str]]:
    """Models in a version, from the log's per-file min/max (no data read); files without
    those statistics are read."""
    actions = pa.table(table.get_add_actions(flatten=True)).to_pylist()
    models, unknown = set(), []
    for action in actions:
        name = (action.get("min.model_name"), action.get("max.model_name"))
        version = (action.get("min.model_version"), action.get("max.model_version"))
        if None in name or None in version or name[0] != name[1] or version[0] != version[1]:
            unknown.append(files.absolute(action["path"]))
        else:
            models.add((name[0], version[0]))
    if unknown:
        rows = (
            spark.read.schema(SPARK_SCHEMA)
            .parquet(*unknown)
            .select("model_name", "model_version")
            .distinct()
            .collect()
        )
        models |= {(row.model_name, row.model_version) for row in rows}
    return models


def check_one_model(
    spark: SparkSession, files: TableFiles, table: DeltaTable, model: tuple[str, str]
) -> None:
    """An incremental refresh must not mix the embeddings of two models in one version."""
    others = models_in(spark, files, table) - {model}
    if others:
        raise TableError(
            f"{files.uri} holds embeddings of {model_names(others)}: an incremental refresh "
            f"with {model[0]} v{model[1]} would mix models; run a full refresh"
        )


def removal_keys(
    spark: SparkSession, files: TableFiles, embedded: list[DataFile], deleted: DataFrame | None
) -> DataFrame:
    """Product ids whose current row must go: re-embedded ones and deleted ones."""
    parts = (
        [spark.read.schema(ID_SCHEMA).parquet(*(files.absolute(f.path) for f in embedded))]
        if embedded
        else []
    )
    if deleted is not None:
        parts.append(deleted.select(F.col("product_id").cast("string")))
    keys = reduce(DataFrame.unionByName, parts)
    return keys.where(F.col("product_id").isNotNull()).distinct()


def copy_on_write(
    spark: SparkSession,
    files: TableFiles,
    current: list[DataFile],
    embedded: list[DataFile],
    deleted: DataFrame | None,
    folder: str,
    dimension: int,
) -> tuple[list[DataFile], list[DataFile]]:
    """Find the current files holding a key (one read of the product_id column), copy their
    other rows to `folder`. Returns (files to remove, files written)."""
    if not current or (not embedded and deleted is None):
        return [], []
    keys = removal_keys(spark, files, embedded, deleted).persist()
    try:
        hits = (
            spark.read.schema(ID_SCHEMA)
            .parquet(*(files.absolute(f.path) for f in current))
            .select("product_id", F.col("_metadata.file_path").alias("file"))
            .join(keys, "product_id")
            .groupBy("file")
            .count()
            .collect()
        )
        if not hits:
            return [], []
        by_path = {f.path: f for f in current}
        touched = [by_path[files.relative(row.file)] for row in hits]
        rest = (
            spark.read.schema(SPARK_SCHEMA)
            .parquet(*(files.absolute(f.path) for f in touched))
            .join(keys, "product_id", "left_anti")
            .select(*COLUMNS)
        )
        files.write(rest, folder)
    finally:
        keys.unpersist()
    rewritten = [files.inspect(path, dimension) for path in files.listing(folder)]
    expected = sum(f.rows for f in touched) - sum(row["count"] for row in hits)
    if sum(f.rows for f in rewritten) != expected:
        raise TableError(
            f"{files.uri}: copied {sum(f.rows for f in rewritten)} rows out of "
            f"{len(touched)} files, expected {expected}: the table repeats ids"
        )
    return touched, [f for f in rewritten if f.rows]
