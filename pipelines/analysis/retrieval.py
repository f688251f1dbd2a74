"""Retrieval math shared by the index and evaluate stages, the annotation helpers and the
benches: L2 normalisation, exact cosine neighbours (the ground truth every approximate index
is measured against: an inner product of L2-normalised float32 rows in a faiss IndexFlatIP),
eProduct's MAR@k (section 4) and its diverse query sampling (section 3.1), TF-IDF-free title
vectors for it, and the list<float> -> matrix reader of embedding columns."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from scipy import sparse
from sklearn.cluster import kmeans_plusplus
from sklearn.decomposition import PCA
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, TfidfVectorizer

from pipelines.core.errors import VectorIndexError
from pipelines.data.tokenizer import tokenize_arrow

if TYPE_CHECKING:
    from gensim.models import KeyedVectors

__all__ = [
    "category_retrieval",
    "diverse_queries",
    "exact_neighbours",
    "list_vectors",
    "mean_average_recall",
    "normalised",
    "on_gpus",
    "others",
    "title_vectors",
    "unit_vectors",
]


def normalised(vectors: np.ndarray, what: str = "vectors") -> np.ndarray:
    """A float32, C-contiguous copy with unit-length rows (zero rows stay zero), so an inner
    product is the cosine similarity. Non-finite values are an error: faiss would rank them
    silently and arbitrarily."""
    array = np.asarray(vectors)
    if array.ndim != 2:
        raise VectorIndexError(f"{what} must be a 2-d array [rows, dims], got shape {array.shape}")
    array = np.array(array, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise VectorIndexError(f"{what} row {bad} holds NaN or inf")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    np.divide(array, norms, out=array, where=norms > 0)
    return array


def exact_neighbours(
    vectors: np.ndarray, queries: np.ndarray, k: int, *, gpu: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The k most cosine-similar rows of `vectors` for each query, by exhaustive search.

    Returns (scores [q, k] float32, indices [q, k] int64 into `vectors`), best first. A k
    larger than the number of rows is an error rather than clamped: a caller computing
    recall@k on fewer than k candidates would otherwise get a metric for a different k.
    A query that is itself a row of `vectors` finds itself first (score 1.0); drop it if the
    question is "which other products". Runs on the GPUs when there are any and `gpu`.
    """
    base = normalised(vectors, "vectors")
    asked = normalised(queries, "queries")
    if asked.shape[1] != base.shape[1]:
        raise VectorIndexError(
            f"queries have {asked.shape[1]} dims but vectors have {base.shape[1]}"
        )
    if not 1 <= k <= base.shape[0]:
        raise VectorIndexError(f"k={k} must be between 1 and the {base.shape[0]} rows searched")
    index = on_gpus(faiss.IndexFlatIP(base.shape[1]), gpu)
    index.add(base)
    scores, indices = index.search(asked, k)
    return scores, indices


def on_gpus(index: faiss.Index, gpu: bool = True) -> faiss.Index:
    """The index spread over every GPU faiss sees (faiss-gpu builds), else unchanged: the
    choice is made at run time so one code path serves laptops and GPU clusters."""
    if gpu and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_all_gpus(index)
    return index


def mean_average_recall(
    retrieved: Sequence[Sequence[Any]] | np.ndarray, relevant: Sequence[Collection[Any]], k: int
) -> float:
    """eProduct's Macro-Average Recall@k (MAR@k; eProduct, section 4, "Evaluation Criteria").

    MAR@k = 1/N * sum_i r_i / g_i over the N queries, where r_i is the number of query i's
    top-k retrieved items that are true matches (any of its ground-truth matches, not only
    the first k) and g_i = min(k, number of ground-truth matches of query i), so a query
    with more than k matches can still reach 1. The paper requires at least one match per
    query; a query without any is an error here rather than a silent 0 or skip.

    `retrieved[i]` lists query i's results best first (ids of any hashable kind, e.g. the
    indices from `exact_neighbours` or a faiss index, or product ids); only its first k count,
    a repeated id counts once, and faiss's -1 padding matches nothing real. `relevant[i]` is
    query i's ground-truth matches in the same id space.
    """
    if k < 1:
        raise VectorIndexError(f"k={k} must be at least 1")
    if len(retrieved) != len(relevant):
        raise VectorIndexError(
            f"{len(retrieved)} retrieved lists but {len(relevant)} relevant sets: one each per query"
        )
    if len(relevant) == 0:
        raise VectorIndexError("no queries: MAR@k is undefined for an empty query set")
    total = 0.0
    for query, (found, matches) in enumerate(zip(retrieved, relevant, strict=True)):
        truth = (
            set(np.asarray(matches).tolist()) if isinstance(matches, np.ndarray) else set(matches)
        )
        if not truth:
            raise VectorIndexError(f"query {query} has no ground-truth matches")
        top = np.asarray(found)[:k].tolist() if isinstance(found, np.ndarray) else list(found)[:k]
        total += len(truth.intersection(top)) / min(k, len(truth))
    return total / len(relevant)


def title_vectors(
    titles: pa.Array | pa.ChunkedArray | Sequence[str | None], words: KeyedVectors
) -> np.ndarray:
    """Each title's average word vector, stop words and unknown words left out (eProduct 3.1
    pooled fastText vectors the same way); zero for a title with no known word. One sparse
    title x word count matrix times the word vectors: no Python loop over titles."""
    tokens = tokenize_arrow(titles)
    rows = pc.list_parent_indices(tokens).to_numpy()
    ids = pd.Index(words.index_to_key).get_indexer(
        pc.list_flatten(tokens).to_numpy(zero_copy_only=False)
    )
    stop = pd.Index(sorted(ENGLISH_STOP_WORDS)).get_indexer(words.index_to_key) >= 0
    keep = ids >= 0
    keep[keep] = ~stop[ids[keep]]
    counts = sparse.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.float32), (rows[keep], ids[keep])),
        shape=(len(tokens), len(words)),
    )
    sums = np.asarray(counts @ words.vectors, dtype=np.float32)
    known = np.asarray(counts.sum(axis=1), dtype=np.float32)
    return np.divide(sums, known, out=np.zeros_like(sums), where=known > 0)


def diverse_queries(
    vectors: np.ndarray, n: int, *, groups: np.ndarray | None = None, dims: int = 64, seed: int = 0
) -> np.ndarray:
    """Row indices of `n` diverse queries: eProduct 3.1's sampling, k-means++ seeding over
    title vectors (e.g. `title_vectors`, L2-normalised here to match cosine search) reduced
    by PCA to `dims` (the paper: 64-d). Each pick is drawn with probability proportional to
    its squared distance from the picks so far, so dense clusters of near-identical products
    do not crowd out the rest. With `groups` (one label per row; the paper sampled within each
    leaf category) the n picks are shared out evenly over the groups, largest first, and
    seeded within each group."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2 or not np.isfinite(array).all():
        raise VectorIndexError("diverse_queries needs a finite 2-d array of title vectors")
    if not 1 <= n <= len(array):
        raise VectorIndexError(f"n={n} queries must be between 1 and the {len(array)} rows")
    labels = np.zeros(len(array), dtype=np.int64) if groups is None else np.asarray(groups)
    if labels.shape != (len(array),):
        raise VectorIndexError(
            f"groups needs one label per row: {labels.shape[0]} labels for {len(array)} rows"
        )
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    unit = np.divide(array, norms, out=np.zeros_like(array), where=norms > 0)
    reduced = PCA(n_components=min(dims, *unit.shape), random_state=seed).fit_transform(unit)
    names, members = np.unique(labels, return_inverse=True)
    picked = []
    for group, quota in enumerate(_quotas(np.bincount(members, minlength=len(names)), n)):
        if quota:
            rows = np.flatnonzero(members == group)
            picked.append(
                rows[kmeans_plusplus(reduced[rows], n_clusters=quota, random_state=seed)[1]]
            )
    return np.sort(np.concatenate(picked))


def _quotas(sizes: np.ndarray, n: int) -> np.ndarray:
    """n picks dealt one at a time to the groups, largest first, none beyond a group's size."""
    quotas = np.zeros(len(sizes), dtype=np.int64)
    order = np.argsort(-sizes, kind="stable")
    while quotas.sum() < n:
        open_groups = order[quotas[order] < sizes[order]][: n - quotas.sum()]
        quotas[open_groups] += 1
    return quotas


def list_vectors(column: pa.Array | pa.ChunkedArray, where: str) -> np.ndarray:
    """A list<float> column as a [rows, dims] float32 matrix from its flat values buffer (no
    per-row Python); null or ragged embeddings are errors naming `where`."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise VectorIndexError(f"{where}: {column.null_count} null embeddings")
    if len(column) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    flat = column.flatten()  # respects the slice offset of the batch
    dims, rest = divmod(len(flat), len(column))
    lengths = pc.list_value_length(column)
    if rest or pc.min_max(lengths).as_py() != {"min": dims, "max": dims}:
        raise VectorIndexError(f"{where}: embeddings of different lengths")
    vectors = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return vectors.reshape(len(column), dims)


def unit_vectors(column: pa.Array, where: str) -> np.ndarray:
    """A batch's embeddings, normalised for cosine search."""
    return normalised(list_vectors(column, where), f"embeddings in {where}")


def others(
    indices: np.ndarray, queries: np.ndarray, k: int, scores: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """From k + 1 neighbours of rows that are themselves searched, the k that are not the
    query row (wherever it ranked among equal vectors; the last when it is absent)."""
    order = np.argsort(indices == queries[:, None], axis=1, kind="stable")[:, :k]
    picked = np.take_along_axis(indices, order, axis=1)
    return picked, None if scores is None else np.take_along_axis(scores, order, axis=1)


def category_retrieval(
    vectors: np.ndarray,
    titles: np.ndarray,
    leaf_category: np.ndarray,
    *,
    words: KeyedVectors,
    queries: int,
    k: int,
    seed: int,
    tfidf_max_features: int,
) -> tuple[dict[str, Any] | None, str | None]:
    """(MAR@k of the embeddings and of TF-IDF with the leaf category as ground truth, or
    why it could not run). A query's matches are the other products of its leaf category;
    queries are drawn among products whose category has another member, as eProduct 3.1
    draws them: k-means++ over the titles' averaged word vectors (`words`), within each leaf
    category. The queries depend on the titles alone, never on the embeddings judged, so two
    models are scored on the same queries. `query_rows` in the report: their sample rows."""
    leaves = pd.Series(leaf_category)
    sizes = leaves.map(leaves.value_counts())
    eligible = np.flatnonzero(leaves.notna().to_numpy() & (sizes >= 2).to_numpy())
    k = min(k, len(vectors) - 1)
    if len(eligible) < 2 or k < 1:
        return None, (
            f"retrieval: {len(eligible)} sampled products share a leaf category "
            "with another (needs 2)"
        )
    picked = eligible[
        diverse_queries(
            title_vectors(titles[eligible].tolist(), words),
            min(queries, len(eligible)),
            groups=leaves.iloc[eligible].to_numpy(),
            seed=seed,
        )
    ]
    members = leaves.groupby(leaves).indices
    relevant = [set(members[leaves.iloc[row]].tolist()) - {row} for row in picked]
    _, by_embedding = exact_neighbours(vectors, vectors[picked], k + 1)
    tfidf = TfidfVectorizer(max_features=tfidf_max_features, sublinear_tf=True).fit_transform(
        titles.astype(str)
    )
    scores = (tfidf[picked] @ tfidf.T).toarray()  # rows are L2-normalised: cosine
    by_tfidf = np.argsort(-scores, axis=1, kind="stable")[:, : k + 1]
    report: dict[str, Any] = {
        "queries": len(picked),
        "query_rows": picked.tolist(),
        "k": k,
        "ground_truth": "leaf category",
        **{
            f"mar_at_k_{features}": mean_average_recall(others(found, picked, k)[0], relevant, k)
            for features, found in (("embedding", by_embedding), ("tfidf", by_tfidf))
        },
    }
    embedding, tfidf = report["mar_at_k_embedding"], report["mar_at_k_tfidf"]
    report["relative"] = (embedding - tfidf) / tfidf if tfidf else None
    return report, None
