"""The embedding table's contract: its schema, the checks every row and every data file must
pass before a commit, and the per-file statistics the Delta log carries.

One row per product: product_id, embedding (list<float32> of one dimension per version),
the model that made it (name, version), the content_hash of what the model read, and when.
delta-rs does not check file schemas on the commit path prodvec uses, so these checks do:
rows while Spark writes them (observed metrics), files from their Parquet footers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import reduce
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.core.errors import TableError

__all__ = [
    "COLUMNS",
    "HASHES_SCHEMA",
    "ID_SCHEMA",
    "SPARK_SCHEMA",
    "TABLE_SCHEMA",
    "DataFile",
    "check_row_metrics",
    "conform",
    "file_problems",
    "file_stats",
    "model_names",
    "row_metrics",
    "vector_array",
]

COLUMNS = ("product_id", "embedding", "model_name", "model_version", "content_hash", "embedded_at")
TABLE_SCHEMA = pa.schema(
    [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.field("element", pa.float32(), False)), nullable=False),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("embedded_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
SPARK_SCHEMA = T.StructType(
    [
        T.StructField("product_id", T.StringType(), False),
        T.StructField("embedding", T.ArrayType(T.FloatType(), False), False),
        T.StructField("model_name", T.StringType(), False),
        T.StructField("model_version", T.StringType(), False),
        T.StructField("content_hash", T.StringType(), False),
        T.StructField("embedded_at", T.TimestampType(), False),
    ]
)
HASHES_SCHEMA = T.StructType(
    [SPARK_SCHEMA[name] for name in ("product_id", "content_hash", "model_name", "model_version")]
)
ID_SCHEMA = T.StructType([SPARK_SCHEMA["product_id"]])
CONTRACT_TYPES = {
    "product_id": "string",
    "embedding": "list<float>",
    "model_name": "string",
    "model_version": "string",
    "content_hash": "string",
    "embedded_at": "timestamp[us, tz=UTC]",
}
STAT_COLUMNS = ("product_id", "model_name", "model_version", "content_hash")


@dataclass(frozen=True)
class DataFile:
    """One data file of the table, as its AddAction needs it."""

    path: str  # relative to the table root, as the Delta log holds it
    size: int
    mtime_ms: int
    rows: int
    stats: str


def vector_array(embeddings: np.ndarray, rows: int) -> pa.ListArray:
    """The table's `embedding` column for `rows` embeddings ([rows, dim], float32) over their
    flat buffer: offsets and values, no per-row Python."""
    width = embeddings.shape[1] if rows else 0
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width)
    values = pa.array(embeddings.reshape(-1), type=pa.float32())
    return pa.ListArray.from_arrays(offsets, values, type=TABLE_SCHEMA.field("embedding").type)


def model_names(models: set[tuple[str, str]]) -> str:
    return ", ".join(f"{name} v{version}" for name, version in sorted(models))


def conform(frame: DataFrame, model_name: str, model_version: str) -> DataFrame:
    """The contract's columns in order; model columns and embedded_at filled when absent."""
    present = {field.name: field.dataType for field in frame.schema}
    missing = [name for name in ("product_id", "embedding", "content_hash") if name not in present]
    if missing:
        raise TableError(f"the embeddings lack column(s) {missing} (have {sorted(present)})")
    filled = {
        "model_name": F.lit(model_name),
        "model_version": F.lit(model_version),
        "embedded_at": F.current_timestamp(),
    }
    columns, problems = [], []
    for field in SPARK_SCHEMA:
        if field.name not in present:
            columns.append(filled[field.name].alias(field.name))
            continue
        got, want = present[field.name].simpleString(), field.dataType.simpleString()
        if got != want:
            problems.append(f"{field.name} is {got}, expected {want}")
        columns.append(F.col(field.name))
    if problems:
        raise TableError("the embeddings do not match the table contract: " + "; ".join(problems))
    return frame.select(*columns)


def row_metrics(model_name: str, model_version: str) -> list[Column]:
    """Row checks as aggregates, so they ride along the write as observed metrics."""
    vector = F.col("embedding")
    any_null = reduce(lambda a, b: a | b, [F.col(name).isNull() for name in COLUMNS])
    non_finite = F.exists(vector, lambda x: x.isNull() | F.isnan(x) | (F.abs(x) == float("inf")))
    other_model = (F.col("model_name") != model_name) | (F.col("model_version") != model_version)
    return [
        F.count(F.lit(1)).alias("rows"),
        F.min(F.size(vector)).alias("min_dimension"),
        F.max(F.size(vector)).alias("max_dimension"),
        F.sum(F.when(any_null, 1).otherwise(0)).alias("null_rows"),
        F.sum(F.when(non_finite, 1).otherwise(0)).alias("non_finite_rows"),
        F.sum(F.when(other_model, 1).otherwise(0)).alias("other_model_rows"),
    ]


def check_row_metrics(
    metrics: dict[str, Any], dimension: int, model: tuple[str, str], where: str
) -> None:
    problems = []
    if metrics.get("null_rows"):
        problems.append(f"{metrics['null_rows']} rows have a null column")
    sizes = (metrics.get("min_dimension"), metrics.get("max_dimension"))
    if metrics.get("rows") and sizes != (dimension, dimension):
        problems.append(f"embedding sizes range {sizes[0]}..{sizes[1]}, expected {dimension}")
    if metrics.get("non_finite_rows"):
        problems.append(f"{metrics['non_finite_rows']} embeddings hold NaN, inf or null values")
    if metrics.get("other_model_rows"):
        problems.append(
            f"{metrics['other_model_rows']} rows name another model than {model[0]} v{model[1]}"
        )
    if problems:
        raise TableError(f"{where}: " + "; ".join(problems))


def _same_type(got: pa.DataType, want: pa.DataType) -> bool:
    if pa.types.is_string(want):
        return pa.types.is_string(got) or pa.types.is_large_string(got)
    if pa.types.is_list(want):
        return (
            pa.types.is_list(got) or pa.types.is_large_list(got)
        ) and got.value_type == want.value_type
    return (
        pa.types.is_timestamp(got)
        and got.unit == want.unit
        and (got.tz is None) == (want.tz is None)
    )


def _schema_problems(schema: pa.Schema) -> list[str]:
    problems = [f"missing column {name}" for name in COLUMNS if name not in schema.names]
    problems += [f"unexpected column {name}" for name in schema.names if name not in COLUMNS]
    for field in TABLE_SCHEMA:
        if field.name in schema.names and not _same_type(schema.field(field.name).type, field.type):
            problems.append(
                f"{field.name} is {schema.field(field.name).type}, "
                f"expected {CONTRACT_TYPES[field.name]}"
            )
    return problems


def _footer_problems(meta: pq.FileMetaData, dimension: int) -> list[str]:
    """Dimension and nulls from the footer: a list column holds rows x dimension values when
    every vector has `dimension` elements (a null or empty vector counts one value)."""
    problems: dict[str, str] = {}  # the first problem of each kind is enough to refuse
    for group in range(meta.num_row_groups):
        row_group = meta.row_group(group)
        for index in range(row_group.num_columns):
            chunk = row_group.column(index)
            name = chunk.path_in_schema.split(".")[0]
            stats = chunk.statistics
            if stats is not None and stats.has_null_count and stats.null_count:
                problems.setdefault(
                    f"{name} nulls", f"{name} has {stats.null_count} nulls (row group {group})"
                )
            if name == "embedding" and chunk.num_values != row_group.num_rows * dimension:
                per_row = chunk.num_values / max(row_group.num_rows, 1)
                problems.setdefault(
                    "dimension",
                    f"embedding dimension is not {dimension}: row "
                    f"group {group} holds {chunk.num_values} values for "
                    f"{row_group.num_rows} rows ({per_row:g} per row)",
                )
    return list(problems.values())


def file_problems(meta: pq.FileMetaData, dimension: int) -> list[str]:
    """What keeps a data file out of the table: its schema, then its footer's nulls and
    embedding dimension."""
    return _schema_problems(meta.schema.to_arrow_schema()) or _footer_problems(meta, dimension)


def file_stats(meta: pq.FileMetaData) -> str:
    """Delta file statistics: row count, null counts, min/max of the string columns (the
    model columns let a planner see which model a file holds without reading it)."""
    columns = {meta.schema.column(i).path: i for i in range(meta.num_columns)}
    mins, maxs, nulls = {}, {}, {}
    for name in (*STAT_COLUMNS, "embedded_at"):
        chunks = [
            meta.row_group(g).column(columns[name]).statistics for g in range(meta.num_row_groups)
        ]
        if not chunks or any(s is None for s in chunks):
            continue
        if all(s.has_null_count for s in chunks):
            nulls[name] = sum(s.null_count for s in chunks)
        if name != "embedded_at" and all(s.has_min_max for s in chunks):
            mins[name] = min(s.min for s in chunks)
            maxs[name] = max(s.max for s in chunks)
    return json.dumps(
        {"numRecords": meta.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls}
    )
