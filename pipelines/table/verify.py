"""Verify: check every data file of one table version against its checksums and its commit.

A commit checks its files once; disks, copies and hands can change them afterwards. `verify`
reads every page of every file of a version with its CRC checked, and compares what it finds
with what the Delta log and the commit metadata recorded: file sizes, the contract schema,
the embedding dimension, product ids (non-null, unique across the version) and row counts.
It reads the whole version (the product ids held in memory: about 20 bytes a row), so it is
an audit to run after a copy or a suspected fault, not on every read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core.errors import TableError, TableVerifyError
from pipelines.table.contract import file_problems
from pipelines.table.storage import TableFiles
from pipelines.table.table import EmbeddingTable

__all__ = ["Verified", "verify"]

_SHOWN = 5  # problems named in the error; the rest are counted


@dataclass(frozen=True)
class Verified:
    """A version that passed: how much was checked."""

    version: int
    files: int
    rows: int
    dimension: int


def verify(table_path: str | Path, version: int | None = None) -> Verified:
    """Check version `version` (default the latest); raise `TableVerifyError` naming each
    file and what is wrong with it."""
    embeddings = EmbeddingTable(table_path)
    files = embeddings.files
    table = files.open(version)
    if table is None:
        raise TableError(f"{files.uri} is not a Delta table yet (nothing committed)")
    commit = embeddings.commit_info(table.version())
    dimension = commit.get("dimension")
    if not isinstance(dimension, int):
        raise TableVerifyError(
            f"{files.uri} version {table.version()}: its commit records no embedding dimension"
        )
    problems: list[str] = []
    ids: list[pa.ChunkedArray] = []
    rows = 0
    for action in pa.table(table.get_add_actions(flatten=True)).to_pylist():
        found, file_ids, file_rows = _file_problems(files, action, dimension)
        problems += [f"{action['path']}: {problem}" for problem in found]
        ids += file_ids
        rows += file_rows
    if ids:
        chunks = [chunk.cast(pa.string()) for column in ids for chunk in column.chunks]
        problems += _id_problems(pa.chunked_array(chunks, pa.string()))
    recorded = commit.get("rows")
    if not problems and isinstance(recorded, int) and recorded != rows:
        problems.append(f"the version holds {rows} rows, its commit recorded {recorded}")
    if problems:
        more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        raise TableVerifyError(
            f"{files.uri} version {table.version()}: " + "; ".join(problems[:_SHOWN]) + more
        )
    return Verified(table.version(), len(table.file_uris()), rows, dimension)


def _file_problems(
    files: TableFiles, action: dict, dimension: int
) -> tuple[list[str], list[pa.ChunkedArray], int]:
    """One file: its size against the log, its footer against the contract and the log's row
    count, then every page read with its CRC checked. Returns (problems, ids, rows read)."""
    where = f"{files.root}/{action['path']}"
    info = files.fs.get_file_info(where)
    if not info.is_file:
        return ["missing (vacuumed, or never written?)"], [], 0
    problems = []
    if info.size != action["size_bytes"]:
        problems.append(f"{info.size} bytes on disk, the Delta log recorded {action['size_bytes']}")
    try:
        parquet = pq.ParquetFile(where, filesystem=files.fs, page_checksum_verification=True)
    except (OSError, pa.ArrowInvalid) as err:
        return [*problems, f"not a readable Parquet file ({err})"], [], 0
    problems += file_problems(parquet.metadata, dimension)
    recorded = action.get("num_records")
    if recorded is not None and recorded != parquet.metadata.num_rows:
        problems.append(
            f"{parquet.metadata.num_rows} rows in its footer, the Delta log recorded {recorded}"
        )
    ids, rows = [], 0
    try:
        for group in range(parquet.num_row_groups):
            read = parquet.read_row_group(group)  # every column: every page's CRC is checked
            ids.append(read.column("product_id"))
            rows += read.num_rows
    except (OSError, pa.ArrowInvalid) as err:
        return [*problems, f"corrupt: {err}"], [], 0
    return problems, ids, rows


def _id_problems(ids: pa.ChunkedArray) -> list[str]:
    problems = []
    if ids.null_count:
        problems.append(f"{ids.null_count} null product_id(s)")
    counts = pc.value_counts(ids.drop_null())
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        shown = ", ".join(f"{row['values']!r} x{row['counts']}" for row in repeated.to_pylist()[:3])
        problems.append(f"{len(repeated)} product_id(s) repeat across the version ({shown})")
    return problems
