"""Incremental refresh: which products an embed run must embed, which leave, and the file-level
copy-on-write that keeps every other row where it is.

A refresh with the model the table already holds re-embeds new and changed products only
(by content_hash); a new model, or no table, is a full refresh. Copy-on-write replaces only
the files holding a re-embedded or deleted product, with a copy of their other rows; every
other file is carried by reference. Its cost is one read of the `product_id` column of the
table plus a rewrite of the files touched, which approaches the whole table once changes
are spread over more products than there are files.

Two guards run before anything is written: the refresh guard (`ChangeLimits`) stops a run
that would remove or replace a suspicious share of the table (a truncated catalog looks like
mass deletion), and the catalog stamp (`check_catalog_stamp`) stops a run whose clean catalog
is older than the one the table's last commit was made from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from typing import Literal

import pyarrow as pa
from deltalake import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.core.errors import MassChangeError, StaleCatalogError, TableError
from pipelines.table.contract import (
    COLUMNS,
    ID_SCHEMA,
    SPARK_SCHEMA,
    DataFile,
    model_names,
)
from pipelines.table.storage import TableFiles

__all__ = [
    "CATALOG_STAMP",
    "ChangeLimits",
    "Mode",
    "RefreshPlan",
    "RefreshSource",
    "check_catalog_stamp",
    "check_one_model",
    "copy_on_write",
    "models_in",
    "plan",
]

Mode = Literal["full", "incremental"]
CATALOG_STAMP = "catalog_written_at"  # the commit metadata key of the clean catalog's stamp


@dataclass(frozen=True)
class ChangeLimits:
    """How much one refresh may change (`embed.max_removed_fraction`,
    `embed.min_carried_fraction`); a refresh beyond them raises `MassChangeError`."""

    max_removed_fraction: float
    min_carried_fraction: float


@dataclass(frozen=True)
class RefreshPlan:
    """What an embed run must do: `to_embed` (catalog rows to run the model on) and, for an
    incremental refresh, `deleted` (product ids to drop); both lazy. `version` is the table
    version it was planned against (None: no table), so a commit can tell it went stale."""

    mode: Mode
    reason: str
    to_embed: DataFrame
    deleted: DataFrame | None
    version: int | None


@dataclass(frozen=True)
class RefreshSource:
    """What a commit needs to plan again when another writer committed after `plan` was made:
    the catalog, the model over it (catalog rows -> embeddings frame) and the limits."""

    plan: RefreshPlan
    catalog: DataFrame
    embed: Callable[[DataFrame], DataFrame]
    limits: ChangeLimits | None


def plan(
    spark: SparkSession,
    files: TableFiles,
    table: DeltaTable | None,
    current: DataFrame | None,
    catalog: DataFrame,
    model: tuple[str, str],
    limits: ChangeLimits | None = None,
) -> RefreshPlan:
    """Compare the catalog (product_id, content_hash, ...) with the table's `current` hashes:
    the same model re-embeds new and changed products only; a new model or no table means a
    full refresh. With `limits`, a refresh that changes too much raises `MassChangeError`."""
    missing = {"product_id", "content_hash"} - set(catalog.columns)
    if missing:
        raise TableError(f"the catalog lacks {sorted(missing)} (has {catalog.columns})")
    if table is None or current is None:
        return RefreshPlan("full", "no table yet", catalog, None, None)
    others = models_in(spark, files, table) - {model}
    mode: Mode = "full" if others else "incremental"
    if limits is not None:
        _check_change(files, current, catalog, mode, limits)
    if others:
        reason = f"the table holds embeddings of {model_names(others)}"
        return RefreshPlan("full", reason, catalog, None, table.version())
    to_embed = catalog.join(
        current.select("product_id", "content_hash"), ["product_id", "content_hash"], "left_anti"
    )
    deleted = current.select("product_id").join(
        catalog.select("product_id"), "product_id", "left_anti"
    )
    reason = f"same model {model[0]} v{model[1]}"
    return RefreshPlan("incremental", reason, to_embed, deleted, table.version())


def _check_change(
    files: TableFiles, current: DataFrame, catalog: DataFrame, mode: Mode, limits: ChangeLimits
) -> None:
    """One join of the table's hashes with the catalog's counts what the refresh would remove
    (products the catalog lacks) and re-embed (changed hashes). A full refresh replaces every
    row by design: only its removals are limited."""
    counts = (
        current.select("product_id", F.col("content_hash").alias("table_hash"))
        .join(catalog.select("product_id", "content_hash"), "product_id", "left")
        .agg(
            F.count(F.lit(1)).alias("table"),
            F.sum(F.when(F.col("content_hash").isNull(), 1).otherwise(0)).alias("removed"),
            F.sum(F.when(F.col("content_hash") != F.col("table_hash"), 1).otherwise(0)).alias(
                "changed"
            ),
        )
        .collect()[0]
    )
    table_rows, removed, changed = counts["table"], counts["removed"] or 0, counts["changed"] or 0
    if not table_rows:
        return
    carried = table_rows - removed - changed
    problems = []
    if removed / table_rows > limits.max_removed_fraction:
        problems.append(
            f"embed.max_removed_fraction={limits.max_removed_fraction:g} "
            "(set 1 to allow these removals)"
        )
    if mode == "incremental" and carried / table_rows < limits.min_carried_fraction:
        problems.append(
            f"embed.min_carried_fraction={limits.min_carried_fraction:g} "
            "(set 0 to allow this change)"
        )
    if problems:
        raise MassChangeError(
            f"{files.uri}: this {mode} refresh would remove {removed} and carry {carried} of "
            f"the table's {table_rows} products ({changed} re-embedded), beyond "
            + " and ".join(problems)
            + "; nothing was written: check the clean catalog first"
        )


def check_catalog_stamp(files: TableFiles, table: DeltaTable | None, stamp: int | None) -> None:
    """Refuse to commit rows of a clean catalog older than the one the table's last commit
    recorded (`CATALOG_STAMP`): an older catalog must never overwrite newer rows."""
    if table is None or stamp is None:
        return
    history = table.history(1)
    last = json.loads(history[0].get("userMetadata") or "{}") if history else {}
    newest = last.get(CATALOG_STAMP)
    if newest is not None and stamp < newest:
        raise StaleCatalogError(
            f"{files.uri}: version {table.version()} was committed from a clean catalog written "
            f"at {newest} (epoch ms), newer than this run's ({stamp}): nothing was committed; "
            "run `prodvec clean` and embed again"
        )


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
            files.read(spark, SPARK_SCHEMA, unknown)
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
        [files.read(spark, ID_SCHEMA, [files.absolute(f.path) for f in embedded])]
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
            files.read(spark, ID_SCHEMA, [files.absolute(f.path) for f in current])
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
            files.read(spark, SPARK_SCHEMA, [files.absolute(f.path) for f in touched])
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
