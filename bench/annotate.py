"""Annotation helpers: positives found per 100 labels on the shared Flipkart catalog.

    .venv/bin/python bench/annotate.py [--categories 8] [--repeats 2] [--budget 200]
                                       [--batch 20] [--table work/flipkart/embed/table]

Each session simulates an annotator building one new label: "is this product in category
C" for a third-level Flipkart category C holding 0.5-3% of the catalog. The truth is held
by `pipelines.analysis.annotate.Oracle` and comes out only for the rows a strategy asks about. The
annotator starts from 5 positive and 5 negative products and, as keywords, the words that
at least two of the positive titles share (stop words, numbers and single letters left
out); then labels `budget` products in rounds of `batch`, each strategy of
`pipelines.analysis.annotate.suggest` choosing the rounds: random, keyword only, knn, uncertainty
(logistic regression) and mixed (knn + keyword + uncertainty, each source's share of a round
following its hits so far; also with naive Bayes and an MLP).

Vectors: the averaged word2vec vectors of the titles (`pipelines.analysis.retrieval.title_vectors`,
gensim trained here on the catalog's titles, no labels involved), or with `--table` the
latest version of a Flipkart embedding table from `prodvec run --conf flipkart` (joined on
uniq_id; note MRNet there was trained on category levels 0-2, which includes C).
Titles are lower-cased with punctuation removed (the clean stage's normal form, minus
Unicode folding). The last line is `RESULT annotate ratio=<mixed positives per 100 labels /
random's>`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.analysis.annotate import Oracle, simulate
from pipelines.analysis.retrieval import title_vectors
from pipelines.data.tokenizer import tokenize_arrow

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
RUNS = [
    ("random", "logreg"),
    ("keyword", "logreg"),
    ("knn", "logreg"),
    ("uncertainty", "logreg"),
    ("mixed", "logreg"),
    ("mixed", "naive_bayes"),
    ("mixed", "mlp"),
]


def load_catalog(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, usecols=["uniq_id", "product_name", "category_path"])
    frame["title"] = (
        frame["product_name"]
        .fillna("")
        .str.lower()
        .str.replace(r"[^a-z0-9]+", " ", regex=True)
        .str.strip()
    )
    levels = frame["category_path"].fillna("").str.split(">>")
    frame["level2"] = levels.str[2].str.strip().str.strip('"').fillna("")
    return frame


def word2vec_vectors(titles: np.ndarray, seed: int) -> np.ndarray:
    from gensim.models import Word2Vec

    sentences = tokenize_arrow(titles).to_pylist()
    model = Word2Vec(
        sentences, vector_size=128, min_count=3, window=5, epochs=10, workers=2, seed=seed
    )
    return title_vectors(titles, model.wv)


def table_vectors(table: str, ids: pd.Series) -> np.ndarray:
    from deltalake import DeltaTable

    data = DeltaTable(table).to_pyarrow_table(columns=["product_id", "embedding"])
    dims = len(data["embedding"][0])
    vectors = np.stack(data["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    rows = pd.Index(data["product_id"].to_numpy(zero_copy_only=False)).get_indexer(ids)
    out = np.zeros((len(ids), dims), dtype=np.float32)
    out[rows >= 0] = vectors[rows[rows >= 0]]
    return out


def seed_keywords(titles: np.ndarray) -> list[str]:
    """Words at least two of the seed positives' titles share, the most shared first."""
    counts = pd.Series(
        [
            word
            for title in titles
            for word in set(title.split())
            if word not in ENGLISH_STOP_WORDS and not word.isdigit() and len(word) > 1
        ]
    )
    shared = counts.value_counts()
    chosen = shared[shared >= 2].index[:3].tolist()
    return chosen or shared.index[:1].tolist()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--categories", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", default=None)
    args = parser.parse_args()
    path = DATA / "flipkart" / "flipkart_products.csv"
    if not path.is_file():
        print(f"needs the shared Flipkart catalog at {path}")
        return 2
    started = time.perf_counter()
    catalog = load_catalog(path)
    titles = catalog["title"].to_numpy(dtype=object)
    vectors = (
        table_vectors(args.table, catalog["uniq_id"])
        if args.table
        else word2vec_vectors(titles, args.seed)
    )
    print(
        f"{len(catalog):,} products, {vectors.shape[1]}-d "
        f"{'table' if args.table else 'word2vec title'} vectors "
        f"({time.perf_counter() - started:.1f} s)"
    )
    share = catalog["level2"].value_counts() / len(catalog)
    eligible = share[(share >= 0.005) & (share <= 0.03) & (share.index != "")]
    rng = np.random.default_rng(args.seed)
    chosen = rng.choice(
        eligible.index.to_numpy(), size=min(args.categories, len(eligible)), replace=False
    )
    found = {run: [] for run in RUNS}
    for category in chosen:
        truth = (catalog["level2"] == category).to_numpy()
        for repeat in range(args.repeats):
            seed = args.seed * 1000 + repeat
            picks = np.random.default_rng(seed)
            positives = picks.choice(np.flatnonzero(truth), 5, replace=False)
            negatives = picks.choice(np.flatnonzero(~truth), 5, replace=False)
            keywords = seed_keywords(titles[positives])
            for strategy, learner in RUNS:
                oracle = Oracle(truth)
                seeds = oracle.reveal(np.concatenate([positives, negatives]))
                found[(strategy, learner)].append(
                    simulate(
                        vectors,
                        titles,
                        oracle,
                        seeds,
                        strategy,
                        budget=args.budget,
                        batch=args.batch,
                        keywords=keywords,
                        learner=learner,
                        seed=seed,
                    )
                )
        print(f"  {category[:40]:<40} {truth.mean():6.2%}  keywords {keywords}")
    per_100 = {run: 100 * np.mean(values) / args.budget for run, values in found.items()}
    print(
        f"positives per 100 labels, {len(chosen)} categories x {args.repeats} sessions, "
        f"{args.budget} labels each:"
    )
    for (strategy, learner), value in per_100.items():
        model = f" ({learner})" if strategy in ("uncertainty", "mixed") else ""
        print(f"  {strategy + model:<24} {value:6.1f}")
    print(f"total {time.perf_counter() - started:.1f} s")
    print(
        f"RESULT annotate ratio={per_100[('mixed', 'logreg')] / per_100[('random', 'logreg')]:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
