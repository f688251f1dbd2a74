"""The embedding table: one Delta Lake table of product embeddings, one version per embed run.

Commit path, offline-safe (no delta-spark jar): Spark executors write plain Parquet into a
fresh folder under the table root (`data/<stamp>-<app>-<uuid>/`), the driver checks every
file against the contract (footer schema and embedding dimension per file; nulls, NaN/inf,
dimension per row and unique ids from metrics gathered while writing), then delta-rs commits
all of them as ONE Delta version. Nothing is visible before that commit; a job that dies
leaves unreferenced files, which `vacuum` removes.

Idempotency: each commit records a Delta app transaction (`app_id`). A run whose app_id the
table already holds writes nothing and commits nothing.

Incremental refresh is file-level copy-on-write: files holding a re-embedded or deleted
product are replaced by a copy of their other rows; every other file is carried by
reference. Its cost is one read of the `product_id` column of the table (to find those
files) plus a rewrite of the files touched, which approaches the whole table once changes
are spread over more products than there are files.

Layout: no partition columns. Rows are hash-distributed on product_id by one shuffle (AQE
sizes the write partitions, `rows_per_file` caps each file). Partitions would put a column in
every reader's schema and only prune for readers that compute the writer's hash; copy-on-write
is per file, so buckets would not make a refresh cheaper, only leave a small file per touched
bucket per run.

Commits use no automatic rebase (max_commit_retries=0): a version committed by someone else
between our read and our commit fails ours, and we re-plan on the new version, so a full
refresh never keeps files appended concurrently and two copy-on-writes never both copy a row.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import reduce
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable, Schema
from deltalake.exceptions import CommitFailedError, DeltaError
from deltalake.transaction import (
    AddAction,
    CommitProperties,
    RemoveAction,
    Transaction,
    create_table_with_add_actions,
)
from pyspark.sql import Column, DataFrame, Observation, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.config import Config
from pipelines.errors import TableError

log = logging.getLogger(__name__)

Mode = Literal["full", "incremental"]
Writer = Literal["deltalake", "delta-spark"]

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
HASHES_SCHEMA = T.StructType([SPARK_SCHEMA[name] for name in
                              ("product_id", "content_hash", "model_name", "model_version")])
_ID_SCHEMA = T.StructType([SPARK_SCHEMA["product_id"]])
_CONTRACT_TYPES = {"product_id": "string", "embedding": "list<float>", "model_name": "string",
                   "model_version": "string", "content_hash": "string",
                   "embedded_at": "timestamp[us, tz=UTC]"}
_STAT_COLUMNS = ("product_id", "model_name", "model_version", "content_hash")
_DEFAULT_RETENTION_HOURS = 168


@dataclass(frozen=True)
class Snapshot:
    """One version of the table: its data files (absolute URIs) and row count."""

    version: int
    files: tuple[str, ...]
    rows: int


@dataclass(frozen=True)
class RefreshPlan:
    """What an embed run must do: `to_embed` (catalog rows to run the model on) and, for an
    incremental refresh, `deleted` (product ids to drop); both lazy."""

    mode: Mode
    reason: str
    to_embed: DataFrame
    deleted: DataFrame | None


@dataclass(frozen=True)
class CommitResult:
    """What a commit did; `committed` is False when the app_id was already in the table."""

    version: int
    committed: bool
    mode: Mode
    rows: int  # rows of the resulting version
    embedded_rows: int  # rows written from the given embeddings
    carried_rows: int  # unchanged rows kept from the previous version (by reference or copied)
    rewritten_rows: int  # the part of carried_rows copied out of files that had to go
    removed_rows: int  # rows of the previous version replaced or deleted
    files_added: int
    files_removed: int
    attempts: int


@dataclass(frozen=True)
class _File:
    path: str  # relative to the table root, as the Delta log holds it
    size: int
    mtime_ms: int
    rows: int
    stats: str


def table_path(config: Config) -> str:
    """`embed.table_path`, or `<workdir>/<catalog>/embed/table`."""
    return config.embed.table_path or str(config.stage_dir("embed") / "table")


def _uri(path: str | Path) -> str:
    text = str(path)
    if "://" in text:
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())


def _key(uri: str) -> str:
    """A URI without its scheme, so Spark's `file:/x` and `s3a://b/x` match `/x` and `s3://b/x`."""
    parsed = urlparse(uri)
    if len(parsed.scheme) > 1:
        return parsed.netloc + unquote(parsed.path)
    return uri


class EmbeddingTable:
    """The product-embedding Delta table at `path`: read, plan a refresh, commit a version."""

    def __init__(self, path: str | Path, *, rows_per_file: int = 400_000,
                 writer: Writer = "deltalake", max_attempts: int = 5) -> None:
        self.uri = _uri(path)
        self.rows_per_file = rows_per_file
        self.writer = writer
        self.max_attempts = max_attempts
        self._fs, self._fs_root = pafs.FileSystem.from_uri(self.uri)

    @classmethod
    def from_config(cls, config: Config) -> EmbeddingTable:
        return cls(table_path(config), rows_per_file=config.embed.rows_per_file,
                   writer=config.embed.writer)

    # ---- reading -------------------------------------------------------------------------

    def exists(self) -> bool:
        return DeltaTable.is_deltatable(self.uri)

    def version(self) -> int | None:
        """The latest version, None before the first commit."""
        table = self._table()
        return None if table is None else table.version()

    def snapshot(self, version: int | None = None) -> Snapshot:
        table = self._table(version)
        if table is None:
            raise TableError(f"{self.uri} is not a Delta table yet (nothing committed)")
        files = self._files(table)
        return Snapshot(table.version(), tuple(self._abs(f.path) for f in files),
                        sum(f.rows for f in files))

    def read_spark(self, spark: SparkSession, version: int | None = None) -> DataFrame:
        """A version as plain Parquet of its files: needs no delta-spark jar."""
        files = self.snapshot(version).files if self.exists() or version is not None else ()
        if not files:
            return spark.createDataFrame([], SPARK_SCHEMA)
        return spark.read.schema(SPARK_SCHEMA).parquet(*files)

    def current_hashes(self, spark: SparkSession) -> DataFrame:
        """(product_id, content_hash, model_name, model_version) of the latest version."""
        return self.read_spark(spark).select(*HASHES_SCHEMA.names)

    def commit_info(self, version: int | None = None) -> dict[str, Any]:
        """The prodvec metadata (model, run, config hash, counts) a commit recorded."""
        table = self._table()
        if table is None:
            raise TableError(f"{self.uri} is not a Delta table yet (nothing committed)")
        wanted = table.version() if version is None else version
        for entry in table.history():
            if entry.get("version") == wanted:
                return json.loads(entry.get("userMetadata") or "{}")
        raise TableError(f"{self.uri} has no version {wanted} in its history")

    # ---- planning ------------------------------------------------------------------------

    def plan_refresh(self, spark: SparkSession, catalog: DataFrame, *, model_name: str,
                     model_version: str) -> RefreshPlan:
        """Compare the catalog (product_id, content_hash, ...) with the table: the same model
        re-embeds new and changed products only; a new model or no table means a full refresh."""
        missing = {"product_id", "content_hash"} - set(catalog.columns)
        if missing:
            raise TableError(f"the catalog lacks {sorted(missing)} (has {catalog.columns})")
        table = self._table()
        if table is None:
            return RefreshPlan("full", "no table yet", catalog, None)
        others = self._models(spark, table) - {(model_name, model_version)}
        if others:
            reason = f"the table holds embeddings of {_names(others)}"
            return RefreshPlan("full", reason, catalog, None)
        current = self.current_hashes(spark)
        to_embed = catalog.join(current.select("product_id", "content_hash"),
                                ["product_id", "content_hash"], "left_anti")
        deleted = current.select("product_id").join(catalog.select("product_id"), "product_id",
                                                    "left_anti")
        return RefreshPlan("incremental", f"same model {model_name} v{model_version}", to_embed,
                           deleted)

    # ---- committing ----------------------------------------------------------------------

    def commit(
        self,
        data: DataFrame | Sequence[str | Path],
        *,
        app_id: str,
        run_id: str,
        model_uri: str,
        model_name: str,
        model_version: str,
        config_hash: str,
        mode: Mode,
        dimension: int,
        deleted: DataFrame | None = None,
        before_commit: Callable[[list[str]], None] | None = None,
    ) -> CommitResult:
        """Commit embeddings as ONE new version.

        `data`: a DataFrame with product_id, content_hash, embedding (array<float>) and
        optionally model_name, model_version, embedded_at (filled in when absent, checked
        when present); other columns are ignored. Or Parquet files already written under the
        table root, committed as they are. `mode="full"`: the version holds exactly `data`.
        `mode="incremental"`: rows of `data` replace rows with the same product_id, ids in
        `deleted` leave, everything else is carried. `before_commit` sees the files about to
        be committed after every check (tests raise there to simulate a crash).
        """
        if mode not in ("full", "incremental"):
            raise TableError(f"mode must be 'full' or 'incremental', got {mode!r}")
        if mode == "full" and deleted is not None:
            raise TableError("a full refresh replaces every row: 'deleted' is for incremental")
        spark = data.sparkSession if isinstance(data, DataFrame) else SparkSession.active()
        if self.writer == "delta-spark":
            _require_delta_spark(spark)
        table = self._table()
        if table is not None and table.transaction_version(app_id) is not None:
            log.info("embedding table %s: app %s already committed, nothing to do", self.uri, app_id)
            return self._skipped(table, mode)
        if mode == "incremental" and table is not None:
            self._check_models(spark, table, model_name, model_version)
        model = (model_name, model_version)
        if isinstance(data, DataFrame):
            staging: str | None = self._staging_folder(app_id)
            embedded = self._stage(data, f"{staging}/embedded", dimension, model)
        else:
            staging = None
            embedded = self._adopt([self._relative(str(p)) for p in data], spark, dimension,
                                   model)
        meta = {"app_id": app_id, "run_id": run_id, "model_uri": model_uri,
                "model_name": model_name, "model_version": model_version,
                "config_hash": config_hash, "mode": mode, "dimension": dimension,
                "writer": self.writer}
        if self.writer == "delta-spark":
            return self._commit_native(spark, embedded, deleted, mode, meta, staging)
        return self._commit_deltalake(spark, embedded, deleted, mode, meta, staging,
                                      dimension, before_commit)

    def _commit_deltalake(self, spark: SparkSession, embedded: list[_File],
                          deleted: DataFrame | None, mode: Mode, meta: dict[str, Any],
                          staging: str | None, dimension: int,
                          before_commit: Callable[[list[str]], None] | None) -> CommitResult:
        """Plan against the latest version and commit; when another commit lands first,
        drop what this attempt copied and plan again on the new version."""
        staging = staging or self._staging_folder(meta["app_id"])
        app_id = meta["app_id"]
        for attempt in range(1, self.max_attempts + 1):
            table = self._table()
            if table is not None and table.transaction_version(app_id) is not None:
                # A twin run with the same app_id won: ours never committed, so its files go.
                self._delete_folder(staging)
                return self._skipped(table, mode, attempt)
            current = self._files(table) if table is not None else []
            if mode == "full":
                removed, rewritten = current, []
            else:
                try:  # a refusal here comes before any commit: our files can go
                    if table is not None:
                        self._check_models(spark, table, meta["model_name"],
                                           meta["model_version"])
                    removed, rewritten = self._copy_on_write(
                        spark, current, embedded, deleted, f"{staging}/carried-{attempt}",
                        dimension)
                except TableError:
                    self._delete_folder(staging)
                    raise
            added = embedded + rewritten
            removed_paths = {f.path for f in removed}
            carried = sum(f.rows for f in current if f.path not in removed_paths)
            carried += sum(f.rows for f in rewritten)
            embedded_rows = sum(f.rows for f in embedded)
            counts = {"rows": carried + embedded_rows, "embedded_rows": embedded_rows,
                      "carried_rows": carried}
            properties = CommitProperties(
                custom_metadata={"userMetadata": json.dumps({**meta, **counts}, sort_keys=True)},
                app_transactions=[Transaction(app_id, 0)],
                max_commit_retries=0,
            )
            if before_commit is not None:
                before_commit([self._abs(f.path) for f in added])
            try:
                self._write_log(table, added, removed, properties)
            except (CommitFailedError, _TableCreatedMeanwhile) as err:
                log.info("embedding table %s: attempt %d lost a race (%s), planning again",
                         self.uri, attempt, err)
                self._delete_folder(f"{staging}/carried-{attempt}")
                continue
            version = 0 if table is None else table.version() + 1  # no rebase: read + 1
            log.info("embedding table %s: version %d (%s, %d rows: %d embedded, %d carried)",
                     self.uri, version, mode, counts["rows"], embedded_rows, carried)
            return CommitResult(
                version=version, committed=True, mode=mode, rows=counts["rows"],
                embedded_rows=embedded_rows, carried_rows=carried,
                rewritten_rows=sum(f.rows for f in rewritten),
                removed_rows=sum(f.rows for f in removed) - sum(f.rows for f in rewritten),
                files_added=len(added), files_removed=len(removed), attempts=attempt,
            )
        self._delete_folder(staging)
        raise TableError(f"{self.uri}: {self.max_attempts} commit attempts lost to concurrent "
                         "commits; nothing was committed")

    def _write_log(self, table: DeltaTable | None, added: list[_File], removed: list[_File],
                   properties: CommitProperties) -> None:
        adds = [AddAction(f.path, f.size, {}, f.mtime_ms, True, f.stats) for f in added]
        if table is None:
            try:
                create_table_with_add_actions(
                    self.uri, Schema.from_arrow(TABLE_SCHEMA), adds, mode="error",
                    description="prodvec product embeddings", commit_properties=properties)
            except DeltaError as err:
                if self.exists():
                    raise _TableCreatedMeanwhile(str(err)) from err
                raise
            return
        now_ms = int(time.time() * 1000)
        removes = [RemoveAction(f.path, True, now_ms, f.size, {}) for f in removed]
        table.create_write_transaction([*adds, *removes], "append", TABLE_SCHEMA,
                                       commit_properties=properties)

    def _commit_native(self, spark: SparkSession, embedded: list[_File],
                       deleted: DataFrame | None, mode: Mode, meta: dict[str, Any],
                       staging: str | None) -> CommitResult:
        """delta-spark writes the checked rows itself, in one transaction with Delta's own
        idempotency options. An incremental refresh rewrites the whole table here: O(table)."""
        if not self.exists():
            DeltaTable.create(self.uri, TABLE_SCHEMA, description="prodvec product embeddings")
        before = self._files(DeltaTable(self.uri))
        rows = (spark.read.schema(SPARK_SCHEMA).parquet(*(self._abs(f.path) for f in embedded))
                if embedded else spark.createDataFrame([], SPARK_SCHEMA))
        if mode == "incremental":
            keys = self._keys(spark, embedded, deleted)
            carried = spark.read.format("delta").load(self.uri).join(keys, "product_id",
                                                                      "left_anti")
            rows = carried.select(*COLUMNS).unionByName(rows)
        embedded_rows = sum(f.rows for f in embedded)
        (rows.repartition(F.col("product_id")).write.format("delta").mode("overwrite")
         .option("txnAppId", meta["app_id"]).option("txnVersion", 0)
         .option("userMetadata", json.dumps(meta, sort_keys=True))
         .option("maxRecordsPerFile", self.rows_per_file).save(self.uri))
        if staging is not None:
            self._delete_folder(staging)
        table = DeltaTable(self.uri)
        after = self._files(table)
        total = sum(f.rows for f in after)
        return CommitResult(
            version=table.version(), committed=True, mode=mode, rows=total,
            embedded_rows=embedded_rows, carried_rows=total - embedded_rows,
            rewritten_rows=total - embedded_rows,
            removed_rows=sum(f.rows for f in before) - (total - embedded_rows),
            files_added=len(after), files_removed=len(before), attempts=1,
        )

    def _skipped(self, table: DeltaTable, mode: Mode, attempts: int = 0) -> CommitResult:
        rows = sum(f.rows for f in self._files(table))
        return CommitResult(version=table.version(), committed=False, mode=mode, rows=rows,
                            embedded_rows=0, carried_rows=rows, rewritten_rows=0,
                            removed_rows=0, files_added=0, files_removed=0, attempts=attempts)

    # ---- staging and checks ----------------------------------------------------------------

    def _stage(self, frame: DataFrame, folder: str, dimension: int,
               model: tuple[str, str]) -> list[_File]:
        """Write the frame once (metrics are gathered during the write, so an expensive
        inference plan never runs twice), then check the files; a refusal removes them."""
        prepared = _conform(frame, *model)
        observation = Observation()
        self._write_parquet(prepared.observe(observation, *_metrics(*model)), folder)
        try:
            files = [self._inspect(path, dimension) for path in self._list(folder)]
            _check_metrics(observation.get, dimension, model, f"{self.uri}/{folder}")
            self._check_unique(frame.sparkSession, files, f"{self.uri}/{folder}")
        except TableError:
            self._delete_folder(folder)
            raise
        for empty in (f for f in files if not f.rows):  # Spark writes one for an empty frame
            self._fs.delete_file(f"{self._fs_root}/{empty.path}")
        return [f for f in files if f.rows]

    def _adopt(self, paths: list[str], spark: SparkSession, dimension: int,
               model: tuple[str, str]) -> list[_File]:
        """Files written by someone else: the same checks, by reading them once."""
        if not paths:
            raise TableError("no files to commit")
        hidden = [p for p in paths if any(part[:1] in "._" for part in p.split("/"))]
        if hidden:
            raise TableError(f"{hidden[0]}: readers skip files under names starting with "
                             "'_' or '.': write data files elsewhere under the table")
        files = [self._inspect(path, dimension) for path in paths]
        uris = [self._abs(path) for path in paths]
        metrics = spark.read.parquet(*uris).agg(*_metrics(*model)).first().asDict()
        _check_metrics(metrics, dimension, model, ", ".join(paths))
        self._check_unique(spark, files, ", ".join(paths))
        return [f for f in files if f.rows]

    def _inspect(self, path: str, dimension: int) -> _File:
        """Check one file's footer against the contract; return what its AddAction needs."""
        where = f"{self._fs_root}/{path}"
        try:
            meta = pq.read_metadata(where, filesystem=self._fs)
        except (OSError, pa.ArrowInvalid) as err:
            raise TableError(f"{self.uri}/{path}: not a readable Parquet file: {err}") from err
        problems = _schema_problems(meta.schema.to_arrow_schema())
        if not problems:
            problems = _footer_problems(meta, dimension)
        if problems:
            raise TableError(f"{self.uri}/{path}: " + "; ".join(problems))
        info = self._fs.get_file_info(where)
        mtime = info.mtime.timestamp() if info.mtime is not None else time.time()
        return _File(path, info.size, int(mtime * 1000), meta.num_rows, _stats(meta))

    def _check_unique(self, spark: SparkSession, files: list[_File], where: str) -> None:
        """Reads only the product_id column of the new files."""
        if not any(f.rows for f in files):
            return
        ids = spark.read.schema(_ID_SCHEMA).parquet(*(self._abs(f.path) for f in files))
        repeated = ids.groupBy("product_id").count().where("count > 1").limit(3).collect()
        if repeated:
            shown = ", ".join(f"{row.product_id!r} x{row['count']}" for row in repeated)
            raise TableError(f"{where}: product_id repeats ({shown}); one row per product")

    def _check_models(self, spark: SparkSession, table: DeltaTable, model_name: str,
                      model_version: str) -> None:
        others = self._models(spark, table) - {(model_name, model_version)}
        if others:
            raise TableError(
                f"{self.uri} holds embeddings of {_names(others)}: an incremental refresh with "
                f"{model_name} v{model_version} would mix models; run a full refresh")

    def _models(self, spark: SparkSession, table: DeltaTable) -> set[tuple[str, str]]:
        """Models in a version, from the log's per-file min/max (no data read); files
        without those statistics are read."""
        actions = pa.table(table.get_add_actions(flatten=True)).to_pylist()
        models, unknown = set(), []
        for action in actions:
            name = (action.get("min.model_name"), action.get("max.model_name"))
            version = (action.get("min.model_version"), action.get("max.model_version"))
            if None in name or None in version or name[0] != name[1] or version[0] != version[1]:
                unknown.append(self._abs(action["path"]))
            else:
                models.add((name[0], version[0]))
        if unknown:
            rows = (spark.read.schema(SPARK_SCHEMA).parquet(*unknown)
                    .select("model_name", "model_version").distinct().collect())
            models |= {(row.model_name, row.model_version) for row in rows}
        return models

    # ---- incremental copy-on-write --------------------------------------------------------

    def _keys(self, spark: SparkSession, embedded: list[_File],
              deleted: DataFrame | None) -> DataFrame:
        """Product ids whose current row must go: re-embedded ones and deleted ones."""
        parts = [spark.read.schema(_ID_SCHEMA).parquet(*(self._abs(f.path) for f in embedded))
                 ] if embedded else []
        if deleted is not None:
            parts.append(deleted.select(F.col("product_id").cast("string")))
        keys = reduce(DataFrame.unionByName, parts)
        return keys.where(F.col("product_id").isNotNull()).distinct()

    def _copy_on_write(self, spark: SparkSession, current: list[_File], embedded: list[_File],
                       deleted: DataFrame | None, folder: str,
                       dimension: int) -> tuple[list[_File], list[_File]]:
        """Find the current files holding a key (one read of the product_id column), copy
        their other rows to `folder`. Returns (files to remove, files written)."""
        if not current or (not embedded and deleted is None):
            return [], []
        keys = self._keys(spark, embedded, deleted).persist()
        try:
            hits = (spark.read.schema(_ID_SCHEMA).parquet(*(self._abs(f.path) for f in current))
                    .select("product_id", F.col("_metadata.file_path").alias("file"))
                    .join(keys, "product_id").groupBy("file").count().collect())
            if not hits:
                return [], []
            by_path = {f.path: f for f in current}
            touched = [by_path[self._relative(row.file)] for row in hits]
            rest = (spark.read.schema(SPARK_SCHEMA).parquet(*(self._abs(f.path) for f in touched))
                    .join(keys, "product_id", "left_anti").select(*COLUMNS))
            self._write_parquet(rest, folder)
        finally:
            keys.unpersist()
        rewritten = [self._inspect(path, dimension) for path in self._list(folder)]
        expected = sum(f.rows for f in touched) - sum(row["count"] for row in hits)
        if sum(f.rows for f in rewritten) != expected:
            raise TableError(f"{self.uri}: copied {sum(f.rows for f in rewritten)} rows out of "
                             f"{len(touched)} files, expected {expected}: the table repeats ids")
        return touched, [f for f in rewritten if f.rows]

    # ---- files ---------------------------------------------------------------------------

    def _write_parquet(self, frame: DataFrame, folder: str) -> None:
        """One shuffle on product_id: AQE sizes the partitions, rows_per_file caps a file.
        Timestamps as INT64 micros (Spark's INT96 default is outside the Delta spec)."""
        (frame.repartition(F.col("product_id")).write
         .option("maxRecordsPerFile", self.rows_per_file)
         .option("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
         .option("mapreduce.fileoutputcommitter.marksuccessfuljobs", "false")
         # Local disks only: no .crc side files for vacuum to find later.
         .option("fs.file.impl", "org.apache.hadoop.fs.RawLocalFileSystem")
         .option("fs.file.impl.disable.cache", "true")
         .parquet(self._abs(folder)))

    def _staging_folder(self, app_id: str) -> str:
        """A fresh folder per run; its name says when and for whom it was written."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        slug = re.sub(r"[^A-Za-z0-9.-]+", "-", app_id).strip("-.")[:40] or "app"
        return f"data/{stamp}-{slug}-{uuid.uuid4().hex[:8]}"

    def _list(self, folder: str) -> list[str]:
        selector = pafs.FileSelector(f"{self._fs_root}/{folder}", recursive=True,
                                     allow_not_found=True)
        found = []
        for info in self._fs.get_file_info(selector):
            path = self._relative(info.path)
            if info.is_file and path.endswith(".parquet") and not any(
                    part[:1] in "._" for part in path.split("/")):
                found.append(path)
        return sorted(found)

    def _delete_folder(self, folder: str) -> None:
        try:
            self._fs.delete_dir(f"{self._fs_root}/{folder}")
        except FileNotFoundError:
            pass

    def _abs(self, path: str) -> str:
        return f"{self.uri}/{path}"

    def _relative(self, uri: str) -> str:
        root, key = _key(self.uri).rstrip("/"), _key(uri)
        if not key.startswith(root + "/"):
            raise TableError(f"{uri} is not under the table root {self.uri}")
        return key[len(root) + 1:]

    def _table(self, version: int | None = None) -> DeltaTable | None:
        if not self.exists():
            return None
        return DeltaTable(self.uri) if version is None else DeltaTable(self.uri, version=version)

    def _files(self, table: DeltaTable) -> list[_File]:
        actions = pa.table(table.get_add_actions(flatten=True)).to_pylist()
        files = []
        for action in actions:
            rows = action["num_records"]
            if rows is None:  # a writer that kept no stats: the footer knows
                where = f"{self._fs_root}/{action['path']}"
                rows = pq.read_metadata(where, filesystem=self._fs).num_rows
            files.append(_File(action["path"], action["size_bytes"],
                               action["modification_time"], rows, ""))
        return files


class _TableCreatedMeanwhile(Exception):
    """Another writer created the table between our check and our first commit."""


def _names(models: set[tuple[str, str]]) -> str:
    return ", ".join(f"{name} v{version}" for name, version in sorted(models))


def _conform(frame: DataFrame, model_name: str, model_version: str) -> DataFrame:
    """The contract's columns in order; model columns and embedded_at filled when absent."""
    present = {field.name: field.dataType for field in frame.schema}
    missing = [name for name in ("product_id", "embedding", "content_hash") if name not in present]
    if missing:
        raise TableError(f"the embeddings lack column(s) {missing} (have {sorted(present)})")
    filled = {"model_name": F.lit(model_name), "model_version": F.lit(model_version),
              "embedded_at": F.current_timestamp()}
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


def _metrics(model_name: str, model_version: str) -> list[Column]:
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


def _check_metrics(metrics: dict[str, Any], dimension: int, model: tuple[str, str],
                   where: str) -> None:
    problems = []
    if metrics.get("null_rows"):
        problems.append(f"{metrics['null_rows']} rows have a null column")
    sizes = (metrics.get("min_dimension"), metrics.get("max_dimension"))
    if metrics.get("rows") and sizes != (dimension, dimension):
        problems.append(f"embedding sizes range {sizes[0]}..{sizes[1]}, expected {dimension}")
    if metrics.get("non_finite_rows"):
        problems.append(f"{metrics['non_finite_rows']} embeddings hold NaN, inf or null values")
    if metrics.get("other_model_rows"):
        problems.append(f"{metrics['other_model_rows']} rows name another model than "
                        f"{model[0]} v{model[1]}")
    if problems:
        raise TableError(f"{where}: " + "; ".join(problems))


def _same_type(got: pa.DataType, want: pa.DataType) -> bool:
    if pa.types.is_string(want):
        return pa.types.is_string(got) or pa.types.is_large_string(got)
    if pa.types.is_list(want):
        return ((pa.types.is_list(got) or pa.types.is_large_list(got))
                and got.value_type == want.value_type)
    return (pa.types.is_timestamp(got) and got.unit == want.unit
            and (got.tz is None) == (want.tz is None))


def _schema_problems(schema: pa.Schema) -> list[str]:
    problems = [f"missing column {name}" for name in COLUMNS if name not in schema.names]
    problems += [f"unexpected column {name}" for name in schema.names if name not in COLUMNS]
    for field in TABLE_SCHEMA:
        if field.name in schema.names and not _same_type(schema.field(field.name).type,
                                                         field.type):
            problems.append(f"{field.name} is {schema.field(field.name).type}, "
                            f"expected {_CONTRACT_TYPES[field.name]}")
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
                problems.setdefault(f"{name} nulls",
                                    f"{name} has {stats.null_count} nulls (row group {group})")
            if name == "embedding" and chunk.num_values != row_group.num_rows * dimension:
                per_row = chunk.num_values / max(row_group.num_rows, 1)
                problems.setdefault("dimension", f"embedding dimension is not {dimension}: row "
                                    f"group {group} holds {chunk.num_values} values for "
                                    f"{row_group.num_rows} rows ({per_row:g} per row)")
    return list(problems.values())


def _stats(meta: pq.FileMetaData) -> str:
    """Delta file statistics: row count, null counts, min/max of the string columns (the
    model columns let a planner see which model a file holds without reading it)."""
    columns = {meta.schema.column(i).path: i for i in range(meta.num_columns)}
    mins, maxs, nulls = {}, {}, {}
    for name in (*_STAT_COLUMNS, "embedded_at"):
        chunks = [meta.row_group(g).column(columns[name]).statistics
                  for g in range(meta.num_row_groups)]
        if not chunks or any(s is None for s in chunks):
            continue
        if all(s.has_null_count for s in chunks):
            nulls[name] = sum(s.null_count for s in chunks)
        if name != "embedded_at" and all(s.has_min_max for s in chunks):
            mins[name] = min(s.min for s in chunks)
            maxs[name] = max(s.max for s in chunks)
    return json.dumps({"numRecords": meta.num_rows, "minValues": mins, "maxValues": maxs,
                       "nullCount": nulls})


def _require_delta_spark(spark: SparkSession) -> None:
    from py4j.java_gateway import JavaClass

    if not isinstance(spark.sparkContext._jvm.io.delta.tables.DeltaTable, JavaClass):
        raise TableError(
            "embed.writer 'delta-spark' needs the delta-spark package on Spark's classpath "
            "(io.delta:delta-spark_2.13 matching this Spark, e.g. spark-submit --packages, with "
            "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension); it is not there. "
            "embed.writer=deltalake writes the same table without it")


def vacuum(table_path: str | Path, *, dry_run: bool = False,
           retention_hours: int = _DEFAULT_RETENTION_HOURS) -> list[str]:
    """Delete files no retained version references: orphans of runs that died before their
    commit and files that left the table more than `retention_hours` ago. Files younger than
    that stay, so a running job's uncommitted files survive when the retention exceeds the
    longest job. Returns the paths removed (or that would be, with dry_run)."""
    uri = _uri(table_path)
    if not DeltaTable.is_deltatable(uri):
        raise TableError(f"{uri} is not a Delta table")
    removed = DeltaTable(uri).vacuum(retention_hours=retention_hours, dry_run=dry_run,
                                     enforce_retention_duration=False, full=True)
    if not dry_run and "://" not in uri:
        _remove_empty_folders(Path(uri) / "data")
    return sorted(removed)


def _remove_empty_folders(root: Path) -> None:
    """Local disks keep the folders of vacuumed files; object stores have none."""
    for folder, _, _ in os.walk(root, topdown=False):
        if folder != str(root) and not os.listdir(folder):
            os.rmdir(folder)
