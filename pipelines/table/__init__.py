"""The embedding table, split by job: `contract` (schema and checks), `storage` (its files),
`refresh` (what a run embeds and removes, copy-on-write, the refresh guard), `writers` (the
commit back-ends), `vacuum`, `verify` (a version's files against their checksums and commit),
and `table` (the `EmbeddingTable` readers and writers use)."""

from pipelines.table.contract import COLUMNS, SPARK_SCHEMA, TABLE_SCHEMA
from pipelines.table.refresh import RefreshPlan
from pipelines.table.table import EmbeddingTable, Snapshot
from pipelines.table.vacuum import vacuum
from pipelines.table.writers import CommitResult

__all__ = [
    "COLUMNS",
    "SPARK_SCHEMA",
    "TABLE_SCHEMA",
    "CommitResult",
    "EmbeddingTable",
    "RefreshPlan",
    "Snapshot",
    "vacuum",
]
