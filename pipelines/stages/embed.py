"""Embed stage: the registered model over the clean catalog, into the embedding table.

How it runs:
1. The driver resolves the model URI to one registry version (an alias can move while we
   run; the version cannot), downloads it once to a local folder and loads it once to learn
   which model type's served form it is (`pipelines.model_types`), what it takes as input
   and how wide its output is.
2. Executors read that folder: its path directly in local mode, an archive of it that each
   executor unpacks (`SparkContext.addArchive`) on a cluster. Each Python worker loads the
   model once and keeps it in `_MODELS` (Spark reuses Python workers by default,
   `spark.python.worker.reuse`), so later tasks on the worker pay nothing. The accumulator
   `model_loads` says how often that happened.
3. `mapInArrow` hands Arrow batches to `_embed_batches`: the model type turns the clean
   columns into the model's input (the shared tokenizer and the training vocabulary), forward in
   `embed.batch_size` chunks under `torch.inference_mode` with one torch thread per task on
   CPU, or in `embed.gpu_batch_size` chunks on the GPU Spark assigned to the task. The
   embeddings go back as one list<float32> column built from the flat output buffer.
4. `EmbeddingTable.plan_refresh` decides what to embed: with the model the table already
   holds, new and changed products only; after a new model, everything. One commit. Before
   anything is embedded it refuses a refresh that would remove or replace more of the table
   than `embed.max_removed_fraction` / `embed.min_carried_fraction` allow, and a clean catalog
   older than the one the table was last committed from (its write time is recorded in every
   commit). A commit that finds the table moved on plans again there.

`embed_file` is the ad-hoc path (`prodvec embed --model --input --output`): any CSV, JSON
lines or Parquet of products, cleaned by the clean stage's transform, one output row per
input row (rows the clean stage would quarantine carry its reason and no embedding).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import mlflow
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.accumulators import Accumulator
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.core import faults
from pipelines.core.config import CatalogConfig, ColumnMap, Config
from pipelines.core.devices import task_inference
from pipelines.core.errors import EmbedError
from pipelines.core.outputs import StageResult
from pipelines.data.catalog import clean_written_at, read_clean
from pipelines.model_types.registry import model_type
from pipelines.model_types.serving import (
    SHIPPED,
    ModelSpec,
    cached_model,
    default_model_uri,
    embed_batch,
    input_columns,
    prepare_model,
)
from pipelines.stages import clean
from pipelines.table import EmbeddingTable
from pipelines.table.contract import vector_array
from pipelines.table.refresh import ChangeLimits, RefreshSource

__all__ = ["EMBEDDING", "embed_file", "embed_frame", "infer_format", "run", "ship"]

log = logging.getLogger(__name__)

EMBEDDING = T.StructField("embedding", T.ArrayType(T.FloatType(), containsNull=False))
_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json"}


# ---- the driver: resolve, download, inspect -------------------------------------------------


def ship(spark: SparkSession, spec: ModelSpec) -> ModelSpec:
    """Local mode shares the driver's disk; on a cluster every executor gets the model folder
    as an archive it unpacks (Spark adds no local folder outside local mode), named after the
    model and version, so two versions never share a name."""
    if (spark.sparkContext.master or "").startswith("local"):
        return spec
    folder = Path(spec.folder)
    archive = folder.parent / f"{spec.name}-{spec.version}.zip"
    if not archive.exists():
        partial = shutil.make_archive(
            str(folder.parent / f".{archive.stem}-{os.getpid()}"), "zip", folder
        )
        os.replace(partial, archive)  # whole or absent: a concurrent driver may build it too
    spark.sparkContext.addArchive(str(archive))
    return _replace(spec, folder=SHIPPED + archive.name)


def _replace(spec: ModelSpec, **changes: Any) -> ModelSpec:
    return ModelSpec(**{**spec.__dict__, **changes})


# ---- the workers: one model per Python worker, Arrow batches in and out ---------------------


def _embed_batches(
    batches: Iterator[pa.RecordBatch], spec: ModelSpec, carry: list[str], loads: Accumulator[int]
) -> Iterator[pa.RecordBatch]:
    device, size = task_inference(spec.batch_size, spec.gpu_batch_size)

    def embed(batch: pa.RecordBatch) -> pa.RecordBatch:
        # Loaded inside the batch step, so a model copy the executor cannot read is reported
        # with the batch; after the first batch this is a dict lookup.
        loads.add(int(cached_model(spec, device)[2]))
        embeddings = embed_batch(spec, batch, device, size)
        return pa.RecordBatch.from_arrays(
            [*(batch.column(name) for name in carry), vector_array(embeddings, batch.num_rows)],
            names=[*carry, EMBEDDING.name],
        )

    yield from faults.named_batches("embed", batches, embed)


def embed_frame(
    frame: DataFrame, spec: ModelSpec, carry: tuple[str, ...] = ("product_id", "content_hash")
) -> tuple[DataFrame, Accumulator[int]]:
    """The `carry` columns plus `embedding` (array<float>) for every row of `frame`, which
    holds title (normalised) and, for group models, product_group; plus the accumulator
    counting model loads (read it after an action)."""
    loads = frame.sparkSession.sparkContext.accumulator(0)
    columns = list(dict.fromkeys([*carry, *input_columns(spec)]))
    schema = T.StructType([*(frame.schema[name] for name in carry), EMBEDDING])
    names = list(carry)
    out = frame.select(*columns).mapInArrow(
        lambda batches: _embed_batches(batches, spec, names, loads), schema
    )
    return out, loads


# ---- the stage -------------------------------------------------------------------------------


def run(spark: SparkSession, config: Config) -> StageResult:
    """Embed what the table lacks (or everything after a new model) and commit one version."""
    settings = config.embed
    spec = ship(
        spark,
        prepare_model(
            default_model_uri(config),
            config.outputs.model_cache,
            batch_size=settings.batch_size,
            gpu_batch_size=settings.gpu_batch_size,
        ),
    )
    catalog = read_clean(spark, config).select(
        *dict.fromkeys(
            ["product_id", "content_hash", "title", "product_group", *input_columns(spec)]
        )
    )
    rows: dict[str, int] = {}
    served = model_type(spec.model_type)
    embeddable = served.embeddable(spec.layout)
    if embeddable is not None:
        rows[served.unembeddable] = catalog.filter(~embeddable).count()
        if rows[served.unembeddable]:
            log.warning(
                "embed: %d products the model cannot embed (%s) get no embedding",
                rows[served.unembeddable],
                served.unembeddable,
            )
        catalog = catalog.filter(embeddable)
    fallback = served.served_by_fallback(spec.layout)
    if fallback is not None:
        rows["fallback"] = catalog.filter(fallback).count()
        if rows["fallback"]:
            log.info(
                "embed: %d products of groups without their own MRNet embedded by group %r's",
                rows["fallback"],
                spec.layout.extra["fallback"],
            )
    table = EmbeddingTable.from_config(config)
    limits = ChangeLimits(settings.max_removed_fraction, settings.min_carried_fraction)
    catalog_stamp = clean_written_at(config.outputs.clean_catalog)
    plan = table.plan_refresh(
        spark,
        catalog,
        model_name=spec.name,
        model_version=spec.version,
        limits=limits,
        catalog_stamp=catalog_stamp,
    )
    log.info("embed: %s refresh (%s)", plan.mode, plan.reason)
    embedded, loads = embed_frame(plan.to_embed, spec)
    embedded = faults.inject(embedded, "embed")
    active = mlflow.active_run()
    run_id = active.info.run_id if active is not None else "no-mlflow-run"
    result = table.commit(
        embedded,
        app_id=settings.app_id or run_id,
        run_id=run_id,
        model_uri=spec.uri,
        model_name=spec.name,
        model_version=spec.version,
        config_hash=config.digest(),
        mode=plan.mode,
        dimension=spec.dimension,
        deleted=plan.deleted,
        before_commit=faults.commit_hook("embed"),
        source=RefreshSource(
            plan, catalog, lambda rows: faults.inject(embed_frame(rows, spec)[0], "embed"), limits
        ),
        catalog_stamp=catalog_stamp,
    )
    rows.update(
        {
            "embedded": result.embedded_rows,
            "carried": result.carried_rows,
            "removed": result.removed_rows,
            "table": result.rows,
        }
    )
    if mlflow.active_run():
        mlflow.set_tags({"prodvec.embed.mode": result.mode, "prodvec.embed.model": spec.uri})
    return StageResult(
        rows=rows,
        outputs={
            "table": table.uri,
            "version": str(result.version),
            "model_uri": spec.uri,
            "mode": result.mode,
        },
        metrics={
            "model_loads": float(loads.value),
            "committed": float(result.committed),
            "dimension": float(spec.dimension),
        },
    )


# ---- ad hoc: any product file -----------------------------------------------------------------


def infer_format(path: str) -> Literal["csv", "json", "parquet"]:
    """By extension; folders and anything else are read as Parquet."""
    return _FORMATS.get(Path(path).suffix.lower(), "parquet")  # type: ignore[return-value]


def embed_file(
    spark: SparkSession,
    config: Config,
    *,
    model_uri: str,
    input_path: str,
    output: str,
    id_col: str | None = "id",
    text_col: str = "title",
    group_col: str | None = None,
    fmt: str | None = None,
) -> dict[str, int]:
    """Clean `input_path` as the clean stage does, embed, write Parquet to `output`: one row
    per input row (product_id, title, embedding, reason, message); rows the clean stage would
    quarantine or drop as exact duplicates keep their reason and a null embedding.
    Returns row counts by outcome."""
    spec = ship(
        spark,
        prepare_model(
            model_uri,
            config.outputs.model_cache,
            batch_size=config.embed.batch_size,
            gpu_batch_size=config.embed.gpu_batch_size,
        ),
    )
    served = model_type(spec.model_type)
    if "product_group" in served.input_columns(spec.layout) and group_col is None:
        raise EmbedError(f"{spec.uri} is a per-group model: give the group column (--group-col)")
    catalog = CatalogConfig(
        name="adhoc",
        format=fmt or infer_format(input_path),
        path=input_path,
        columns=ColumnMap(product_id=id_col, title=text_col, product_group=group_col),
    )
    adhoc = config.model_copy(update={"catalog": catalog})
    source = clean.read_catalog(spark, adhoc)
    clean.check_columns(source, catalog)
    staged = (
        clean.transform(source, adhoc)
        .withColumn(
            "_reason",
            F.when(F.col("_duplicate"), F.lit("exact_duplicate")).otherwise(F.col("_reason")),
        )
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    try:
        good = staged.filter(F.col("_reason").isNull())
        embeddable = served.embeddable(spec.layout)
        if embeddable is not None:
            good = good.withColumn("_reason", F.when(~embeddable, F.lit(served.unembeddable)))
        embedded, _ = embed_frame(
            good.filter(F.col("_reason").isNull()), spec, carry=("product_id", "title")
        )
        ok = embedded.select(
            "product_id",
            "title",
            "embedding",
            F.lit(None).cast("string").alias("reason"),
            F.lit(None).cast("string").alias("message"),
        )
        bad = (
            staged.filter(F.col("_reason").isNotNull())
            .unionByName(good.filter(F.col("_reason").isNotNull()), allowMissingColumns=True)
            .select(
                "product_id",
                "title",
                F.lit(None).cast(EMBEDDING.dataType).alias("embedding"),
                F.col("_reason").alias("reason"),
                F.coalesce("_message", F.lit("the model cannot embed this product")).alias(
                    "message"
                ),
            )
        )
        ok.unionByName(bad).write.mode("overwrite").parquet(output)
        written = spark.read.parquet(output)
        counts = {
            row["outcome"]: row["count"]
            for row in written.groupBy(F.coalesce("reason", F.lit("embedded")).alias("outcome"))
            .count()
            .collect()
        }
        rows_in = staged.count()
    finally:
        staged.unpersist()
    if sum(counts.values()) != rows_in:
        raise EmbedError(
            f"{output}: {sum(counts.values())} rows written for {rows_in} read "
            f"({counts}): rows were lost (bug: please report)"
        )
    return {"in": rows_in, **counts}
