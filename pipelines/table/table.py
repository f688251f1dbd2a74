"""The embedding table: one Delta Lake table of product embeddings, one version per embed run.

Commit path, offline-safe (no delta-spark jar): Spark executors write plain Parquet into a
fresh folder under the table root (`data/<stamp>-<app>-<uuid>/`), the driver checks every
file against the contract (`pipelines.table.contract`: footer schema and embedding dimension
per file; nulls, NaN/inf, dimension per row and unique ids from metrics gathered while
writing), then a writer (`pipelines.table.writers`) commits all of them as ONE Delta version.
Nothing is visible before that commit; a job that dies leaves unreferenced files, which
`vacuum` removes.

Idempotency: each commit records a Delta app transaction (`app_id`). A run whose app_id the
table already holds writes nothing and commits nothing.

Races: a commit given its `RefreshSource` that finds the table moved past the version it
planned against plans again there (re-embeds only catalog rows neither the new version nor its
own files hold, recomputes deletions) before it commits; one whose clean catalog is older than
the table's last commit's refuses (`refresh.check_catalog_stamp`).

Layout: no partition columns. Rows are hash-distributed on product_id by one shuffle (AQE
sizes the write partitions, `rows_per_file` caps each file). Partitions would put a column in
every reader's schema and only prune for readers that compute the writer's hash; copy-on-write
(`pipelines.table.refresh`) is per file, so buckets would not make a refresh cheaper, only
leave a small file per touched bucket per run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltalake import DeltaTable
from pyspark.sql import DataFrame, Observation, SparkSession

from pipelines.core.config import Config
from pipelines.core.errors import TableError
from pipelines.table import refresh
from pipelines.table.contract import (
    HASHES_SCHEMA,
    ID_SCHEMA,
    SPARK_SCHEMA,
    DataFile,
    check_row_metrics,
    conform,
    row_metrics,
)
from pipelines.table.refresh import (
    CATALOG_STAMP,
    ChangeLimits,
    Mode,
    RefreshPlan,
    RefreshSource,
)
from pipelines.table.storage import TableFiles, table_uri
from pipelines.table.writers import (
    WRITERS,
    CommitResult,
    Replan,
    require_delta_spark,
    skipped,
)

__all__ = ["EmbeddingTable", "Snapshot"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """One version of the table: its data files (absolute URIs) and row count."""

    version: int
    files: tuple[str, ...]
    rows: int


class EmbeddingTable:
    """The product-embedding Delta table at `path`: read, plan a refresh, commit a version."""

    def __init__(
        self,
        path: str | Path,
        *,
        rows_per_file: int = 400_000,
        writer: str = "deltalake",
        max_attempts: int = 5,
    ) -> None:
        if writer not in WRITERS:
            raise TableError(f"unknown table writer {writer!r}; writers are {sorted(WRITERS)}")
        self.uri = table_uri(path)
        self.files = TableFiles(self.uri, rows_per_file)
        self.writer = writer
        self.max_attempts = max_attempts

    @classmethod
    def from_config(cls, config: Config) -> EmbeddingTable:
        return cls(
            config.outputs.table,
            rows_per_file=config.embed.rows_per_file,
            writer=config.embed.writer,
        )

    # ---- reading -------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.files.exists()

    def version(self) -> int | None:
        """The latest version, None before the first commit."""
        table = self.files.open()
        return None if table is None else table.version()

    def snapshot(self, version: int | None = None) -> Snapshot:
        table = self.files.open(version)
        if table is None:
            raise TableError(f"{self.uri} is not a Delta table yet (nothing committed)")
        files = self.files.of_version(table)
        return Snapshot(
            table.version(),
            tuple(self.files.absolute(f.path) for f in files),
            sum(f.rows for f in files),
        )

    def read_spark(self, spark: SparkSession, version: int | None = None) -> DataFrame:
        """A version as plain Parquet of its files: needs no delta-spark jar."""
        files = self.snapshot(version).files if self.exists() or version is not None else ()
        if not files:
            return spark.createDataFrame([], SPARK_SCHEMA)
        return self.files.read(spark, SPARK_SCHEMA, list(files))

    def committed(self, app_id: str) -> bool:
        """Whether a run with this application id already committed (a retried driver's work
        is done)."""
        table = self.files.open()
        return table is not None and table.transaction_version(app_id) is not None

    def commit_info(self, version: int | None = None) -> dict[str, Any]:
        """The prodvec metadata (model, run, config hash, counts) a commit recorded."""
        table = self.files.open()
        if table is None:
            raise TableError(f"{self.uri} is not a Delta table yet (nothing committed)")
        wanted = table.version() if version is None else version
        for entry in table.history():
            if entry.get("version") == wanted:
                return json.loads(entry.get("userMetadata") or "{}")
        raise TableError(f"{self.uri} has no version {wanted} in its history")

    # ---- planning ------------------------------------------------------------------------

    def plan_refresh(
        self,
        spark: SparkSession,
        catalog: DataFrame,
        *,
        model_name: str,
        model_version: str,
        limits: ChangeLimits | None = None,
        catalog_stamp: int | None = None,
    ) -> RefreshPlan:
        """What an embed run of this model over `catalog` must embed and remove
        (`pipelines.table.refresh.plan`); refuses, before anything is embedded, a change beyond
        `limits` and a catalog older than the one the table was last committed from."""
        table = self.files.open()
        refresh.check_catalog_stamp(self.files, table, catalog_stamp)
        current = self._hashes_at(spark, table)
        model = (model_name, model_version)
        return refresh.plan(spark, self.files, table, current, catalog, model, limits)

    def _hashes_at(self, spark: SparkSession, table: DeltaTable | None) -> DataFrame | None:
        if table is None:
            return None
        return self.read_spark(spark, table.version()).select(*HASHES_SCHEMA.names)

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
        source: RefreshSource | None = None,
        catalog_stamp: int | None = None,
    ) -> CommitResult:
        """Commit embeddings as ONE new version.

        `data`: a DataFrame with product_id, content_hash, embedding (array<float>) and
        optionally model_name, model_version, embedded_at (filled in when absent, checked
        when present); other columns are ignored. Or Parquet files already written under the
        table root, committed as they are. `mode="full"`: the version holds exactly `data`.
        `mode="incremental"`: rows of `data` replace rows with the same product_id, ids in
        `deleted` leave, everything else is carried. `before_commit` sees the files about to
        be committed after every check (tests raise there to simulate a crash).
        `source` (a DataFrame `data` only): how `data` was planned, so a commit that finds the
        table moved plans again there. `catalog_stamp`: the clean catalog's write time, recorded
        in the commit; an older one than the table's last commit recorded is refused.
        """
        if mode not in ("full", "incremental"):
            raise TableError(f"mode must be 'full' or 'incremental', got {mode!r}")
        if mode == "full" and deleted is not None:
            raise TableError("a full refresh replaces every row: 'deleted' is for incremental")
        if source is not None and not isinstance(data, DataFrame):
            raise TableError("a refresh source re-plans embeddings: give them as a DataFrame")
        spark = data.sparkSession if isinstance(data, DataFrame) else SparkSession.active()
        if self.writer == "delta-spark":
            require_delta_spark(spark)
        table = self.files.open()
        if table is not None and table.transaction_version(app_id) is not None:
            log.info(
                "embedding table %s: app %s already committed, nothing to do", self.uri, app_id
            )
            return skipped(self.files, table, mode)
        refresh.check_catalog_stamp(self.files, table, catalog_stamp)
        model = (model_name, model_version)
        if mode == "incremental" and table is not None:
            refresh.check_one_model(spark, self.files, table, model)
        if isinstance(data, DataFrame):
            staging: str | None = self.files.staging_folder(app_id)
            embedded = self._stage(data, f"{staging}/embedded", dimension, model)
        else:
            staging = None
            embedded = self._adopt(
                [self.files.relative(str(p)) for p in data], spark, dimension, model
            )
        meta = {
            "app_id": app_id,
            "run_id": run_id,
            "model_uri": model_uri,
            "model_name": model_name,
            "model_version": model_version,
            "config_hash": config_hash,
            "mode": mode,
            "dimension": dimension,
            "writer": self.writer,
        }
        if catalog_stamp is not None:
            meta[CATALOG_STAMP] = catalog_stamp
        replan = (
            None
            if source is None or staging is None
            else self._replanner(spark, source, staging, dimension, model)
        )
        writer = WRITERS[self.writer](self.files, self.max_attempts)
        return writer.commit(
            spark, embedded, deleted, mode, meta, staging, dimension, before_commit, replan
        )

    def _replanner(
        self,
        spark: SparkSession,
        source: RefreshSource,
        staging: str,
        dimension: int,
        model: tuple[str, str],
    ) -> Replan:
        """A writer calls this before every commit attempt with the table as it is then. At
        the version planned against it changes nothing; past it, the refresh is planned again
        there: catalog rows neither that version nor our staged files hold are embedded now,
        deletions recomputed. Files already staged stay (their rows are the catalog's). A full
        refresh's files are already the whole catalog: it needs no new plan."""
        version = source.plan.version
        mode, deleted = source.plan.mode, source.plan.deleted

        def replan(
            table: DeltaTable | None, embedded: list[DataFile], attempt: int
        ) -> tuple[Mode, list[DataFile], DataFrame | None]:
            nonlocal version, mode, deleted
            now = None if table is None else table.version()
            if now == version or mode == "full":
                return mode, embedded, deleted
            log.info("embedding table %s: planning again at version %s", self.uri, now)
            fresh = refresh.plan(
                spark,
                self.files,
                table,
                self._hashes_at(spark, table),
                source.catalog,
                model,
                source.limits,
            )
            missing = fresh.to_embed
            if embedded:
                staged = self.files.read(
                    spark, HASHES_SCHEMA, [self.files.absolute(f.path) for f in embedded]
                )
                missing = missing.join(
                    staged.select("product_id", "content_hash"),
                    ["product_id", "content_hash"],
                    "left_anti",
                )
            added = self._stage(
                source.embed(missing), f"{staging}/embedded-{attempt}", dimension, model
            )
            version, mode, deleted = now, fresh.mode, fresh.deleted
            return mode, embedded + added, deleted

        return replan

    def _stage(
        self, frame: DataFrame, folder: str, dimension: int, model: tuple[str, str]
    ) -> list[DataFile]:
        """Write the frame once (metrics are gathered during the write, so an expensive
        inference plan never runs twice), then check the files; a refusal removes them."""
        prepared = conform(frame, *model)
        observation = Observation()
        self.files.write(prepared.observe(observation, *row_metrics(*model)), folder)
        try:
            files = [self.files.inspect(path, dimension) for path in self.files.listing(folder)]
            check_row_metrics(observation.get, dimension, model, f"{self.uri}/{folder}")
            self._check_unique(frame.sparkSession, files, f"{self.uri}/{folder}")
        except TableError:
            self.files.delete_folder(folder)
            raise
        for empty in (f for f in files if not f.rows):  # Spark writes one for an empty frame
            self.files.delete(empty.path)
        return [f for f in files if f.rows]

    def _adopt(
        self, paths: list[str], spark: SparkSession, dimension: int, model: tuple[str, str]
    ) -> list[DataFile]:
        """Files written by someone else: the same checks, by reading them once."""
        if not paths:
            raise TableError("no files to commit")
        hidden = [p for p in paths if any(part[:1] in "._" for part in p.split("/"))]
        if hidden:
            raise TableError(
                f"{hidden[0]}: readers skip files under names starting with "
                "'_' or '.': write data files elsewhere under the table"
            )
        files = [self.files.inspect(path, dimension) for path in paths]
        uris = [self.files.absolute(path) for path in paths]
        metrics = (
            self.files.read(spark, SPARK_SCHEMA, uris)
            .agg(*row_metrics(*model))
            .collect()[0]
            .asDict()
        )
        check_row_metrics(metrics, dimension, model, ", ".join(paths))
        self._check_unique(spark, files, ", ".join(paths))
        return [f for f in files if f.rows]

    def _check_unique(self, spark: SparkSession, files: list[DataFile], where: str) -> None:
        """Reads only the product_id column of the new files."""
        if not any(f.rows for f in files):
            return
        ids = self.files.read(spark, ID_SCHEMA, [self.files.absolute(f.path) for f in files])
        repeated = ids.groupBy("product_id").count().where("count > 1").limit(3).collect()
        if repeated:
            shown = ", ".join(f"{row.product_id!r} x{row['count']}" for row in repeated)
            raise TableError(f"{where}: product_id repeats ({shown}); one row per product")
