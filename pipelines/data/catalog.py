"""The clean catalog: the canonical schema every stage after clean reads, and its readers.

The clean stage writes it to `Outputs.clean_catalog`; the optional image_features stage
writes a copy with image features filled to `Outputs.featured_catalog`, stamped with the clean
write it came from. Later stages read through `read_clean`, which picks the right one and
refuses a featured copy of an older clean catalog.

A clean catalog is sealed: the clean stage writes a completion record into the folder last
(`seal_catalog`: its part files with their sizes, rows, when, the config hash), and
`read_clean` refuses a folder without one or whose files differ from it (a half-written,
truncated or hand-edited catalog), naming it, so no stage reads a catalog clean never
finished; the embed stage would otherwise delete every product missing from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.core.config import CatalogConfig, Config
from pipelines.core.errors import CatalogError
from pipelines.core.outputs import check_sealed, seal

if TYPE_CHECKING:
    from pipelines.tasks.contract import TaskSpec

log = logging.getLogger(__name__)

__all__ = [
    "CLEAN_SCHEMA",
    "FEATURED_STAMP",
    "TEXT_LISTS",
    "check_sealed_catalog",
    "check_sources",
    "clean_files_stamp",
    "clean_written_at",
    "content_hash",
    "mapped",
    "mapped_tasks",
    "quarantine_counts",
    "read_clean",
    "seal_catalog",
    "text_column",
]

# The canonical clean catalog every later stage reads.
CLEAN_SCHEMA = T.StructType(
    [
        T.StructField("product_id", T.StringType(), False),
        T.StructField("title", T.StringType(), False),
        T.StructField("title_raw", T.StringType(), False),
        T.StructField("description", T.StringType(), True),
        T.StructField("bullets", T.ArrayType(T.StringType()), True),
        T.StructField("brand", T.StringType(), True),
        T.StructField("keywords", T.ArrayType(T.StringType()), True),
        T.StructField("category_path", T.ArrayType(T.StringType()), True),
        T.StructField("price", T.DoubleType(), True),
        T.StructField("currency", T.StringType(), True),
        T.StructField("product_group", T.StringType(), False),
        T.StructField("locale", T.StringType(), False),
        T.StructField("attributes", T.MapType(T.StringType(), T.StringType()), True),
        T.StructField("image_features", T.ArrayType(T.FloatType()), True),
        T.StructField("content_hash", T.StringType(), False),
        T.StructField("source", T.StringType(), False),
    ]
)

# Clean-catalog text fields held as lists of strings: the tokenizer reads them joined by a space.
TEXT_LISTS = ("bullets", "keywords")


def text_column(name: str) -> Column:
    """A text field of the clean catalog as one string (list fields joined by a space): what
    the corpus and the shared tokenizer read."""
    return F.array_join(F.col(name), " ") if name in TEXT_LISTS else F.col(name)


# Written by the image_features stage inside its catalog folder (Spark skips "_" files).
FEATURED_STAMP = "_source.json"


def content_hash() -> Column:
    """SHA-256 of what the models read, the product group included (a per-group model embeds
    a product that moved group with another MRNet); the image_features stage recomputes it
    after filling features, so embed's incremental refresh sees a product whose image
    changed."""
    content = F.to_json(
        F.struct(
            "title",
            "description",
            "bullets",
            "brand",
            "keywords",
            "image_features",
            "product_group",
        )
    )
    return F.sha2(content, 256)


def clean_files_stamp(path: Path) -> str:
    """Identity of one write of a catalog folder: Spark names part files with a fresh job id
    on every write, so their names change whenever the catalog is rewritten."""
    names = sorted(part.name for part in path.glob("part-*"))
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def seal_catalog(folder: Path, rows: int, config: Config) -> None:
    """Write a catalog folder's completion record (clean's output or its image-features
    copy), after every part file is written."""
    seal(folder, [part.name for part in folder.glob("part-*")], rows, config.digest())


def check_sealed_catalog(folder: Path, stage: str = "clean") -> dict[str, object]:
    """`folder`'s completion record, after checking its part files are the ones it lists;
    the error names the catalog and the stage (`stage`) that writes it again."""
    return check_sealed(folder, f"the {stage} catalog", f"prodvec {stage}", CatalogError, "part-*")


def clean_written_at(folder: Path) -> int:
    """When the sealed clean catalog in `folder` was written (its completion record's
    `written_at`, epoch ms): the monotonic stamp embed records in its commit, so an embed of
    an older catalog never overwrites what a newer one committed."""
    written_at = str(check_sealed_catalog(folder)["written_at"])
    return int(datetime.fromisoformat(written_at).timestamp() * 1000)


def read_clean(spark: SparkSession, config: Config, *, featured: bool = True) -> DataFrame:
    """The clean catalog, for later stages; fails clearly when clean has not run. With
    `image_features.enabled` (and `featured`), the image_features stage's copy of it (same
    schema, features filled): every later stage reads that one, and it must have been made
    from the clean catalog there now."""
    path = config.outputs.clean_catalog
    if not path.is_dir():
        raise CatalogError(f"no clean catalog at {path}: run `prodvec clean` first")
    check_sealed_catalog(path)
    if featured and config.image_features.enabled:
        featured_path = config.outputs.featured_catalog
        stamp = featured_path / FEATURED_STAMP
        if not stamp.is_file():
            raise CatalogError(
                f"image_features.enabled is true but there is no catalog at "
                f"{featured_path}: run `prodvec image_features` first"
            )
        if json.loads(stamp.read_text())["clean_files"] != clean_files_stamp(path):
            raise CatalogError(
                f"the clean catalog changed after image_features ran on it: "
                f"run `prodvec image_features` again ({featured_path})"
            )
        check_sealed_catalog(featured_path, "image_features")
        path = featured_path
    return spark.read.schema(CLEAN_SCHEMA).parquet(str(path))


def quarantine_counts(spark: SparkSession, config: Config) -> dict[str, int]:
    """Reason -> rows, read back from the written quarantine (for tests and reports)."""
    path = config.outputs.quarantine
    rows = spark.read.parquet(str(path)).groupBy("reason").count().collect()
    return {row["reason"]: row["count"] for row in rows}


def check_sources(tasks: Sequence[TaskSpec]) -> None:
    """Fail before any Spark work when a task names a column the clean catalog lacks (the
    config already checked the form of attribute and category sources)."""
    scalar = {f.name for f in CLEAN_SCHEMA.fields} - {
        "category_path",
        "bullets",
        "keywords",
        "attributes",
        "image_features",
        "title_raw",
    }
    for task in tasks:
        structured = task.source.startswith(("attributes.", "category_path"))
        if not structured and task.source not in scalar:
            raise CatalogError(
                f"task '{task.name}': source '{task.source}' is not a clean-catalog "
                f"column; use one of {sorted(scalar)}, attributes.<key>, "
                "category_path[<level>] or category_path"
            )


def mapped(catalog: CatalogConfig, source: str) -> bool:
    """Whether a task source can hold data in this catalog: its column is mapped (`title`,
    `product_group`, `locale` and `content_hash` always are)."""
    columns = catalog.columns
    if source.startswith("attributes."):
        return source.split(".", 1)[1] in catalog.attributes
    if source.startswith("category_path"):
        return columns.category_path is not None
    if source in ("title", "title_raw", "product_id", "product_group", "locale", "source",
                  "content_hash"):  # fmt: skip
        return True
    return getattr(columns, source, None) is not None


def mapped_tasks(catalog: CatalogConfig, tasks: Sequence[TaskSpec], what: str) -> list[TaskSpec]:
    """The tasks whose source this catalog maps; one log line for the others (`what` says
    which setting they came from), so any catalog runs on the same defaults."""
    kept = [task for task in tasks if mapped(catalog, task.source)]
    left = [f"{task.name} ({task.source})" for task in tasks if task not in kept]
    if left:
        log.info("%s: catalog %s does not map the source of %s: left out", what, catalog.name,
                 ", ".join(left))  # fmt: skip
    return kept
