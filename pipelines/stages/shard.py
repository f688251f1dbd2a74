"""Shard stage: clean catalog -> token ids, task labels, a leakage-free split, Parquet shards.

Spark does every per-row step with built-in functions; the only Python on the hot path is the
shared tokenizer's Arrow UDF that maps tokens to vocabulary ids (`tokenizer.encode_column`).

- Split: products are grouped by normalised title (catalogs repeat a title across colour and
  size variants, so a title in two splits would leak), each title group gets one stratum (the
  stratify task's raw label), and within a stratum the groups are ranked by a seeded hash;
  the first `validation` share of every stratum goes to validation, the next `test` share to
  test. So the split is exact per stratum, deterministic by seed, and never splits a title.
- Labels are fitted on the train split only (top-N classes, category nodes, regression
  mean/std, TF-IDF vocabulary and IDF) and applied to all splits; a product without a label
  gets a null, which the loader turns into mask=False.
- Shards: one folder per split, rows in seeded random order (a row group is the loader's
  unit of work and of shuffling, so it must not hold one category), row groups of
  `row_group_rows` rows, and `manifest.json` beside them (see `build_manifest`). The
  vocabulary is copied in, so a shard set is self-contained.

With `per_group`, every product group gets its own shard set (labels fitted within the
group, MRNet's one model per group) under `group=<g>/`, and the top manifest indexes them.
The stage writes into a temporary folder and swaps it in at the end: a reader never sees a
half-written shard set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import uuid
from functools import reduce
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Observation, SparkSession, Window
from pyspark.sql import functions as F

from pipelines.core.config import Config, ShardConfig
from pipelines.core.errors import ShardError
from pipelines.core.outputs import StageResult, check_corpus, publish_folder
from pipelines.data.catalog import check_sources, mapped_tasks, read_clean, text_column
from pipelines.data.shards import (
    FORMAT,
    MANIFEST,
    SPLITS,
    SUBWORDS_COLUMN,
    TITLE_TERMS,
    arrow_schema,
    describe_files,
)
from pipelines.data.subwords import Subwords, subword_column
from pipelines.data.tokenizer import (
    OOV_ID,
    PAD_ID,
    VOCABULARY_FILE,
    Vocabulary,
    encode_column,
    tokens,
)
from pipelines.tasks import FittedTask, kind_of
from pipelines.tasks.contract import COUNT, RANK, TaskSpec

if TYPE_CHECKING:
    from pyspark import Broadcast

__all__ = [
    "assign_split",
    "build_manifest",
    "encode",
    "fit_tasks",
    "raw_column",
    "run",
    "split_seed",
    "write_split",
]

log = logging.getLogger(__name__)

_NO_GROUP = ""  # the single group when shards are not per product group


# ---------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------


def assign_split(
    frame: DataFrame, strata: Column, validation: float, test: float, seed: int
) -> DataFrame:
    """Add `_split`: stratified by `strata`, grouped by `title`, deterministic by `seed`.

    A title group takes the smallest stratum of its products. Within a stratum of n groups,
    the group ranked r (1-based) by xxhash64(seed, title) sits at u = (r - 0.5) / n and goes to
    validation when u < validation, to test when u < validation + test, else to train: the
    shares are exact per stratum, and a stratum too small to spare a group stays in train.
    """
    groups = frame.groupBy("title").agg(F.min(strata).alias("_stratum"))
    by_stratum = Window.partitionBy("_stratum")
    ranked = by_stratum.orderBy(F.xxhash64(F.lit(seed), F.col("title")), F.col("title"))
    position = (F.row_number().over(ranked) - 0.5) / F.count(F.lit(1)).over(by_stratum)
    split = (
        F.when(position < validation, F.lit("validation"))
        .when(position < validation + test, F.lit("test"))
        .otherwise(F.lit("train"))
    )
    return frame.join(groups.select("title", split.alias("_split")), "title")


# ---------------------------------------------------------------------------
# Label fitting (train split only) and task columns
# ---------------------------------------------------------------------------


def raw_column(spec: TaskSpec) -> Column:
    """The `_raw_<task>` column the stage adds to the catalog for each task."""
    return F.col(f"_raw_{spec.name}")


def fit_tasks(
    train: DataFrame, tasks: list[TaskSpec], groups: list[str]
) -> dict[str, dict[str, FittedTask]]:
    """group -> task name -> what the train split gives it (labels, stats, weights, IDF), in
    two Spark passes whatever the kinds: one aggregation per group, then one count of the
    (task, value) items the kinds ask for, of which only the kept values reach the driver."""
    fitted = {group: {task.name: FittedTask(task) for task in tasks} for group in groups}
    kinds = {task.name: kind_of(task.kind) for task in tasks}
    aggregates = [
        column
        for task in tasks
        for column in kinds[task.name].train_aggregates(task, raw_column(task))
    ]
    if aggregates:
        for row in train.groupBy("_group").agg(*aggregates).collect():
            for task in tasks:
                kinds[task.name].read_aggregates(fitted[row["_group"]][task.name], row)
    counted = [(task, kinds[task.name].counted_values(task, raw_column(task))) for task in tasks]
    items = [column for _, column in counted if column is not None]
    if items:
        keep = reduce(
            lambda a, b: a | b,
            [kinds[task.name].keep_counted(task) for task, column in counted if column is not None],
        )
        labelled = (
            train.select("_group", F.explode(F.concat(*items)).alias("item"))
            .where(F.col("item.value").isNotNull())
            .select("_group", "item.task", "item.value")
        )
        counts = labelled.groupBy("_group", "task", "value").agg(F.count(F.lit(1)).alias(COUNT))
        order = Window.partitionBy("_group", "task").orderBy(F.desc(COUNT), F.asc("value"))
        kept = (
            counts.withColumn(RANK, F.row_number().over(order))
            .where(keep)
            .orderBy("_group", "task", RANK)
            .collect()
        )
        for row in kept:
            entry = fitted[row["_group"]][row["task"]]
            entry.labels.append(row["value"])
            entry.counts.append(row[COUNT])
    for entries in fitted.values():
        for task in tasks:
            kinds[task.name].finish_fit(entries[task.name])
    return fitted


def encode(
    frame: DataFrame,
    settings: ShardConfig,
    fitted: dict[str, FittedTask],
    vocabulary: Broadcast[Vocabulary],
    image_dim: int | None,
) -> DataFrame:
    """One group's rows -> the shard schema: product_id, ids + length per text field, the
    title's subword ids, image features, one (or two, decoding) columns per task, `_split`."""
    columns: list[Column] = [F.col("product_id"), F.col("_split")]
    for name, max_len in settings.text_fields.items():
        words = tokens(text_column(name))
        columns += [
            encode_column(words, vocabulary, max_len).alias(f"{name}_ids"),
            F.greatest(F.least(F.size(words), F.lit(max_len)), F.lit(1))
            .cast("int")
            .alias(f"{name}_len"),
        ]
    if settings.subwords.enabled:
        scheme = Subwords.from_config(settings.subwords, settings.text_fields["title"])
        columns.append(subword_column(tokens("title"), scheme).alias(SUBWORDS_COLUMN))
    if image_dim is not None:
        features = F.col("image_features")
        missing = features.isNull() | (F.size(features) != image_dim)
        columns += [
            F.when(missing, F.array_repeat(F.lit(0.0).cast("float"), image_dim))
            .otherwise(features)
            .alias("image_features"),
            missing.alias("image_missing"),
        ]
    for entry in fitted.values():
        columns += kind_of(entry.spec.kind).shard_columns(entry, raw_column(entry.spec))
    return frame.select(*columns)


# ---------------------------------------------------------------------------
# Writing and the manifest
# ---------------------------------------------------------------------------


def write_split(
    part: DataFrame, path: Path, rows: int, settings: ShardConfig, seed: int, tasks: list[TaskSpec]
) -> dict[str, int]:
    """Write one split in seeded random row order (files of at most rows_per_file rows, row
    groups of row_group_rows) and return what was observed while writing: rows, title
    tokens, OOV title tokens and labelled rows per task."""
    observed = Observation(f"shard-{uuid.uuid4().hex[:8]}")
    labelled = [
        F.count(F.col(kind_of(t.kind).column_names(t.name)[0])).alias(t.name) for t in tasks
    ]
    ids = F.slice(F.col("title_ids"), 1, F.col("title_len"))
    metrics = [
        F.count(F.lit(1)).alias("_rows"),
        F.sum("title_len").alias("_tokens"),
        F.sum(F.size(F.filter(ids, lambda i: i == OOV_ID))).alias("_oov"),
        *labelled,
    ]
    if rows == 0:  # an empty split (e.g. shard.split.test: 0): its schema, nothing observed
        part.drop("_split").limit(0).coalesce(1).write.mode("overwrite").parquet(str(path))
        return {"_rows": 0, "_tokens": 0, "_oov": 0, **{t.name: 0 for t in tasks}}
    files = max(1, math.ceil(rows / settings.rows_per_file))
    part.drop("_split").observe(observed, *metrics).repartition(
        files, F.xxhash64(F.lit(seed), F.col("product_id"))
    ).sortWithinPartitions(F.xxhash64(F.lit(seed + 1), F.col("product_id"))).write.mode(
        "overwrite"
    ).option("parquet.block.row.count.limit", settings.row_group_rows).parquet(str(path))
    result = {key: int(value or 0) for key, value in observed.get.items()}
    if result["_rows"] != rows:
        raise ShardError(
            f"{path}: wrote {result['_rows']} rows, expected {rows} (bug: please report)"
        )
    return result


def build_manifest(
    root: Path,
    config: Config,
    settings: ShardConfig,
    fitted: dict[str, FittedTask],
    group: str | None,
    observed: dict[str, dict[str, int]],
    vocabulary: Vocabulary,
    image_dim: int | None,
    documents: int | None,
) -> dict[str, Any]:
    """The shard set's manifest (format `prodvec.shards/1`): everything a loader or a model
    needs without reading the data."""
    files = {split: describe_files(root / split) for split in SPLITS}
    tasks = []
    for entry in fitted.values():
        spec, kind = entry.spec, kind_of(entry.spec.kind)
        tasks.append(
            {
                "name": spec.name,
                "kind": spec.kind,
                "source": spec.source,
                "num_outputs": kind.num_outputs(entry),
                "labels": entry.labels,
                "counts": entry.counts,
                "stats": entry.stats,
                "pos_weight": entry.pos_weight,
                "idf": entry.idf,
                "columns": kind.column_names(spec.name),
                "labelled": {split: observed[split][spec.name] for split in SPLITS},
            }
        )
    vocabulary_file = root / VOCABULARY_FILE
    return {
        "format": FORMAT,
        "catalog": config.catalog.name,
        "group": group,
        "config_hash": config.digest(),
        "seed": split_seed(config),
        "split": settings.split.model_dump(),
        "splits": {split: observed[split]["_rows"] for split in SPLITS},
        "files": files,
        "schema": arrow_schema(files["train"], root),
        "vocabulary": {
            "path": VOCABULARY_FILE,
            "size": len(vocabulary) + 2,
            "words": len(vocabulary),
            "sha256": hashlib.sha256(vocabulary_file.read_bytes()).hexdigest(),
        },
        "pad_id": PAD_ID,
        "oov_id": OOV_ID,
        "max_len": dict(settings.text_fields),
        "text_fields": {
            name: {"ids": f"{name}_ids", "len": f"{name}_len"} for name in settings.text_fields
        },
        "image_features": None if image_dim is None else {"dim": image_dim},
        "subwords": None
        if documents is None
        else {
            "column": SUBWORDS_COLUMN,
            "terms": TITLE_TERMS,
            "documents": documents,
            **settings.subwords.model_dump(exclude={"enabled"}),
            "max_tokens": settings.text_fields["title"],
        },
        "tasks": tasks,
        "title_oov_rate": {
            split: observed[split]["_oov"] / max(observed[split]["_tokens"], 1) for split in SPLITS
        },
    }


def write_title_terms(spark: SparkSession, root: Path) -> None:
    """Document frequency of every word id and subword id over the shard set's titles (all
    splits: like the vocabulary, label-free statistics of the catalog), written beside the
    splits. The subword bag starts its weights at their IDF."""
    frame = spark.read.parquet(*(str(root / split) for split in SPLITS))
    parts = []
    for kind, column in (("word", "title_ids"), ("subword", SUBWORDS_COLUMN)):
        present = F.array_distinct(F.filter(F.col(column), lambda i: i > 0))
        counted = (frame.select(F.explode(present).alias("id")).groupBy("id").count()
                   .orderBy("id").collect())  # fmt: skip
        parts.append(
            pa.table(
                {
                    "kind": [kind] * len(counted),
                    "id": pa.array([row["id"] for row in counted], pa.int64()),
                    "df": pa.array([row["count"] for row in counted], pa.int64()),
                }
            )
        )
    pq.write_table(pa.concat_tables(parts), root / TITLE_TERMS)


def split_seed(config: Config) -> int:
    seed = config.shard.split.seed
    return config.seed if seed is None else seed


# ---------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------


def _image_dim(frame: DataFrame, config: Config) -> int | None:
    """The catalog's image feature length (the most common one), None when it has none."""
    if config.catalog.columns.image_features is None and not config.image_features.enabled:
        return None
    sizes = (
        frame.where(F.col("image_features").isNotNull())
        .groupBy(F.size("image_features").alias("dim"))
        .count()
        .orderBy(F.desc("count"), F.asc("dim"))
        .limit(1)
        .collect()
    )
    return sizes[0]["dim"] if sizes else None


def _split_counts(frame: DataFrame) -> dict[str, dict[str, int]]:
    """group -> split -> rows."""
    counts: dict[str, dict[str, int]] = {}
    for row in frame.groupBy("_group", "_split").count().collect():
        counts.setdefault(row["_group"], dict.fromkeys(SPLITS, 0))[row["_split"]] = row["count"]
    return counts


def run(spark: SparkSession, config: Config) -> StageResult:
    """Split, fit labels on train, encode and write every group's shard set, then publish."""
    settings = config.shard
    check_sources(settings.tasks)
    tasks = mapped_tasks(config.catalog, settings.tasks, "shard.tasks")
    by_name = {task.name: task for task in tasks}
    if settings.split.stratify_by and settings.split.stratify_by not in by_name:
        log.info("shard: the stratification task %s is left out: the split is unstratified",
                 settings.split.stratify_by)  # fmt: skip
    settings = settings.model_copy(update={
        "tasks": tasks, "split": settings.split.model_copy(update={
            "stratify_by": settings.split.stratify_by if settings.split.stratify_by in by_name
            else None})})  # fmt: skip
    check_corpus(config.outputs)
    vocabulary = Vocabulary.load(config.outputs.vocabulary)
    seed = split_seed(config)

    group = F.col("product_group") if settings.per_group else F.lit(_NO_GROUP)
    raws = [kind_of(task.kind).raw(task).alias(f"_raw_{task.name}") for task in settings.tasks]
    frame = read_clean(spark, config).select("*", group.alias("_group"), *raws)
    by = {task.name: task for task in settings.tasks}.get(settings.split.stratify_by or "")
    strata = kind_of(by.kind).stratum(by, raw_column(by)) if by else F.lit("")
    if settings.per_group:
        strata = F.concat_ws("\x1f", F.col("_group"), strata)
    frame = assign_split(frame, strata, settings.split.validation, settings.split.test, seed)
    frame = frame.persist(StorageLevel.MEMORY_AND_DISK)
    shared = spark.sparkContext.broadcast(vocabulary)
    out = config.outputs.shards
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}-{uuid.uuid4().hex[:8]}")
    try:
        counts = _split_counts(frame)
        if not counts:
            raise ShardError(f"the clean catalog of {config.catalog.name} has no rows")
        sizes = {name: sum(rows.values()) for name, rows in counts.items()}
        skipped = {
            name: n
            for name, n in sizes.items()
            if settings.per_group and n < settings.min_group_rows
        }
        groups = sorted(set(counts) - set(skipped))
        if not groups:
            raise ShardError(
                f"no product group has shard.min_group_rows={settings.min_group_rows} rows: {sizes}"
            )
        train = frame.where((F.col("_split") == "train") & F.col("_group").isin(groups))
        fitted = fit_tasks(train, settings.tasks, groups)
        for task in settings.tasks:
            if not any(fitted[name][task.name].train_labelled for name in groups):
                raise ShardError(
                    f"task '{task.name}': no train product has a label from "
                    f"'{task.source}' (check the source)"
                )
        image_dim = _image_dim(frame, config)
        manifests, observed = {}, {}
        for name in groups:
            root = staging / f"group={name}" if settings.per_group else staging
            encoded = encode(
                frame.where(F.col("_group") == name), settings, fitted[name], shared, image_dim
            )
            observed[name] = {
                split: write_split(
                    encoded.where(F.col("_split") == split),
                    root / split,
                    counts[name][split],
                    settings,
                    seed,
                    settings.tasks,
                )
                for split in SPLITS
            }
            shutil.copyfile(config.outputs.vocabulary, root / VOCABULARY_FILE)
            documents = None  # the titles the document frequencies count: every row
            if settings.subwords.enabled:
                write_title_terms(spark, root)
                documents = sum(observed[name][split]["_rows"] for split in SPLITS)
            manifests[name] = build_manifest(
                root,
                config,
                settings,
                fitted[name],
                name if settings.per_group else None,
                observed[name],
                vocabulary,
                image_dim,
                documents,
            )
            (root / MANIFEST).write_text(json.dumps(manifests[name], indent=1))
        if settings.per_group:
            index = {
                "format": FORMAT,
                "catalog": config.catalog.name,
                "config_hash": config.digest(),
                "groups": {
                    name: {"path": f"group={name}", "splits": manifests[name]["splits"]}
                    for name in groups
                },
                "skipped_groups": skipped,
            }
            (staging / MANIFEST).write_text(json.dumps(index, indent=1))
        publish_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shared.destroy()
        frame.unpersist()

    def total(split: str, key: str) -> int:
        return sum(seen[split][key] for seen in observed.values())

    rows = {split: total(split, "_rows") for split in SPLITS}
    rows["skipped"] = sum(skipped.values())
    metrics = {
        "groups": float(len(groups)),
        "title_oov_rate": total("train", "_oov") / max(total("train", "_tokens"), 1),
    }
    for task in settings.tasks:
        metrics[f"labelled_{task.name}"] = total("train", task.name) / max(rows["train"], 1)
    log.info("shard: %s rows in %d shard set(s); skipped groups %s", rows, len(groups), skipped)
    if mlflow.active_run():
        for name, manifest in manifests.items():
            mlflow.log_dict(manifest, f"manifests/{name or 'all'}.json")
    return StageResult(
        rows=rows, outputs={"shards": str(out), "manifest": str(out / MANIFEST)}, metrics=metrics
    )
