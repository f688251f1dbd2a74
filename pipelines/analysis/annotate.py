"""Annotation helpers: ProductNet 2.1's "local models" on top of the product embeddings.

An annotator building a new label (one category, say) starts from a few positive and
negative products and wants the next products worth labelling to be, as often as possible,
positives. Candidates come from:

- `knn`: the unlabelled products nearest (cosine) to any positive, through
  `pipelines.analysis.retrieval.exact_neighbours`;
- `keyword`: unlabelled titles holding the annotator's keywords, most keywords first;
- `uncertainty`: a small classifier (`logreg`, `naive_bayes` or `mlp`) fitted on the labels
  so far, asking about the products it is least sure of (probability nearest 0.5);
- `mixed`: the three above in one round, duplicates skipped, each source's share of the
  round following its hit rate so far (`MixedSampler`; equal shares before any label);
- `random`: the baseline.

`Oracle` holds the true labels of a simulation and reveals them only when asked, counting
every request, and `simulate` runs one annotation session: seed labels, then rounds of
`batch` suggestions until `budget` labels are spent (bench/annotate.py runs it on Flipkart).

`next_batch` is the annotator's round trip (`prodvec annotate`): the labels so far in a CSV
(`product_id,category,label[,source]`), the embedding table and the clean catalog's titles in;
the next products to label out, as rows to fill in and append to that CSV. The `source` column
it writes comes back with the labels, so `mixed` learns each source's hit rate across rounds
as `MixedSampler` does within one session.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.base import ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.neural_network import MLPClassifier

from pipelines.analysis.retrieval import exact_neighbours
from pipelines.core.config import Config
from pipelines.core.errors import AnnotationError
from pipelines.data.tokenizer import tokenize_arrow

__all__ = [
    "LABEL_COLUMNS",
    "SOURCES",
    "STRATEGIES",
    "Learner",
    "MixedSampler",
    "Oracle",
    "Strategy",
    "keyword_candidates",
    "keyword_hits",
    "knn_candidates",
    "make_learner",
    "next_batch",
    "read_labels",
    "shares_to_counts",
    "simulate",
    "suggest",
    "uncertainty_candidates",
]

Strategy = Literal["random", "keyword", "knn", "uncertainty", "mixed"]
Learner = Literal["logreg", "naive_bayes", "mlp"]
STRATEGIES: tuple[Strategy, ...] = ("random", "keyword", "knn", "uncertainty", "mixed")


def keyword_hits(titles: Sequence[str | None] | np.ndarray, keywords: Iterable[str]) -> np.ndarray:
    """How many of the keywords' tokens each title holds (token matches, with the one
    tokenizer every stage uses; titles are expected normalised, keywords are lower-cased)."""
    wanted = sorted({word.lower() for word in keywords if word.strip()})
    tokens = tokenize_arrow(np.asarray(titles, dtype=object))
    hits = pc.is_in(pc.list_flatten(tokens), value_set=pa.array(wanted, pa.string())).to_numpy(
        zero_copy_only=False
    )
    parents = pc.list_parent_indices(tokens).to_numpy()
    return np.bincount(parents[hits], minlength=len(tokens))


def make_learner(learner: Learner, seed: int) -> ClassifierMixin:
    """The local model of the uncertainty sampler (ProductNet names these three)."""
    if learner == "logreg":
        return LogisticRegression(class_weight="balanced", max_iter=1000)
    if learner == "naive_bayes":
        return GaussianNB()
    if learner == "mlp":
        return MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=seed)
    raise AnnotationError(f"unknown learner {learner!r}; use logreg, naive_bayes or mlp")


def _check(vectors: np.ndarray, labels: Mapping[int, bool]) -> tuple[np.ndarray, np.ndarray]:
    """(labelled rows, their labels) after checking the rows exist."""
    rows = np.fromiter(labels.keys(), dtype=np.int64, count=len(labels))
    bad = rows[(rows < 0) | (rows >= len(vectors))]
    if len(bad):
        raise AnnotationError(
            f"labelled rows {bad[:5].tolist()} are outside the {len(vectors)} products of the pool"
        )
    return rows, np.fromiter(labels.values(), dtype=bool, count=len(labels))


def _unlabelled(size: int, rows: np.ndarray) -> np.ndarray:
    free = np.ones(size, dtype=bool)
    free[rows] = False
    return np.flatnonzero(free)


def knn_candidates(vectors: np.ndarray, labels: Mapping[int, bool], n: int) -> np.ndarray:
    """Up to n unlabelled rows, the most cosine-similar to any positive first."""
    rows, values = _check(vectors, labels)
    positives = rows[values]
    if not len(positives):
        raise AnnotationError("knn suggestions need at least one positive label")
    free = _unlabelled(len(vectors), rows)
    k = min(n, len(free))
    if k == 0:
        return free
    scores, found = exact_neighbours(vectors[free], vectors[positives], k)
    order = np.argsort(-scores.ravel(), kind="stable")
    ranked = free[found.ravel()[order]]
    _, first = np.unique(ranked, return_index=True)
    return ranked[np.sort(first)][:n]


def keyword_candidates(
    titles: Sequence[str | None] | np.ndarray,
    labels: Mapping[int, bool],
    keywords: Iterable[str],
    n: int,
    seed: int = 0,
) -> np.ndarray:
    """Up to n unlabelled rows whose titles hold a keyword, most keywords first (ties in a
    seeded random order); fewer when fewer titles match."""
    keywords = list(keywords)
    if not any(word.strip() for word in keywords):
        raise AnnotationError("keyword suggestions need at least one keyword")
    hits = keyword_hits(titles, keywords)
    rows = np.fromiter(labels.keys(), dtype=np.int64, count=len(labels))
    free = _unlabelled(len(hits), rows)
    free = free[hits[free] > 0]
    shuffled = np.random.default_rng(seed).permutation(free)
    return shuffled[np.argsort(-hits[shuffled], kind="stable")][:n]


def uncertainty_candidates(
    vectors: np.ndarray,
    labels: Mapping[int, bool],
    n: int,
    learner: Learner = "logreg",
    seed: int = 0,
) -> np.ndarray:
    """Up to n unlabelled rows the local model is least sure of (probability nearest 0.5)."""
    rows, values = _check(vectors, labels)
    if values.all() or not values.any():
        raise AnnotationError(
            "uncertainty sampling needs positive and negative labels, got "
            f"{int(values.sum())} positive of {len(values)}"
        )
    with warnings.catch_warnings():  # refitted every round on a handful of labels: an MLP
        warnings.simplefilter("ignore", ConvergenceWarning)  # that stops early is expected
        model = make_learner(learner, seed).fit(vectors[rows], values)
    free = _unlabelled(len(vectors), rows)
    positive = list(model.classes_).index(True)
    probability = model.predict_proba(vectors[free])[:, positive]
    return free[np.argsort(np.abs(probability - 0.5), kind="stable")[:n]]


def suggest(
    vectors: np.ndarray,
    titles: Sequence[str | None] | np.ndarray,
    labels: Mapping[int, bool],
    n: int,
    strategy: Strategy,
    *,
    keywords: Iterable[str] = (),
    learner: Learner = "logreg",
    seed: int = 0,
) -> np.ndarray:
    """Up to n distinct unlabelled rows to label next, by `strategy`. `mixed` here has no
    history: equal shares of knn, keyword and uncertainty candidates (a source that cannot
    run, e.g. no keyword or no negative yet, gives way to the others); across rounds, keep
    one `MixedSampler`, whose shares follow each source's hits."""
    if n < 1:
        raise AnnotationError(f"n={n}: ask for at least one suggestion")
    if len(vectors) != len(titles):
        raise AnnotationError(f"{len(vectors)} vectors but {len(titles)} titles")
    keywords = list(keywords)
    if strategy == "random":
        rows, _ = _check(vectors, labels)
        free = _unlabelled(len(vectors), rows)
        return np.random.default_rng(seed).choice(free, size=min(n, len(free)), replace=False)
    if strategy == "knn":
        return knn_candidates(vectors, labels, n)
    if strategy == "keyword":
        return keyword_candidates(titles, labels, keywords, n, seed)
    if strategy == "uncertainty":
        return uncertainty_candidates(vectors, labels, n, learner, seed)
    if strategy != "mixed":
        raise AnnotationError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
    return MixedSampler().suggest(
        vectors, titles, labels, n, keywords=keywords, learner=learner, seed=seed
    )


SOURCES: tuple[Strategy, ...] = ("knn", "keyword", "uncertainty")


def shares_to_counts(shares: Mapping[str, float], n: int) -> dict[str, int]:
    """n suggestions split over the sources by share (largest remainder), at least one each
    while n allows: a source that did badly early still gets asked, so it can recover."""
    names = sorted(shares, key=lambda name: -shares[name])
    floor = dict.fromkeys(names, 1 if n >= len(names) else 0)
    rest = n - sum(floor.values())
    total = sum(shares.values())
    exact = {name: rest * shares[name] / total for name in names}
    counts = {name: floor[name] + int(exact[name]) for name in names}
    for name in sorted(names, key=lambda name: -(exact[name] - int(exact[name])))[
        : n - sum(counts.values())
    ]:
        counts[name] += 1
    return counts


@dataclass
class MixedSampler:
    """The `mixed` strategy across rounds: each source's share of a round is its posterior
    mean hit rate, (positives + 1) / (asked + 2), from the rows it proposed before; a source
    that cannot run yet (no keyword, no negative label) gives its share to the others."""

    positives: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    asked: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    proposed: dict[int, str] = field(default_factory=dict)  # row -> the source that asked

    def suggest(
        self,
        vectors: np.ndarray,
        titles: Sequence[str | None] | np.ndarray,
        labels: Mapping[int, bool],
        n: int,
        *,
        keywords: Iterable[str] = (),
        learner: Learner = "logreg",
        seed: int = 0,
    ) -> np.ndarray:
        candidates = {}
        for source in SOURCES:
            try:
                candidates[source] = suggest(
                    vectors,
                    titles,
                    labels,
                    n,
                    source,
                    keywords=keywords,
                    learner=learner,
                    seed=seed,
                )
            except AnnotationError:
                continue
        if not candidates:
            raise AnnotationError(
                "mixed suggestions need a positive label, a keyword, or both "
                "positive and negative labels"
            )
        wanted = shares_to_counts(
            {
                source: (self.positives[source] + 1) / (self.asked[source] + 2)
                for source in candidates
            },
            n,
        )
        picked: dict[int, str] = {}
        for rule in (wanted, dict.fromkeys(candidates, n)):  # shares first, then fill up
            for source, rows in candidates.items():
                taken = sum(1 for owner in picked.values() if owner == source)
                for row in rows.tolist():
                    if len(picked) == n or taken >= rule[source]:
                        break
                    if row not in picked:
                        picked[row] = source
                        taken += 1
        self.proposed.update(picked)
        return np.fromiter(picked, dtype=np.int64, count=len(picked))

    def update(self, revealed: Mapping[int, bool]) -> None:
        """Credit each revealed row's label to the source that proposed it."""
        for row, positive in revealed.items():
            source = self.proposed.pop(row, None)
            if source is not None:
                self.asked[source] += 1
                self.positives[source] += int(positive)


class Oracle:
    """The hidden truth of a simulation: labels come out only through `reveal`, which
    counts what it was asked."""

    def __init__(self, truth: np.ndarray) -> None:
        self._truth = np.asarray(truth, dtype=bool)
        self.requests = 0

    def __len__(self) -> int:
        return len(self._truth)

    def reveal(self, rows: np.ndarray) -> dict[int, bool]:
        self.requests += len(rows)
        return {int(row): bool(self._truth[row]) for row in rows}


def simulate(
    vectors: np.ndarray,
    titles: Sequence[str | None] | np.ndarray,
    oracle: Oracle,
    seed_labels: Mapping[int, bool],
    strategy: Strategy,
    *,
    budget: int,
    batch: int,
    keywords: Iterable[str] = (),
    learner: Learner = "logreg",
    seed: int = 0,
) -> int:
    """Positives found among `budget` labels asked for after the seed labels, `batch` per
    round. A round the strategy cannot fill (keywords exhausted) is topped up at random, as
    an annotator would; every strategy gets the same rule."""
    labels = dict(seed_labels)
    keywords = list(keywords)
    mixer = MixedSampler()
    found = 0
    round_ = 0
    asked = oracle.requests  # the seeds may have come from the oracle too: not in the budget
    while oracle.requests - asked < budget:
        size = min(batch, budget - (oracle.requests - asked))
        if strategy == "mixed":
            picked = mixer.suggest(
                vectors,
                titles,
                labels,
                size,
                keywords=keywords,
                learner=learner,
                seed=seed + round_,
            )
        else:
            picked = suggest(
                vectors,
                titles,
                labels,
                size,
                strategy,
                keywords=keywords,
                learner=learner,
                seed=seed + round_,
            )
        if len(picked) < size:
            extra = suggest(
                vectors,
                titles,
                {**labels, **dict.fromkeys(picked.tolist(), False)},
                size - len(picked),
                "random",
                seed=seed + round_,
            )
            picked = np.concatenate([picked, extra])
        if not len(picked):
            break
        revealed = oracle.reveal(picked)
        mixer.update(revealed)
        found += sum(revealed.values())
        labels.update(revealed)
        round_ += 1
    return found


# ---- the annotator's round trip (`prodvec annotate`) ------------------------------------------

LABEL_COLUMNS = ("product_id", "category", "label", "source")
_TRUE, _FALSE = {"1", "true", "yes", "y"}, {"0", "false", "no", "n"}


def read_labels(path: Path, category: str) -> list[tuple[str, bool, str]]:
    """(product_id, label, source) of `category`'s labelled rows in the CSV at `path` (none
    when it does not exist yet); rows of other categories and rows not labelled yet are
    skipped, a label that is not yes/no is an error naming its line."""
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"product_id", "category", "label"} - set(reader.fieldnames or ())
        if missing:
            raise AnnotationError(f"{path}: no column {', '.join(sorted(missing))}")
        labels = []
        for line, row in enumerate(reader, start=2):
            value = (row["label"] or "").strip().lower()
            if row["category"] != category or not value:
                continue
            if value not in _TRUE | _FALSE:
                raise AnnotationError(f"{path}, line {line}: label {row['label']!r} is not yes/no")
            labels.append((row["product_id"], value in _TRUE, row.get("source") or ""))
    return labels


def _table_vectors(config: Config, version: int | None) -> tuple[list[str], np.ndarray]:
    from pipelines.table import EmbeddingTable  # deltalake loads only here
    from pipelines.table.index import iter_embeddings

    snapshot = EmbeddingTable.from_config(config).snapshot(version)
    ids: list[str] = []
    parts = []
    for product_ids, vectors in iter_embeddings(snapshot.files, config.index.batch_rows):
        ids += product_ids.to_pylist()
        parts.append(vectors)
    if not ids:
        raise AnnotationError(f"embedding table version {snapshot.version} has no rows")
    return ids, np.concatenate(parts)


def _titles(config: Config, ids: list[str]) -> list[str | None]:
    import pyarrow.dataset as ds

    from pipelines.data.catalog import check_sealed_catalog

    folder = config.outputs.clean_catalog
    check_sealed_catalog(folder)
    found = ds.dataset(str(folder), format="parquet").to_table(columns=["product_id", "title"])
    titles = dict(zip(found.column(0).to_pylist(), found.column(1).to_pylist(), strict=True))
    return [titles.get(product_id) for product_id in ids]


def next_batch(
    config: Config,
    category: str,
    labels_path: Path,
    n: int,
    *,
    strategy: Strategy = "mixed",
    keywords: Iterable[str] = (),
    version: int | None = None,
) -> list[dict[str, str]]:
    """The next `n` products to label for `category`, as CSV rows (`product_id`, `category`,
    `label` empty, `source`, `title`), from the table version's embeddings and the labels so
    far."""
    ids, vectors = _table_vectors(config, version)
    row_of = {product_id: row for row, product_id in enumerate(ids)}
    labelled = read_labels(labels_path, category)
    unknown = [product_id for product_id, _, _ in labelled if product_id not in row_of]
    if unknown:
        raise AnnotationError(
            f"{labels_path}: {len(unknown)} labelled product(s) not in the embedding table, "
            f"e.g. {unknown[0]!r}"
        )
    labels = {row_of[product_id]: label for product_id, label, _ in labelled}
    titles = _titles(config, ids)
    sampler = MixedSampler()
    for _, label, source in labelled:
        if source in SOURCES:
            sampler.asked[source] += 1
            sampler.positives[source] += int(label)
    if strategy == "mixed":
        rows = sampler.suggest(
            vectors, titles, labels, n, keywords=keywords, seed=config.seed + len(labels)
        )
        sources = [sampler.proposed[row] for row in rows.tolist()]
    else:
        rows = suggest(
            vectors, titles, labels, n, strategy, keywords=keywords, seed=config.seed + len(labels)
        )
        sources = [strategy] * len(rows)
    return [
        {
            "product_id": ids[row],
            "category": category,
            "label": "",
            "source": source,
            "title": titles[row] or "",
        }
        for row, source in zip(rows.tolist(), sources, strict=True)
    ]
