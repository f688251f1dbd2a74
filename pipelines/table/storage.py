"""The table's files on whatever filesystem holds it (a local disk or an object store, through
`pyarrow.fs`): paths relative to the table root as the Delta log writes them, listing,
writing and reading with Spark, checking a file against the contract, deleting a staging folder.

Every data file carries a CRC32 per Parquet page, written by Spark (parquet-mr) and verified
on every read of the table's files, Spark's (`read`) or pyarrow's (with
`page_checksum_verification=True`): a file overwritten in place fails its read instead of
handing out other floats; `damaged_file` turns Spark's wrapped failure into one line."""

from __future__ import annotations

import re
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.core.errors import TableError, TableVerifyError
from pipelines.table.contract import DataFile, file_problems, file_stats

__all__ = ["TableFiles", "damaged_file", "table_uri"]

_FAILED_READ = re.compile(r"Encountered error while reading file (\S+?)\.?\s+SQLSTATE")
_CRC_FAILED = "CRC checksum verification failed"


def table_uri(path: str | Path) -> str:
    """A table location as delta-rs and Spark both take it: URIs as given, local paths
    absolute."""
    text = str(path)
    if "://" in text:
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())


def damaged_file(err: BaseException) -> TableVerifyError | None:
    """The data file whose page checksums failed a Spark read, recovered from the driver-side
    Spark exception (a JVM stack trace) as one error naming it; None for any other failure."""
    text = str(err)
    found = _FAILED_READ.search(text)
    if found is None or _CRC_FAILED not in text:
        return None
    return TableVerifyError(
        f"{found.group(1)}: page {_CRC_FAILED}: the file changed after it was written; "
        "`prodvec verify` checks the whole version"
    )


def _key(uri: str) -> str:
    """A URI without its scheme, so Spark's `file:/x` and `s3a://b/x` match `/x` and `s3://b/x`."""
    parsed = urlparse(uri)
    if len(parsed.scheme) > 1:
        return parsed.netloc + unquote(parsed.path)
    return uri


class TableFiles:
    """The files under one table root."""

    def __init__(self, uri: str, rows_per_file: int) -> None:
        self.uri = uri
        self.rows_per_file = rows_per_file
        self.fs, self.root = pafs.FileSystem.from_uri(uri)

    def exists(self) -> bool:
        return DeltaTable.is_deltatable(self.uri)

    def open(self, version: int | None = None) -> DeltaTable | None:
        """The Delta table at its latest version (or `version`); None before the first commit."""
        if not self.exists():
            return None
        return DeltaTable(self.uri) if version is None else DeltaTable(self.uri, version=version)

    def absolute(self, path: str) -> str:
        return f"{self.uri}/{path}"

    def relative(self, uri: str) -> str:
        root, key = _key(self.uri).rstrip("/"), _key(uri)
        if not key.startswith(root + "/"):
            raise TableError(f"{uri} is not under the table root {self.uri}")
        return key[len(root) + 1 :]

    def staging_folder(self, app_id: str) -> str:
        """A fresh folder per run; its name says when and for whom it was written."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        slug = re.sub(r"[^A-Za-z0-9.-]+", "-", app_id).strip("-.")[:40] or "app"
        return f"data/{stamp}-{slug}-{uuid.uuid4().hex[:8]}"

    def write(self, frame: DataFrame, folder: str) -> None:
        """One shuffle on product_id: AQE sizes the partitions, rows_per_file caps a file.
        Timestamps as INT64 micros (Spark's INT96 default is outside the Delta spec)."""
        (
            frame.repartition(F.col("product_id"))
            .write.option("maxRecordsPerFile", self.rows_per_file)
            .option("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
            .option("parquet.page.write-checksum.enabled", "true")
            .option("mapreduce.fileoutputcommitter.marksuccessfuljobs", "false")
            # Local disks only: no .crc side files for vacuum to find later.
            .option("fs.file.impl", "org.apache.hadoop.fs.RawLocalFileSystem")
            .option("fs.file.impl.disable.cache", "true")
            .parquet(self.absolute(folder))
        )

    def read(self, spark: SparkSession, schema: T.StructType, uris: list[str]) -> DataFrame:
        """Data files (absolute URIs) as one frame, every page's CRC checked: a corrupt file
        fails the read, naming it, instead of being copied or served."""
        return (
            spark.read.schema(schema)
            .option("parquet.page.verify-checksum.enabled", "true")
            .parquet(*uris)
        )

    def listing(self, folder: str) -> list[str]:
        """The Parquet data files under a folder (readers skip '_' and '.' names)."""
        selector = pafs.FileSelector(f"{self.root}/{folder}", recursive=True, allow_not_found=True)
        found = []
        for info in self.fs.get_file_info(selector):
            path = self.relative(info.path)
            if (
                info.is_file
                and path.endswith(".parquet")
                and not any(part[:1] in "._" for part in path.split("/"))
            ):
                found.append(path)
        return sorted(found)

    def inspect(self, path: str, dimension: int) -> DataFile:
        """Check one file's footer against the contract; return what its AddAction needs."""
        where = f"{self.root}/{path}"
        try:
            meta = pq.read_metadata(where, filesystem=self.fs)
        except (OSError, pa.ArrowInvalid) as err:
            raise TableError(f"{self.uri}/{path}: not a readable Parquet file: {err}") from err
        problems = file_problems(meta, dimension)
        if problems:
            raise TableError(f"{self.uri}/{path}: " + "; ".join(problems))
        info = self.fs.get_file_info(where)
        mtime = info.mtime.timestamp() if info.mtime is not None else time.time()
        return DataFile(path, info.size, int(mtime * 1000), meta.num_rows, file_stats(meta))

    def of_version(self, table: DeltaTable) -> list[DataFile]:
        """The data files a Delta version references."""
        actions = pa.table(table.get_add_actions(flatten=True)).to_pylist()
        files = []
        for action in actions:
            rows = action["num_records"]
            if rows is None:  # a writer that kept no stats: the footer knows
                where = f"{self.root}/{action['path']}"
                rows = pq.read_metadata(where, filesystem=self.fs).num_rows
            files.append(
                DataFile(
                    action["path"], action["size_bytes"], action["modification_time"], rows, ""
                )
            )
        return files

    def delete(self, path: str) -> None:
        self.fs.delete_file(f"{self.root}/{path}")

    def delete_folder(self, folder: str) -> None:
        try:
            self.fs.delete_dir(f"{self.root}/{folder}")
        except FileNotFoundError:
            pass
