"""Can the table find the same product written another way? A report any catalog can run
without labels: perturbed copies of sampled products' titles (a word dropped, a character
deleted or two swapped, as another seller or a typo writes it) search the table's embeddings;
a hit is the original product among the first k. TF-IDF of the titles answers the same
queries beside it, so a team judges a new model against the baseline it has to beat.
Also the embeddings' anisotropy: the mean cosine between random pairs (a space squeezed into
a narrow cone, every cosine near 1, ranks badly)."""

from __future__ import annotations

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from pipelines.analysis.retrieval import exact_neighbours, normalised

__all__ = ["anisotropy", "match_report", "perturb"]


def perturb(titles: list[str], seed: int, word_dropout: float, char_noise: float) -> list[str]:
    """Copies of normalised titles: each word dropped with `word_dropout` (one always stays),
    and each kept word of 4+ characters, with `char_noise`, loses one character or has two
    adjacent ones swapped. Seeded; the seed is not the training views' (unseen noise)."""
    rng = np.random.default_rng(seed)
    copies = []
    for title in titles:
        words = title.split()
        kept = [w for w in words if rng.random() >= word_dropout] or words[:1]
        noisy = []
        for word in kept:
            if len(word) >= 4 and rng.random() < char_noise:
                at = int(rng.integers(1, len(word) - 1))
                word = (word[:at] + word[at + 1:] if rng.random() < 0.5
                        else word[:at - 1] + word[at] + word[at - 1] + word[at + 1:])  # fmt: skip
            noisy.append(word)
        copies.append(" ".join(noisy))
    return copies


def _recall(found: np.ndarray, targets: np.ndarray, k: int) -> dict[str, float]:
    hits = found == targets[:, None]
    return {
        "recall_at_1": float(hits[:, 0].mean()),
        "recall_at_k": float(hits[:, :k].any(1).mean()),
    }


def match_report(titles: np.ndarray, vectors: np.ndarray, queries: np.ndarray,
                 query_vectors: np.ndarray, perturbed: list[str], k: int) -> dict[str, object]:  # fmt: skip
    """Recall@1 and @k of each query's own product (`queries`: its row) among all `vectors`,
    for the embeddings of the perturbed titles and for TF-IDF (word, sublinear) of them."""
    k = min(k, len(vectors))
    _, by_embedding = exact_neighbours(normalised(vectors), normalised(query_vectors), k)
    tfidf = TfidfVectorizer(sublinear_tf=True)
    catalog = tfidf.fit_transform(titles.astype(str))
    scores = (tfidf.transform(perturbed) @ catalog.T).toarray()
    by_tfidf = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    embedding, baseline = _recall(by_embedding, queries, k), _recall(by_tfidf, queries, k)
    return {"queries": len(queries), "k": k, "embedding": embedding, "tfidf": baseline,
            "relative": (embedding["recall_at_k"] - baseline["recall_at_k"])
            / baseline["recall_at_k"] if baseline["recall_at_k"] else None}  # fmt: skip


def anisotropy(vectors: np.ndarray, rows: int, seed: int) -> float:
    """The mean cosine between distinct products of a sample of `rows`."""
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(vectors), size=min(rows, len(vectors)), replace=False)
    unit = normalised(vectors[picked])
    n = len(unit)
    if n < 2:
        return float("nan")
    total = float((unit.sum(axis=0) ** 2).sum())  # sum over all pairs, diagonal included
    return (total - n) / (n * (n - 1))
