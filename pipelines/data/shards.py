"""The shard-set format (`prodvec.shards/1`): Parquet files per split plus `manifest.json`.

The shard stage writes it; the training loader, the train stage and the evaluate stage read
it through these functions, so none of them needs the stage that wrote it. A shard set is
self-contained: its manifest lists every file with its row groups, the schema, the task label
maps and statistics, and it carries a copy of the vocabulary its ids come from. With
`shard.per_group`, the top manifest indexes one shard set per product group instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq

from pipelines.core.errors import ShardError

__all__ = [
    "FORMAT",
    "MANIFEST",
    "SPLITS",
    "BatchField",
    "arrow_schema",
    "describe_files",
    "load_manifest",
    "shard_sets",
]

FORMAT = "prodvec.shards/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "validation", "test")
SUBWORDS_COLUMN = "title_subwords"  # the title's subword ids
TITLE_TERMS = "title_terms.parquet"  # document frequency of each title word and subword id
Layout = Literal["fixed", "scalar", "label", "sparse"]


@dataclass(frozen=True)
class BatchField:
    """How one shard column becomes batch arrays (the loader's contract with the models).

    layout: fixed (equal-length list -> [B, width]), scalar ([B]), label (nullable scalar ->
    value + mask), sparse (nullable index list (+ values) -> dense [B, width] + mask)."""

    key: str
    layout: Layout
    column: str
    dtype: np.dtype
    width: int = 0
    values: str | None = None  # sparse: the column of values (None: multi-hot ones)
    mask: bool = False


def describe_files(split_dir: Path) -> list[dict[str, Any]]:
    """Every Parquet file of a split folder, in name order: path (relative to the shard set),
    rows, and rows per row group (the loader's units)."""
    entries = []
    for path in sorted(split_dir.glob("*.parquet")):
        metadata = pq.ParquetFile(path).metadata
        entries.append(
            {
                "path": f"{split_dir.name}/{path.name}",
                "rows": metadata.num_rows,
                "row_groups": [
                    metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)
                ],
            }
        )
    return entries


def arrow_schema(files: list[dict[str, Any]], root: Path) -> list[dict[str, str]]:
    """name and Arrow type of every shard column (from the first file's footer)."""
    if not files:
        return []
    schema = pq.read_schema(root / files[0]["path"])
    return [{"name": f.name, "type": str(f.type)} for f in schema]


def load_manifest(shard_dir: Path) -> dict[str, Any]:
    """A shard set's manifest; fails clearly when there is none or it indexes groups."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"no shard manifest at {path}: run `prodvec shard` first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if "groups" in manifest:
        raise ShardError(
            f"{path} indexes per-group shard sets; open one of "
            f"{[str(Path(shard_dir) / g['path']) for g in manifest['groups'].values()]}"
        )
    return manifest


def shard_sets(shard_dir: Path) -> dict[str | None, Path]:
    """group -> shard set folder (one entry, key None, when shards are not per group)."""
    manifest = json.loads((Path(shard_dir) / MANIFEST).read_text())
    if "groups" not in manifest:
        return {None: Path(shard_dir)}
    return {group: Path(shard_dir) / entry["path"] for group, entry in manifest["groups"].items()}


@dataclass(frozen=True)
class TitleTerms:
    """A shard set's title statistics: how many titles, and in how many of them each word id
    and each subword id occurs (`word_df` by id, `subword_ids` sorted with `subword_df`)."""

    documents: int
    word_df: np.ndarray
    subword_ids: np.ndarray
    subword_df: np.ndarray

    def idf(self, df: np.ndarray) -> np.ndarray:
        """Smoothed IDF, ln((1 + N) / (1 + df)) + 1, as float32."""
        return (np.log((1 + self.documents) / (1 + df)) + 1).astype(np.float32)


def title_terms(shard_dir: Path, manifest: dict[str, Any]) -> TitleTerms:
    """The statistics the shard stage wrote beside a shard set's splits."""
    entry = manifest.get("subwords")
    if not entry:
        raise ShardError(f"{shard_dir} has no subword ids (shard.subwords.enabled was false)")
    table = pq.read_table(Path(shard_dir) / entry["terms"])
    kinds = table.column("kind").to_numpy(zero_copy_only=False)
    ids, df = table.column("id").to_numpy(), table.column("df").to_numpy()
    word_df = np.zeros(manifest["vocabulary"]["size"], dtype=np.int64)
    words = kinds == "word"
    word_df[ids[words]] = df[words]
    return TitleTerms(entry["documents"], word_df, ids[~words], df[~words])
