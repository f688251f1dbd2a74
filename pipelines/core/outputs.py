"""Where every stage's outputs live, named once, and how a finished output folder is published.

All of a catalog's outputs sit under `<workdir>/<catalog>/<stage>/`, so several catalogs can
share a workdir; `Outputs` is the one place that spells those paths. A stage builds a folder
beside the live one and `publish_folder` swaps it in, so a reader (or the next stage) sees
the old folder or the new one, never half of one.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Outputs", "StageResult", "publish_folder"]


@dataclass(frozen=True)
class Outputs:
    """The output locations of one catalog in one workdir (`Config.outputs`)."""

    root: Path  # <workdir>/<catalog>
    table_path: str | None = None  # embed.table_path, when the table lives elsewhere

    def stage(self, name: str) -> Path:
        """A stage's own folder, for files only that stage reads back."""
        return self.root / name

    @property
    def raw_catalog(self) -> Path:
        """The generated synthetic catalog (the embedded default's source files)."""
        return self.stage("raw")

    @property
    def clean_catalog(self) -> Path:
        return self.stage("clean") / "catalog"

    @property
    def quarantine(self) -> Path:
        return self.stage("clean") / "quarantine"

    @property
    def row_hashes(self) -> Path:
        """The clean stage's hash of each source row and what it made of it (incremental)."""
        return self.stage("clean") / "row_hashes"

    @property
    def featured_catalog(self) -> Path:
        """The clean catalog with image features filled (the optional image_features stage)."""
        return self.stage("image_features") / "catalog"

    @property
    def corpus(self) -> Path:
        return self.stage("corpus")

    @property
    def vocabulary(self) -> Path:
        return self.corpus / "vocabulary.parquet"

    @property
    def word2vec(self) -> Path:
        return self.corpus / "word2vec.kv"

    @property
    def shards(self) -> Path:
        return self.stage("shard")

    @property
    def training(self) -> Path:
        return self.stage("train")

    @property
    def model_cache(self) -> Path:
        """Registered models downloaded once per version for the inference stages."""
        return self.stage("embed") / "models"

    @property
    def table(self) -> str:
        """The embedding table: `embed.table_path`, or `<workdir>/<catalog>/embed/table`."""
        return self.table_path or str(self.stage("embed") / "table")

    def evaluation(self, version: int) -> Path:
        """The evaluate stage's reports on one table version."""
        return self.stage("evaluate") / f"v{version}"


@dataclass(frozen=True)
class StageResult:
    """What a stage reports: row counts, where its outputs are, extra metrics."""

    rows: dict[str, int]
    outputs: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)


def publish_folder(staging: Path, target: Path) -> None:
    """Swap `staging` in as `target`; the old target is removed only after the swap."""
    retired = target.with_name(f".{target.name}-old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired, ignore_errors=True)
