"""Index stage: the faiss index of one embedding-table version (`index.version`, default the
latest; `pipelines.table.index` builds it), and `prodvec neighbors`, which answers from it."""

from __future__ import annotations

import mlflow
import pyarrow.compute as pc
from pyspark.sql import SparkSession

from pipelines.core.config import Config
from pipelines.core.outputs import StageResult
from pipelines.table import EmbeddingTable
from pipelines.table.index import build_index, index_meta, load_index

__all__ = ["neighbours_report", "run"]


def run(spark: SparkSession, config: Config) -> StageResult:
    """Build the index of `index.version` (default the latest) of the embedding table. Spark
    is not used: faiss builds in the driver from the version's Parquet files."""
    table = EmbeddingTable.from_config(config)
    info = build_index(table, config.index, seed=config.seed)
    if mlflow.active_run():
        mlflow.log_params({f"index.{key}": value for key, value in info.params.items()})
        mlflow.set_tags(
            {
                "prodvec.index.kind": info.kind,
                "prodvec.index.table_version": str(info.table_version),
            }
        )
        mlflow.log_metrics(
            {"index_recall_at_10": info.recall_at_10, "index_build_seconds": info.build_seconds}
        )
        mlflow.log_dict(index_meta(info), "index/meta.json")
    return StageResult(
        rows={"indexed": info.rows, "recall_queries": info.recall_queries},
        outputs={"index": info.folder, "table": table.uri},
        metrics={"recall_at_10": info.recall_at_10, "dims": float(info.dims)},
    )


def neighbours_report(config: Config, product_id: str, k: int, version: int | None) -> str:
    """`prodvec neighbors`: the product and its k neighbours from the saved index, with
    titles from the clean catalog when it is there (the index alone answers otherwise)."""
    loaded = load_index(EmbeddingTable.from_config(config), version)
    hits = loaded.neighbours(product_id, k)
    titles = _titles(config, [product_id, *(pid for pid, _ in hits)])
    meta = loaded.meta
    lines = [
        f"{product_id}  {titles.get(product_id, '')}".rstrip(),
        (
            f"{len(hits)} neighbours from the {meta['kind']} index of version "
            f"{meta['table_version']} ({meta['rows']:,} products, recall@10 "
            f"{meta['recall_at_10']:.3f}):"
        ),
    ]
    lines += [
        f"{rank:>3}  {pid}  {score:.4f}  {titles.get(pid, '')}".rstrip()
        for rank, (pid, score) in enumerate(hits, start=1)
    ]
    return "\n".join(lines)


def _titles(config: Config, product_ids: list[str]) -> dict[str, str]:
    """Titles of a few products, read from the clean catalog's Parquet with a pushed-down
    filter (no Spark start-up for one lookup); empty when clean has not run here."""
    import pyarrow.dataset as ds

    folder = config.outputs.clean_catalog
    if not folder.is_dir():
        return {}
    found = ds.dataset(str(folder), format="parquet").to_table(
        columns=["product_id", "title_raw"], filter=pc.field("product_id").isin(product_ids)
    )
    return dict(zip(found.column(0).to_pylist(), found.column(1).to_pylist(), strict=True))
