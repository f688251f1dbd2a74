"""Where every stage's outputs live, named once, and how a finished output folder is published.

All of a catalog's outputs sit under `<workdir>/<catalog>/<stage>/`, so several catalogs can
share a workdir; `Outputs` is the one place that spells those paths. A stage builds a folder
beside the live one and `publish_folder` swaps it in, so a reader (or the next stage) sees
the old folder or the new one, never half of one. A published folder carries a completion
record written last (`seal`: its files and sizes, rows, when, the config hash); readers
`check_sealed` it and refuse a folder a stage did not finish, naming it.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pipelines.core.errors import CorpusError, ProdvecError

__all__ = [
    "COMPLETION_RECORD",
    "Outputs",
    "StageResult",
    "check_corpus",
    "check_sealed",
    "publish_folder",
    "seal",
]

COMPLETION_RECORD = "_prodvec_complete.json"


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

    @property
    def cross_locale_table(self) -> str:
        """The locale-agnostic embeddings (the optional cross_locale stage), a table of its own
        beside the embedding table."""
        return str(self.stage("cross_locale") / "table")

    @property
    def rejected_pairs(self) -> Path:
        """Rows of the cross_locale stage's pairs file it could not use, each with its reason."""
        return self.stage("cross_locale") / "rejected_pairs"

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


def _sizes(folder: Path, names: list[str]) -> dict[str, int]:
    return {name: (folder / name).stat().st_size for name in names if (folder / name).is_file()}


def seal(folder: Path, names: list[str], rows: int, config_hash: str) -> None:
    """Write `folder`'s completion record, after every file it names is written."""
    record = {
        "rows": rows,
        "files": _sizes(folder, sorted(names)),
        "written_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "config_hash": config_hash,
    }
    (folder / COMPLETION_RECORD).write_text(json.dumps(record, indent=1))


def check_sealed(
    folder: Path, what: str, rerun: str, error: type[ProdvecError], pattern: str | None = None
) -> dict[str, object]:
    """`folder`'s completion record, after checking the files it lists are there with their
    sizes (and, with `pattern`, that no other file matching it is): else `error` naming
    `what` and the command (`rerun`) that writes it again."""
    record_path = folder / COMPLETION_RECORD
    if not record_path.is_file():
        raise error(
            f"{what} at {folder} has no completion record ({COMPLETION_RECORD}): it was not "
            f"finished; run `{rerun}`"
        )
    record = json.loads(record_path.read_text())
    sealed: dict[str, int] = record["files"]
    names = sorted({*sealed, *(p.name for p in folder.glob(pattern))} if pattern else sealed)
    found = _sizes(folder, names)
    if found != sealed:
        missing = sorted(set(sealed) - set(found))
        extra = sorted(set(found) - set(sealed))
        resized = sorted(n for n in set(found) & set(sealed) if found[n] != sealed[n])
        raise error(
            f"{what} at {folder} is not the one its stage sealed ({len(sealed)} files, "
            f"{record['rows']:,} rows): {len(missing)} missing, {len(extra)} extra, "
            f"{len(resized)} of another size; run `{rerun}`"
        )
    return dict(record)


def check_corpus(outputs: Outputs) -> dict[str, object]:
    """The corpus stage's completion record (vocabulary, word vectors, neighbour table),
    after checking its files: what the shard, train and evaluate stages read from it."""
    return check_sealed(outputs.corpus, "the corpus output", "prodvec corpus", CorpusError)
