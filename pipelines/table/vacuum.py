"""Vacuum: delete the table's files that no retained version references."""

from __future__ import annotations

import os
from pathlib import Path

from deltalake import DeltaTable

from pipelines.core.errors import TableError
from pipelines.table.storage import table_uri

__all__ = ["vacuum"]


def vacuum(table_path: str | Path, *, retention_hours: int, dry_run: bool = False) -> list[str]:
    """Delete files no retained version references: orphans of runs that died before their
    commit and files that left the table more than `retention_hours` ago
    (`embed.vacuum_retention_hours`). Files younger than that stay, so a running job's
    uncommitted files survive when the retention exceeds the longest job. Returns the paths
    removed (or that would be, with dry_run)."""
    uri = table_uri(table_path)
    if not DeltaTable.is_deltatable(uri):
        raise TableError(f"{uri} is not a Delta table")
    removed = DeltaTable(uri).vacuum(
        retention_hours=retention_hours,
        dry_run=dry_run,
        enforce_retention_duration=False,
        full=True,
    )
    if not dry_run and "://" not in uri:
        _remove_empty_folders(Path(uri) / "data")
    return sorted(removed)


def _remove_empty_folders(root: Path) -> None:
    """Local disks keep the folders of vacuumed files; object stores have none."""
    for folder, _, _ in os.walk(root, topdown=False):
        if folder != str(root) and not os.listdir(folder):
            os.rmdir(folder)
