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
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pyarrow.parquet as pq
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Observation, SparkSession, Window
from pyspark.sql import functions as F

from pipelines.clean import CLEAN_SCHEMA, read_clean
from pipelines.config import Config, ShardConfig, TaskSpec
from pipelines.errors import ProdvecError
from pipelines.outputs import publish_folder
from pipelines.stages import StageResult
from pipelines.tokenizer import (
    OOV_ID,
    PAD_ID,
    VOCABULARY_FILE,
    Vocabulary,
    encode_column,
    tokens,
)

if TYPE_CHECKING:
    from pyspark import Broadcast

log = logging.getLogger(__name__)

FORMAT = "prodvec.shards/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "validation", "test")
OTHER = "other"  # the multiclass class of every value outside the top N
NODE_SEPARATOR = ">"  # category node names: "a", "a>b", "a>b>c"
_LEVEL = re.compile(r"category_path\[([0-9]+)\]")
_NO_GROUP = ""  # the single group when shards are not per product group


class ShardError(ProdvecError):
    """Shards are missing, empty, inconsistent with their manifest, or cannot be built."""


def vocabulary_path(config: Config) -> Path:
    """Where the corpus stage writes the word2vec vocabulary."""
    return config.stage_dir("corpus") / VOCABULARY_FILE


# ---------------------------------------------------------------------------
# Raw labels (Spark columns)
# ---------------------------------------------------------------------------


def check_sources(tasks: list[TaskSpec]) -> None:
    """Fail before any Spark work when a task names a column the clean catalog lacks (the
    config already checked the form of attribute and category sources)."""
    scalar = {f.name for f in CLEAN_SCHEMA.fields} - {"category_path", "bullets", "attributes",
                                                     "image_features", "title_raw"}
    for task in tasks:
        structured = task.source.startswith(("attributes.", "category_path"))
        if not structured and task.source not in scalar:
            raise ShardError(f"task '{task.name}': source '{task.source}' is not a clean-catalog "
                             f"column; use one of {sorted(scalar)}, attributes.<key>, "
                             "category_path[<level>] or category_path")


def path_nodes(max_depth: int | None) -> Column:
    """Every node on the category path ("a", "a>b", "a>b>c"); null when there is no path."""
    path = F.col("category_path")
    if max_depth is not None:
        path = F.slice(path, 1, max_depth)
    nodes = F.transform(F.sequence(F.lit(1), F.size(path)),
                        lambda depth: F.array_join(F.slice(path, 1, depth), NODE_SEPARATOR))
    return F.when(F.size(path) > 0, nodes)


def raw_label(task: TaskSpec) -> Column:
    """The task's raw value per product: a trimmed string, a finite double (regression and
    threshold tasks), the node array (multilabel) or the token array (decoding); null or
    empty when the product has none."""
    if task.kind == "multilabel":
        return path_nodes(task.max_depth)
    if task.kind == "decoding":
        return tokens(task.source)
    if task.source.startswith("attributes."):
        value = F.try_element_at(F.col("attributes"), F.lit(task.source.split(".", 1)[1]))
    elif match := _LEVEL.fullmatch(task.source):
        value = F.try_element_at(F.col("category_path"), F.lit(int(match[1]) + 1))
    else:
        value = F.col(task.source)
    if task.kind == "regression" or task.threshold is not None:
        number = value.try_cast("double")
        return F.when(F.abs(number) < F.lit(math.inf), number)  # not NaN, not infinite
    text = F.trim(value.cast("string"))
    return F.when(text != "", text)


def binary_label(task: TaskSpec, raw: Column) -> Column:
    """1/0 as a boolean; null stays null (masked)."""
    if task.threshold is not None:
        return raw >= F.lit(task.threshold)
    return F.lower(raw).isin([value.lower() for value in task.positive or []])


def regression_input(task: TaskSpec, raw: Column) -> Column:
    """The value that is standardised: log1p when asked (negative values have no label)."""
    if not task.log:
        return raw
    return F.when(raw >= 0, F.log1p(raw))


def stratum(task: TaskSpec, raw: Column) -> Column:
    """The split stratum of one product: its class, its 0/1 label or its deepest node."""
    if task.kind == "multilabel":
        return F.element_at(raw, -1)
    if task.kind == "binary":
        return binary_label(task, raw).cast("string")
    return raw


# ---------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------


def assign_split(frame: DataFrame, strata: Column, validation: float, test: float,
                 seed: int) -> DataFrame:
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
    split = (F.when(position < validation, F.lit("validation"))
             .when(position < validation + test, F.lit("test"))
             .otherwise(F.lit("train")))
    return frame.join(groups.select("title", split.alias("_split")), "title")


# ---------------------------------------------------------------------------
# Label fitting (train split only)
# ---------------------------------------------------------------------------


@dataclass
class FittedTask:
    """What one task learned from one group's train split; the manifest entry of the task."""

    spec: TaskSpec
    labels: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # train products per label
    stats: dict[str, float | bool] | None = None  # regression: mean, std, log
    pos_weight: list[float] | None = None  # binary (one value), multilabel (one per node)
    idf: list[float] | None = None  # decoding, one per term
    train_labelled: int = 0

    @property
    def num_outputs(self) -> int:
        return len(self.labels) if self.spec.kind in ("multiclass", "multilabel", "decoding") else 1


def _clip_weight(negatives: float, positives: float, limit: float) -> float:
    """negatives / positives (BCE pos_weight), clipped to [1 / limit, limit]."""
    ratio = negatives / positives if positives else limit
    return float(min(max(ratio, 1.0 / limit), limit))


def _fit_scalars(train: DataFrame, tasks: list[TaskSpec], fitted: dict[str, dict[str, FittedTask]]
                 ) -> None:
    """Labelled products per task, binary positives and regression mean/std per group: one
    aggregation for all tasks (decoding counts its documents itself)."""
    aggregates: list[Column] = []
    for task in tasks:
        raw = F.col(f"_raw_{task.name}")
        if task.kind == "binary":
            aggregates.append(F.count_if(binary_label(task, raw)).alias(f"{task.name}__pos"))
        elif task.kind == "regression":
            raw = regression_input(task, raw)
            aggregates += [F.mean(raw).alias(f"{task.name}__mean"),
                           F.stddev_samp(raw).alias(f"{task.name}__std")]
        if task.kind != "decoding":
            aggregates.append(F.count(raw).alias(f"{task.name}__n"))
    if not aggregates:
        return
    for row in train.groupBy("_group").agg(*aggregates).collect():
        for task in tasks:
            entry = fitted[row["_group"]][task.name]
            if task.kind == "decoding":
                continue
            entry.train_labelled = row[f"{task.name}__n"]
            if task.kind == "binary":
                positives = row[f"{task.name}__pos"]
                entry.labels, entry.counts = ["true"], [positives]
                entry.pos_weight = [_clip_weight(entry.train_labelled - positives, positives,
                                                 task.max_pos_weight)]
            elif task.kind == "regression":
                std = row[f"{task.name}__std"]
                entry.stats = {"mean": float(row[f"{task.name}__mean"] or 0.0),
                               "std": float(std) if std else 1.0, "log": task.log}


def _tagged(name: str) -> Callable[[Column], Column]:
    """node -> struct(task, value), for F.transform (which reads a lambda's arity, so the
    task name cannot be a default argument)."""
    tag = F.lit(name).alias("task")
    return lambda node: F.struct(tag, node.alias("value"))


def _fit_categories(train: DataFrame, tasks: list[TaskSpec],
                    fitted: dict[str, dict[str, FittedTask]]) -> None:
    """Multiclass top-N values and multilabel nodes per group, in one exploded aggregation.
    Only the kept values reach the driver: the top N per task, nodes with min_count.
    Runs after `_fit_scalars` (the "other" count needs the labelled count)."""
    items: list[Column] = []
    keep: list[Column] = []
    rank = F.col("_rank")
    for task in tasks:
        raw = F.col(f"_raw_{task.name}")
        if task.kind == "multiclass":
            items.append(F.array(F.struct(F.lit(task.name).alias("task"), raw.alias("value"))))
            keep.append((F.col("task") == task.name) & (rank <= task.top_n))
        elif task.kind == "multilabel":
            items.append(F.coalesce(F.transform(raw, _tagged(task.name)), F.array()))
            keep.append((F.col("task") == task.name) & (F.col("count") >= task.min_count))
    if not items:
        return
    labelled = train.select("_group", F.explode(F.concat(*items)).alias("item")) \
        .where(F.col("item.value").isNotNull()).select("_group", "item.task", "item.value")
    counts = labelled.groupBy("_group", "task", "value").count()
    order = Window.partitionBy("_group", "task").orderBy(F.desc("count"), F.asc("value"))
    kept = counts.withColumn("_rank", F.row_number().over(order)) \
        .where(reduce(lambda a, b: a | b, keep)).orderBy("_group", "task", "_rank").collect()
    for row in kept:
        entry = fitted[row["_group"]][row["task"]]
        entry.labels.append(row["value"])
        entry.counts.append(row["count"])
    for entries in fitted.values():
        for task in tasks:
            entry = entries[task.name]
            if task.kind == "multiclass":
                entry.labels.append(OTHER)
                entry.counts.append(entry.train_labelled - sum(entry.counts))
            elif task.kind == "multilabel":  # nodes by name: a parent before its children
                pairs = sorted(zip(entry.labels, entry.counts, strict=True))
                entry.labels, entry.counts = [p[0] for p in pairs], [p[1] for p in pairs]
                entry.pos_weight = [_clip_weight(entry.train_labelled - c, c, task.max_pos_weight)
                                    for c in entry.counts]


def _fit_decoding(train: DataFrame, task: TaskSpec, fitted: dict[str, dict[str, FittedTask]]
                  ) -> None:
    """TF-IDF vocabulary: the `vocab_size` terms in most train documents per group (ties by
    term), IDF = ln((1 + N) / (1 + df)) + 1 over the group's N train documents (sklearn's
    smooth IDF)."""
    docs = train.select("_group", F.array_distinct(F.col(f"_raw_{task.name}")).alias("terms")) \
        .where(F.size("terms") > 0)
    totals = {row["_group"]: row["count"] for row in docs.groupBy("_group").count().collect()}
    frequency = docs.select("_group", F.explode("terms").alias("term")) \
        .groupBy("_group", "term").count()
    order = Window.partitionBy("_group").orderBy(F.desc("count"), F.asc("term"))
    top = frequency.withColumn("_rank", F.row_number().over(order)) \
        .where(F.col("_rank") <= task.vocab_size).orderBy("_group", "_rank").collect()
    for row in top:
        entry = fitted[row["_group"]][task.name]
        entry.labels.append(row["term"])
        entry.counts.append(row["count"])
    for group, entries in fitted.items():
        entry, n_docs = entries[task.name], totals.get(group, 0)
        entry.train_labelled = n_docs
        entry.idf = [math.log((1 + n_docs) / (1 + df)) + 1 for df in entry.counts]


def fit_tasks(train: DataFrame, tasks: list[TaskSpec], groups: list[str]
              ) -> dict[str, dict[str, FittedTask]]:
    """group -> task name -> what the train split gives it (labels, stats, weights, IDF)."""
    fitted = {group: {task.name: FittedTask(task) for task in tasks} for group in groups}
    _fit_scalars(train, tasks, fitted)
    _fit_categories(train, tasks, fitted)
    for task in tasks:
        if task.kind == "decoding":
            _fit_decoding(train, task, fitted)
    return fitted


# ---------------------------------------------------------------------------
# Encoding one group's rows into shard columns
# ---------------------------------------------------------------------------


def _lookup(labels: list[str]) -> Column:
    """A literal map label -> index: two array literals (one Py4J call each, however many
    labels), which Spark folds into one map constant."""
    if not labels:
        return F.create_map().cast("map<string,int>")
    keys = F.lit(np.array(labels, dtype=np.str_))
    return F.map_from_arrays(keys, F.lit(np.arange(len(labels), dtype=np.int32)))


def _tfidf(terms: Column, fitted: FittedTask) -> tuple[Column, Column]:
    """(indices, values) of the L2-normalised TF-IDF vector of a token array, ascending
    indices; both null when no token is in the vocabulary. Raw counts as TF (sklearn's)."""
    index = _lookup(fitted.labels)
    idf = F.lit(np.array(fitted.idf or [0.0], dtype=np.float64))
    found = F.filter(F.transform(terms, lambda term: F.try_element_at(index, term)),
                     lambda i: i.isNotNull())
    unique = F.array_sort(F.array_distinct(found))
    weights = F.transform(unique, lambda i: F.size(F.filter(found, lambda j: j == i))
                          * F.element_at(idf, i + 1))
    norm = F.sqrt(F.aggregate(weights, F.lit(0.0), lambda acc, w: acc + w * w))
    values = F.transform(weights, lambda w: (w / norm).cast("float"))
    present = F.size(unique) > 0
    return F.when(present, unique), F.when(present, values)


def task_columns(fitted: FittedTask) -> list[Column]:
    """The shard column(s) of one task; null = no label (mask)."""
    task, raw = fitted.spec, F.col(f"_raw_{fitted.spec.name}")
    if task.kind == "multiclass":
        other = len(fitted.labels) - 1
        index = F.coalesce(F.try_element_at(_lookup(fitted.labels[:-1]), raw), F.lit(other))
        return [F.when(raw.isNotNull(), index).cast("int").alias(task.name)]
    if task.kind == "binary":
        return [binary_label(task, raw).alias(task.name)]
    if task.kind == "regression":
        stats = fitted.stats or {"mean": 0.0, "std": 1.0}
        value = (regression_input(task, raw) - F.lit(stats["mean"])) / F.lit(stats["std"])
        return [value.cast("float").alias(task.name)]
    if task.kind == "multilabel":
        index = _lookup(fitted.labels)
        found = F.filter(F.transform(raw, lambda node: F.try_element_at(index, node)),
                         lambda i: i.isNotNull())
        return [F.when(F.size(found) > 0, F.array_sort(found)).alias(task.name)]
    indices, values = _tfidf(raw, fitted)
    return [indices.alias(f"{task.name}_idx"), values.alias(f"{task.name}_val")]


def text_column(name: str) -> Column:
    """The text of a field as one string (bullets joined), for the shared tokenizer."""
    return F.array_join(F.col(name), " ") if name == "bullets" else F.col(name)


def encode(frame: DataFrame, settings: ShardConfig, fitted: dict[str, FittedTask],
           vocabulary: Broadcast[Vocabulary], image_dim: int | None) -> DataFrame:
    """One group's rows -> the shard schema: product_id, ids + length per text field, image
    features, one (or two, decoding) columns per task, and `_split`."""
    columns: list[Column] = [F.col("product_id"), F.col("_split")]
    for name, max_len in settings.text_fields.items():
        words = tokens(text_column(name))
        columns += [encode_column(words, vocabulary, max_len).alias(f"{name}_ids"),
                    F.greatest(F.least(F.size(words), F.lit(max_len)), F.lit(1))
                    .cast("int").alias(f"{name}_len")]
    if image_dim is not None:
        features = F.col("image_features")
        missing = features.isNull() | (F.size(features) != image_dim)
        columns += [F.when(missing, F.array_repeat(F.lit(0.0).cast("float"), image_dim))
                    .otherwise(features).alias("image_features"), missing.alias("image_missing")]
    for entry in fitted.values():
        columns += task_columns(entry)
    return frame.select(*columns)


# ---------------------------------------------------------------------------
# Writing and the manifest
# ---------------------------------------------------------------------------


def describe_files(split_dir: Path) -> list[dict[str, Any]]:
    """Every Parquet file of a split folder, in name order: path (relative to the shard set),
    rows, and rows per row group (the loader's units)."""
    entries = []
    for path in sorted(split_dir.glob("*.parquet")):
        metadata = pq.ParquetFile(path).metadata
        entries.append({
            "path": f"{split_dir.name}/{path.name}",
            "rows": metadata.num_rows,
            "row_groups": [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)],
        })
    return entries


def arrow_schema(files: list[dict[str, Any]], root: Path) -> list[dict[str, str]]:
    """name and Arrow type of every shard column (from the first file's footer)."""
    if not files:
        return []
    schema = pq.read_schema(root / files[0]["path"])
    return [{"name": f.name, "type": str(f.type)} for f in schema]


def write_split(part: DataFrame, path: Path, rows: int, settings: ShardConfig, seed: int,
                tasks: list[TaskSpec]) -> dict[str, int]:
    """Write one split in seeded random row order (files of at most rows_per_file rows, row
    groups of row_group_rows) and return what was observed while writing: rows, title
    tokens, OOV title tokens and labelled rows per task."""
    observed = Observation(f"shard-{uuid.uuid4().hex[:8]}")
    labelled = [F.count(F.col(t.name if t.kind != "decoding" else f"{t.name}_idx")).alias(t.name)
                for t in tasks]
    ids = F.slice(F.col("title_ids"), 1, F.col("title_len"))
    metrics = [F.count(F.lit(1)).alias("_rows"), F.sum("title_len").alias("_tokens"),
               F.sum(F.size(F.filter(ids, lambda i: i == OOV_ID))).alias("_oov"), *labelled]
    files = max(1, math.ceil(rows / settings.rows_per_file))
    part.drop("_split").observe(observed, *metrics) \
        .repartition(files, F.xxhash64(F.lit(seed), F.col("product_id"))) \
        .sortWithinPartitions(F.xxhash64(F.lit(seed + 1), F.col("product_id"))) \
        .write.mode("overwrite").option("parquet.block.row.count.limit", settings.row_group_rows) \
        .parquet(str(path))
    result = {key: int(value or 0) for key, value in observed.get.items()}
    if result["_rows"] != rows:
        raise ShardError(f"{path}: wrote {result['_rows']} rows, expected {rows} (bug: please report)")
    return result


def build_manifest(root: Path, config: Config, fitted: dict[str, FittedTask], group: str | None,
                   observed: dict[str, dict[str, int]], vocabulary: Vocabulary,
                   image_dim: int | None) -> dict[str, Any]:
    """The shard set's manifest (format `prodvec.shards/1`): everything a loader or a model
    needs without reading the data."""
    settings = config.shard
    files = {split: describe_files(root / split) for split in SPLITS}
    tasks = []
    for entry in fitted.values():
        spec = entry.spec
        tasks.append({
            "name": spec.name, "kind": spec.kind, "source": spec.source,
            "num_outputs": entry.num_outputs, "labels": entry.labels, "counts": entry.counts,
            "stats": entry.stats, "pos_weight": entry.pos_weight, "idf": entry.idf,
            "columns": [f"{spec.name}_idx", f"{spec.name}_val"] if spec.kind == "decoding"
            else [spec.name],
            "labelled": {split: observed[split][spec.name] for split in SPLITS},
        })
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
        "vocabulary": {"path": VOCABULARY_FILE, "size": len(vocabulary) + 2, "words": len(vocabulary),
                       "sha256": hashlib.sha256(vocabulary_file.read_bytes()).hexdigest()},
        "pad_id": PAD_ID,
        "oov_id": OOV_ID,
        "max_len": dict(settings.text_fields),
        "text_fields": {name: {"ids": f"{name}_ids", "len": f"{name}_len"}
                        for name in settings.text_fields},
        "image_features": None if image_dim is None else {"dim": image_dim},
        "tasks": tasks,
        "title_oov_rate": {split: observed[split]["_oov"] / max(observed[split]["_tokens"], 1)
                           for split in SPLITS},
    }


def split_seed(config: Config) -> int:
    seed = config.shard.split.seed
    return config.seed if seed is None else seed


def load_manifest(shard_dir: Path) -> dict[str, Any]:
    """A shard set's manifest; fails clearly when there is none or it indexes groups."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"no shard manifest at {path}: run `prodvec shard` first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if "groups" in manifest:
        raise ShardError(f"{path} indexes per-group shard sets; open one of "
                         f"{[str(Path(shard_dir) / g['path']) for g in manifest['groups'].values()]}")
    return manifest


def shard_sets(shard_dir: Path) -> dict[str | None, Path]:
    """group -> shard set folder (one entry, key None, when shards are not per group)."""
    manifest = json.loads((Path(shard_dir) / MANIFEST).read_text())
    if "groups" not in manifest:
        return {None: Path(shard_dir)}
    return {group: Path(shard_dir) / entry["path"] for group, entry in manifest["groups"].items()}


# ---------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------


def _image_dim(frame: DataFrame, config: Config) -> int | None:
    """The catalog's image feature length (the most common one), None when it has none."""
    if config.catalog.columns.image_features is None and not config.image_features.enabled:
        return None
    sizes = frame.where(F.col("image_features").isNotNull()) \
        .groupBy(F.size("image_features").alias("dim")).count() \
        .orderBy(F.desc("count"), F.asc("dim")).limit(1).collect()
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
    vocabulary_file = vocabulary_path(config)
    if not vocabulary_file.is_file():
        raise ShardError(f"no vocabulary at {vocabulary_file}: run `prodvec corpus` first")
    vocabulary = Vocabulary.load(vocabulary_file)
    seed = split_seed(config)

    group = F.col("product_group") if settings.per_group else F.lit(_NO_GROUP)
    raws = [raw_label(task).alias(f"_raw_{task.name}") for task in settings.tasks]
    frame = read_clean(spark, config).select("*", group.alias("_group"), *raws)
    by = {task.name: task for task in settings.tasks}.get(settings.split.stratify_by or "")
    strata = stratum(by, F.col(f"_raw_{by.name}")) if by else F.lit("")
    if settings.per_group:
        strata = F.concat_ws("\x1f", F.col("_group"), strata)
    frame = assign_split(frame, strata, settings.split.validation, settings.split.test, seed)
    frame = frame.persist(StorageLevel.MEMORY_AND_DISK)
    shared = spark.sparkContext.broadcast(vocabulary)
    out = config.stage_dir("shard")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}-{uuid.uuid4().hex[:8]}")
    try:
        counts = _split_counts(frame)
        if not counts:
            raise ShardError(f"the clean catalog of {config.catalog.name} has no rows")
        sizes = {name: sum(rows.values()) for name, rows in counts.items()}
        skipped = {name: n for name, n in sizes.items()
                   if settings.per_group and n < settings.min_group_rows}
        groups = sorted(set(counts) - set(skipped))
        if not groups:
            raise ShardError(f"no product group has shard.min_group_rows="
                             f"{settings.min_group_rows} rows: {sizes}")
        train = frame.where((F.col("_split") == "train") & F.col("_group").isin(groups))
        fitted = fit_tasks(train, settings.tasks, groups)
        for task in settings.tasks:
            if not any(fitted[name][task.name].train_labelled for name in groups):
                raise ShardError(f"task '{task.name}': no train product has a label from "
                                 f"'{task.source}' (check the source)")
        image_dim = _image_dim(frame, config)
        manifests, observed = {}, {}
        for name in groups:
            root = staging / f"group={name}" if settings.per_group else staging
            encoded = encode(frame.where(F.col("_group") == name), settings, fitted[name],
                             shared, image_dim)
            observed[name] = {
                split: write_split(encoded.where(F.col("_split") == split), root / split,
                                   counts[name][split], settings, seed, settings.tasks)
                for split in SPLITS
            }
            shutil.copyfile(vocabulary_file, root / VOCABULARY_FILE)
            manifests[name] = build_manifest(root, config, fitted[name],
                                             name if settings.per_group else None,
                                             observed[name], vocabulary, image_dim)
            (root / MANIFEST).write_text(json.dumps(manifests[name], indent=1))
        if settings.per_group:
            index = {"format": FORMAT, "catalog": config.catalog.name,
                     "config_hash": config.digest(),
                     "groups": {name: {"path": f"group={name}", "splits": manifests[name]["splits"]}
                                for name in groups},
                     "skipped_groups": skipped}
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
    metrics = {"groups": float(len(groups)),
               "title_oov_rate": total("train", "_oov") / max(total("train", "_tokens"), 1)}
    for task in settings.tasks:
        metrics[f"labelled_{task.name}"] = total("train", task.name) / max(rows["train"], 1)
    log.info("shard: %s rows in %d shard set(s); skipped groups %s", rows, len(groups), skipped)
    if mlflow.active_run():
        for name, manifest in manifests.items():
            mlflow.log_dict(manifest, f"manifests/{name or 'all'}.json")
    return StageResult(rows=rows, outputs={"shards": str(out), "manifest": str(out / MANIFEST)},
                       metrics=metrics)
