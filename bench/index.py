"""Index stage: query throughput at recall@10 >= 0.9 of the stage's index against raw faiss.

    .venv/bin/python bench/index.py [--rows 200000] [--queries 5000] [--dims 128]

The same work for both: index the same `rows` clustered vectors (random centres in a
32-d latent space projected to `dims`, plus small full-rank noise: embeddings are not
isotropic) for cosine search, then answer the same `queries` held-out vectors (drawn the
same way, not in the index) with top-10 lists whose MAR@10 against exact search is at
least 0.9.
- ours: `pipelines.table.index.build_index` with the stage's defaults over a Delta table of the
  vectors (streams its Parquet files, picks the kind by size: HNSW at 200k, tunes efSearch
  at build time to its own target recall on table rows, saves index + ids + meta), then
  `load_index` and one batched search of the queries with the saved efSearch;
- raw:  faiss `IndexHNSWFlat(dims, 32, METRIC_INNER_PRODUCT)` with default construction
  parameters, built from the normalised vectors already in memory, with efSearch doubled
  from its default (16) until the queries themselves reach recall 0.9 (tuned on the test
  queries, which favours raw faiss; its tuning searches are not timed).
Timed: build (ours includes the Parquet read, recall measurement and the save; raw only
`add`) and the search of all queries at the chosen setting (best of three). The last line is
`RESULT index ratio=<ours queries/s / raw queries/s>`, both at recall@10 >= 0.9 (ratio 0
if ours misses that recall); build seconds are printed above it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
from deltalake import write_deltalake

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.analysis.retrieval import (
    exact_neighbours,
    mean_average_recall,
    normalised,
)
from pipelines.core.config import IndexConfig
from pipelines.table import TABLE_SCHEMA, EmbeddingTable
from pipelines.table.index import build_index, load_index

TARGET = 0.9
K = 10


def clustered(rows: int, queries: int, dims: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent_centres = rng.normal(size=(rows // 100, 32)) * 2
    projection = rng.normal(size=(32, dims)) / np.sqrt(32)

    def draw(n: int) -> np.ndarray:
        latent = latent_centres[rng.integers(0, len(latent_centres), n)] + rng.normal(size=(n, 32))
        return (latent @ projection + 0.1 * rng.normal(size=(n, dims))).astype(np.float32)

    return draw(rows), draw(queries)


def write_table(path: Path, vectors: np.ndarray) -> EmbeddingTable:
    """The vectors as version 0 of an embedding table."""
    rows, dims = vectors.shape
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dims).cast(
        TABLE_SCHEMA.field("embedding").type
    )
    table = pa.table(
        {
            "product_id": pa.array([f"p{i:07d}" for i in range(rows)]),
            "embedding": embedding,
            "model_name": pa.array(["bench"] * rows),
            "model_version": pa.array(["1"] * rows),
            "content_hash": pa.array([str(i) for i in range(rows)]),
            "embedded_at": pa.array(np.zeros(rows, dtype="datetime64[us]")).cast(
                TABLE_SCHEMA.field("embedded_at").type
            ),
        },
        schema=TABLE_SCHEMA,
    )
    write_deltalake(str(path), table)
    return EmbeddingTable(path)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return mean_average_recall(found, [set(row) for row in truth], K)


def timed_search(index: faiss.Index, queries: np.ndarray) -> tuple[float, np.ndarray]:
    """Best of three runs of the whole batch: the machine is shared, the best run is the
    one least disturbed by other work."""
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        _, rows = index.search(queries, K)
        timings.append(time.perf_counter() - started)
    return min(timings), rows


def ours(table: EmbeddingTable, queries: np.ndarray) -> tuple[float, float, float, dict]:
    started = time.perf_counter()
    info = build_index(table, IndexConfig(), seed=0)
    build = time.perf_counter() - started
    loaded = load_index(table)
    search, rows = timed_search(loaded.index, normalised(queries))
    ids = loaded.product_ids.to_numpy(zero_copy_only=False)
    positions = np.array([int(pid[1:]) for pid in ids])  # row in the generated array
    return (
        build,
        search,
        rows,
        {
            "kind": info.kind,
            **info.params,
            "build_recall": round(info.recall_at_10, 4),
            "positions": positions,
        },
    )


def raw(vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> tuple:
    base, asked = normalised(vectors), normalised(queries)
    index = faiss.IndexHNSWFlat(base.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    started = time.perf_counter()
    index.add(base)
    build = time.perf_counter() - started
    ef = index.hnsw.efSearch
    while True:
        index.hnsw.efSearch = ef
        _, rows = index.search(asked, K)
        if recall(rows, truth) >= TARGET or ef >= 4096:
            break
        ef *= 2
    search, rows = timed_search(index, asked)
    return build, search, rows, ef


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=5_000)
    parser.add_argument("--dims", type=int, default=128)
    args = parser.parse_args()
    print(
        f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, "
        f"{args.rows:,} x {args.dims} vectors, {args.queries:,} held-out queries"
    )
    vectors, queries = clustered(args.rows, args.queries, args.dims, seed=0)
    _, truth = exact_neighbours(vectors, queries, K)

    with tempfile.TemporaryDirectory() as scratch:
        table = write_table(Path(scratch) / "table", vectors)
        our_build, our_search, our_rows, detail = ours(table, queries)
    positions = detail.pop("positions")
    our_recall = recall(positions[our_rows], truth)
    raw_build, raw_search, raw_rows, raw_ef = raw(vectors, queries, truth)
    raw_recall = recall(raw_rows, truth)

    our_qps, raw_qps = args.queries / our_search, args.queries / raw_search
    print(
        f"ours: build {our_build:.1f} s, {our_qps:,.0f} queries/s, recall@10 "
        f"{our_recall:.4f}  {detail}"
    )
    print(
        f"raw:  build {raw_build:.1f} s, {raw_qps:,.0f} queries/s, recall@10 "
        f"{raw_recall:.4f}  (hnsw m=32, efConstruction=40, efSearch={raw_ef})"
    )
    ratio = our_qps / raw_qps if our_recall >= TARGET and raw_recall >= TARGET else 0.0
    print(f"RESULT index ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
