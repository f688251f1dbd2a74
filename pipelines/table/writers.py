"""Committing a version of the embedding table: the two back-ends, chosen by `embed.writer`.

- `deltalake` (the default, offline-safe): Spark has already written plain Parquet under the
  table root and every file passed the contract; delta-rs commits them as ONE Delta version
  with an app transaction (`app_id`) for idempotency. Commits use no automatic rebase
  (max_commit_retries=0): a version committed by someone else between our read and our commit
  fails ours, and we plan again on the new version, so a full refresh never keeps files
  appended concurrently and two copy-on-writes never both copy a row. An embed run's commit
  also re-plans what to embed and delete there (`Replan`) and re-checks the catalog stamp.
- `delta-spark`: Spark's own Delta writer (needs the delta-spark jar on the classpath), with
  Delta's txnAppId/txnVersion options for idempotency.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from deltalake import DeltaTable, Schema
from deltalake.exceptions import CommitFailedError, DeltaError
from deltalake.transaction import (
    AddAction,
    CommitProperties,
    RemoveAction,
    Transaction,
    create_table_with_add_actions,
)
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.core.errors import TableError, TableRaceError
from pipelines.table.contract import COLUMNS, SPARK_SCHEMA, TABLE_SCHEMA, DataFile
from pipelines.table.refresh import (
    CATALOG_STAMP,
    Mode,
    check_catalog_stamp,
    check_one_model,
    copy_on_write,
    removal_keys,
)
from pipelines.table.storage import TableFiles

__all__ = [
    "WRITERS",
    "CommitResult",
    "DeltaRsWriter",
    "DeltaSparkWriter",
    "Replan",
    "TableWriter",
    "require_delta_spark",
    "skipped",
]

log = logging.getLogger(__name__)

# (table now, files staged so far, attempt) -> (mode, files to commit, ids to delete): the
# refresh planned again against the table as it is now (`EmbeddingTable._replanner`).
Replan = Callable[
    [DeltaTable | None, list[DataFile], int], tuple[Mode, list[DataFile], DataFrame | None]
]


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


def skipped(files: TableFiles, table: DeltaTable, mode: Mode, attempts: int = 0) -> CommitResult:
    """The result of a commit whose app_id the table already holds: nothing changed."""
    rows = sum(f.rows for f in files.of_version(table))
    return CommitResult(
        version=table.version(),
        committed=False,
        mode=mode,
        rows=rows,
        embedded_rows=0,
        carried_rows=rows,
        rewritten_rows=0,
        removed_rows=0,
        files_added=0,
        files_removed=0,
        attempts=attempts,
    )


class TableWriter(Protocol):
    """A commit back-end: makes checked, staged files (and deletions) one new version."""

    def commit(
        self,
        spark: SparkSession,
        embedded: list[DataFile],
        deleted: DataFrame | None,
        mode: Mode,
        meta: dict[str, Any],
        staging: str | None,
        dimension: int,
        before_commit: Callable[[list[str]], None] | None,
        replan: Replan | None,
    ) -> CommitResult: ...


class DeltaRsWriter:
    """delta-rs commits the staged files; see the module docstring."""

    def __init__(self, files: TableFiles, max_attempts: int) -> None:
        self.files = files
        self.max_attempts = max_attempts

    def commit(
        self,
        spark: SparkSession,
        embedded: list[DataFile],
        deleted: DataFrame | None,
        mode: Mode,
        meta: dict[str, Any],
        staging: str | None,
        dimension: int,
        before_commit: Callable[[list[str]], None] | None,
        replan: Replan | None,
    ) -> CommitResult:
        """Plan against the latest version and commit; when another commit lands first,
        drop what this attempt copied and plan again on the new version."""
        staging = staging or self.files.staging_folder(meta["app_id"])
        app_id = meta["app_id"]
        for attempt in range(1, self.max_attempts + 1):
            table = self.files.open()
            if table is not None and table.transaction_version(app_id) is not None:
                # A twin run with the same app_id won: ours never committed, so its files go.
                self.files.delete_folder(staging)
                return skipped(self.files, table, mode, attempt)
            current = self.files.of_version(table) if table is not None else []
            rewritten: list[DataFile] = []
            try:  # a refusal here comes before any commit: our files can go
                check_catalog_stamp(self.files, table, meta.get(CATALOG_STAMP))
                if replan is not None:
                    mode, embedded, deleted = replan(table, embedded, attempt)
                if mode == "full":
                    removed = current
                else:
                    if table is not None:
                        check_one_model(
                            spark, self.files, table, (meta["model_name"], meta["model_version"])
                        )
                    removed, rewritten = copy_on_write(
                        spark,
                        self.files,
                        current,
                        embedded,
                        deleted,
                        f"{staging}/carried-{attempt}",
                        dimension,
                    )
            except TableError:
                self.files.delete_folder(staging)
                raise
            added = embedded + rewritten
            removed_paths = {f.path for f in removed}
            carried = sum(f.rows for f in current if f.path not in removed_paths)
            carried += sum(f.rows for f in rewritten)
            embedded_rows = sum(f.rows for f in embedded)
            counts = {
                "rows": carried + embedded_rows,
                "embedded_rows": embedded_rows,
                "carried_rows": carried,
            }
            properties = CommitProperties(
                custom_metadata={
                    "userMetadata": json.dumps({**meta, **counts, "mode": mode}, sort_keys=True)
                },
                app_transactions=[Transaction(app_id, 0)],
                max_commit_retries=0,
            )
            if before_commit is not None:
                before_commit([self.files.absolute(f.path) for f in added])
            try:
                self._write_log(table, added, removed, properties)
            except (CommitFailedError, TableRaceError) as err:
                log.info(
                    "embedding table %s: attempt %d lost a race (%s), planning again",
                    self.files.uri,
                    attempt,
                    err,
                )
                self.files.delete_folder(f"{staging}/carried-{attempt}")
                continue
            version = 0 if table is None else table.version() + 1  # no rebase: read + 1
            log.info(
                "embedding table %s: version %d (%s, %d rows: %d embedded, %d carried)",
                self.files.uri,
                version,
                mode,
                counts["rows"],
                embedded_rows,
                carried,
            )
            return CommitResult(
                version=version,
                committed=True,
                mode=mode,
                rows=counts["rows"],
                embedded_rows=embedded_rows,
                carried_rows=carried,
                rewritten_rows=sum(f.rows for f in rewritten),
                removed_rows=sum(f.rows for f in removed) - sum(f.rows for f in rewritten),
                files_added=len(added),
                files_removed=len(removed),
                attempts=attempt,
            )
        self.files.delete_folder(staging)
        raise TableError(
            f"{self.files.uri}: {self.max_attempts} commit attempts lost to concurrent "
            "commits; nothing was committed"
        )

    def _write_log(
        self,
        table: DeltaTable | None,
        added: list[DataFile],
        removed: list[DataFile],
        properties: CommitProperties,
    ) -> None:
        adds = [AddAction(f.path, f.size, {}, f.mtime_ms, True, f.stats) for f in added]
        if table is None:
            try:
                create_table_with_add_actions(
                    self.files.uri,
                    Schema.from_arrow(TABLE_SCHEMA),
                    adds,
                    mode="error",
                    description="prodvec product embeddings",
                    commit_properties=properties,
                )
            except DeltaError as err:
                if self.files.exists():
                    raise TableRaceError(str(err)) from err
                raise
            return
        now_ms = int(time.time() * 1000)
        removes = [RemoveAction(f.path, True, now_ms, f.size, {}) for f in removed]
        table.create_write_transaction(
            [*adds, *removes], "append", TABLE_SCHEMA, commit_properties=properties
        )


class DeltaSparkWriter:
    """Spark's own Delta writer; see the module docstring."""

    def __init__(self, files: TableFiles, max_attempts: int) -> None:
        self.files = files

    def commit(
        self,
        spark: SparkSession,
        embedded: list[DataFile],
        deleted: DataFrame | None,
        mode: Mode,
        meta: dict[str, Any],
        staging: str | None,
        dimension: int,
        before_commit: Callable[[list[str]], None] | None,
        replan: Replan | None,
    ) -> CommitResult:
        """delta-spark writes the checked rows itself, in one transaction with Delta's own
        idempotency options. An incremental refresh rewrites the whole table here: O(table);
        `before_commit` is not called (Spark writes and commits in one step), and the plan is
        renewed once, against the version read just before."""
        require_delta_spark(spark)
        if not self.files.exists():
            DeltaTable.create(
                self.files.uri, TABLE_SCHEMA, description="prodvec product embeddings"
            )
        table = DeltaTable(self.files.uri)
        check_catalog_stamp(self.files, table, meta.get(CATALOG_STAMP))
        if replan is not None:
            mode, embedded, deleted = replan(table, embedded, 1)
        before = self.files.of_version(table)
        rows = (
            self.files.read(spark, SPARK_SCHEMA, [self.files.absolute(f.path) for f in embedded])
            if embedded
            else spark.createDataFrame([], SPARK_SCHEMA)
        )
        if mode == "incremental":
            keys = removal_keys(spark, self.files, embedded, deleted)
            carried = (
                spark.read.format("delta")
                .load(self.files.uri)
                .join(keys, "product_id", "left_anti")
            )
            rows = carried.select(*COLUMNS).unionByName(rows)
        embedded_rows = sum(f.rows for f in embedded)
        (
            rows.repartition(F.col("product_id"))
            .write.format("delta")
            .mode("overwrite")
            .option("parquet.page.write-checksum.enabled", "true")
            .option("txnAppId", meta["app_id"])
            .option("txnVersion", 0)
            .option("userMetadata", json.dumps({**meta, "mode": mode}, sort_keys=True))
            .option("maxRecordsPerFile", self.files.rows_per_file)
            .save(self.files.uri)
        )
        if staging is not None:
            self.files.delete_folder(staging)
        table = DeltaTable(self.files.uri)
        after = self.files.of_version(table)
        total = sum(f.rows for f in after)
        return CommitResult(
            version=table.version(),
            committed=True,
            mode=mode,
            rows=total,
            embedded_rows=embedded_rows,
            carried_rows=total - embedded_rows,
            rewritten_rows=total - embedded_rows,
            removed_rows=sum(f.rows for f in before) - (total - embedded_rows),
            files_added=len(after),
            files_removed=len(before),
            attempts=1,
        )


def require_delta_spark(spark: SparkSession) -> None:
    from py4j.java_gateway import JavaClass

    jvm: Any = spark.sparkContext._jvm
    if not isinstance(jvm.io.delta.tables.DeltaTable, JavaClass):
        raise TableError(
            "embed.writer 'delta-spark' needs the delta-spark package on Spark's classpath "
            "(io.delta:delta-spark_2.13 matching this Spark, e.g. spark-submit --packages, with "
            "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension); it is not there. "
            "embed.writer=deltalake writes the same table without it"
        )


WRITERS: dict[str, Callable[[TableFiles, int], TableWriter]] = {
    "deltalake": DeltaRsWriter,
    "delta-spark": DeltaSparkWriter,
}
