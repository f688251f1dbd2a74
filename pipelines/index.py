"""The index stage: a faiss index per embedding-table version, and the retrieval metric.

`exact_neighbours` is the ground truth every approximate index is measured against: cosine
similarity as an inner product of L2-normalised float32 rows in a faiss IndexFlatIP.
`mean_average_recall` is eProduct's MAR@k (section 4), so the evaluate stage and the index
build report retrieval quality with one definition. `diverse_queries` is eProduct's query
sampling (section 3.1).

The stage (`run`) indexes one table version (`index.version`, default the latest) in the
driver: faiss builds in one process, so Spark has nothing to distribute. The version's
Parquet files stream in Arrow batches straight into the index (vectors come from the list
column's flat float32 buffer, never through pandas); only the index itself and the id column
are held. Kinds, chosen by row count unless `index.kind` names one:

- `flat` (rows <= `exact_max_rows`): IndexFlatIP, exact;
- `hnsw` (rows <= `hnsw_max_rows`): IndexHNSWFlat; it keeps the full vectors, so its scores
  are exact and only the candidate set is approximate;
- `ivfpq` (beyond): IndexIVFPQ trained on a sample, wrapped in IndexRefineFlat, which
  re-ranks `rerank_factor` x k PQ candidates on the exact vectors.

The search-time knob (HNSW efSearch, IVF nprobe) starts at its configured value and doubles
until recall@10 against exact search, measured at build time on `recall_queries` rows of
the table, reaches `target_recall` (or the knob its cap); the chosen value is saved and
applied on load. Recall is tie-aware: a returned product scoring at least the exact 10th
score counts, so duplicate vectors (variants sharing a title) do not read as misses.

Layout, beside the version it indexes: `<table>/_index/v<version>/` holding `index.faiss`,
`ids.parquet` (row -> product_id) and `meta.json` (kind, params, table version, rows, dims,
recall), written last, so a folder without it is an unfinished build that loading refuses.
Delta readers skip `_`-prefixed folders and `pipelines.delta.vacuum` leaves them alone.
Vacuum itself commits versions that change no data file, so `load_index` without a version
takes the latest version's index or, failing that, the newest one whose `files_digest`
(of the data files) equals the latest version's.

Memory, driver side: flat and HNSW hold 4 x dims bytes a row plus the HNSW graph (about
8 x m bytes a row); IVF-PQ's re-ranking keeps the full vectors too (IndexRefineFlat), so a
billion 128-d rows is ~0.5 TB: beyond one machine, shard by product id first.
GPUs (when faiss sees any and `index.gpu`) run the exact searches; HNSW has no faiss GPU
form and the IVF-PQ + re-rank wrapper is not cloneable to GPU, so those build on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import faiss
import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark.sql import SparkSession
from scipy import sparse
from sklearn.cluster import kmeans_plusplus
from sklearn.decomposition import PCA
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from pipelines.config import Config, IndexConfig
from pipelines.delta import EmbeddingTable
from pipelines.errors import VectorIndexError
from pipelines.stages import StageResult
from pipelines.tokenizer import tokenize_arrow

if TYPE_CHECKING:
    from gensim.models import KeyedVectors

log = logging.getLogger(__name__)

Kind = Literal["flat", "hnsw", "ivfpq"]
INDEX_FOLDER = "_index"  # '_' prefix: Delta readers and vacuum leave it alone
RECALL_K = 10
_TIE_TOLERANCE = 1e-5  # float32 cosine noise: a score this close to the 10th counts as a tie


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


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int, *,
                     gpu: bool = True) -> tuple[np.ndarray, np.ndarray]:
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
            f"queries have {asked.shape[1]} dims but vectors have {base.shape[1]}")
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


def mean_average_recall(retrieved: Sequence[Sequence[Any]] | np.ndarray,
                        relevant: Sequence[Collection[Any]], k: int) -> float:
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
            f"{len(retrieved)} retrieved lists but {len(relevant)} relevant sets: one each per query")
    if len(relevant) == 0:
        raise VectorIndexError("no queries: MAR@k is undefined for an empty query set")
    total = 0.0
    for query, (found, matches) in enumerate(zip(retrieved, relevant, strict=True)):
        truth = set(np.asarray(matches).tolist()) if isinstance(matches, np.ndarray) else set(matches)
        if not truth:
            raise VectorIndexError(f"query {query} has no ground-truth matches")
        top = np.asarray(found)[:k].tolist() if isinstance(found, np.ndarray) else list(found)[:k]
        total += len(truth.intersection(top)) / min(k, len(truth))
    return total / len(relevant)


def title_vectors(titles: pa.Array | pa.ChunkedArray | Sequence[str | None],
                  words: KeyedVectors) -> np.ndarray:
    """Each title's average word vector, stop words and unknown words left out (eProduct 3.1
    pooled fastText vectors the same way); zero for a title with no known word. One sparse
    title x word count matrix times the word vectors: no Python loop over titles."""
    tokens = tokenize_arrow(titles)
    rows = pc.list_parent_indices(tokens).to_numpy()
    ids = pd.Index(words.index_to_key).get_indexer(pc.list_flatten(tokens).to_numpy(
        zero_copy_only=False))
    stop = pd.Index(sorted(ENGLISH_STOP_WORDS)).get_indexer(words.index_to_key) >= 0
    keep = ids >= 0
    keep[keep] = ~stop[ids[keep]]
    counts = sparse.csr_matrix((np.ones(int(keep.sum()), dtype=np.float32),
                                (rows[keep], ids[keep])), shape=(len(tokens), len(words)))
    sums = np.asarray(counts @ words.vectors, dtype=np.float32)
    known = np.asarray(counts.sum(axis=1), dtype=np.float32)
    return np.divide(sums, known, out=np.zeros_like(sums), where=known > 0)


def diverse_queries(vectors: np.ndarray, n: int, *, groups: np.ndarray | None = None,
                    dims: int = 64, seed: int = 0) -> np.ndarray:
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
        raise VectorIndexError(f"groups needs one label per row: {labels.shape[0]} labels for "
                               f"{len(array)} rows")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    unit = np.divide(array, norms, out=np.zeros_like(array), where=norms > 0)
    reduced = PCA(n_components=min(dims, *unit.shape), random_state=seed).fit_transform(unit)
    names, members = np.unique(labels, return_inverse=True)
    picked = []
    for group, quota in enumerate(_quotas(np.bincount(members, minlength=len(names)), n)):
        if quota:
            rows = np.flatnonzero(members == group)
            picked.append(rows[kmeans_plusplus(reduced[rows], n_clusters=quota,
                                               random_state=seed)[1]])
    return np.sort(np.concatenate(picked))


def _quotas(sizes: np.ndarray, n: int) -> np.ndarray:
    """n picks dealt one at a time to the groups, largest first, none beyond a group's size."""
    quotas = np.zeros(len(sizes), dtype=np.int64)
    order = np.argsort(-sizes, kind="stable")
    while quotas.sum() < n:
        open_groups = order[quotas[order] < sizes[order]][: n - quotas.sum()]
        quotas[open_groups] += 1
    return quotas


# ---- the index stage ---------------------------------------------------------------------


@dataclass(frozen=True)
class IndexInfo:
    """What a build produced (also `meta.json`, minus `folder`)."""

    folder: str
    kind: Kind
    params: dict[str, int]
    table: str
    table_version: int
    rows: int
    dims: int
    recall_at_10: float
    recall_queries: int
    build_seconds: float
    files_digest: str  # the version's data files: later versions with the same files share it


@dataclass(frozen=True)
class LoadedIndex:
    """A saved index ready to query: the faiss index, row -> product_id, and its metadata."""

    index: faiss.Index
    product_ids: pa.Array
    meta: dict[str, Any]

    def row_of(self, product_id: str) -> int:
        found = pc.index(self.product_ids, product_id).as_py()
        if found < 0:
            raise VectorIndexError(
                f"product {product_id!r} is not in version {self.meta['table_version']} of "
                f"{self.meta['table']}")
        return found

    def neighbours(self, product_id: str, k: int) -> list[tuple[str, float]]:
        """The k products most similar to `product_id` (itself excluded), best first."""
        if k < 1:
            raise VectorIndexError(f"k={k} must be at least 1")
        row = self.row_of(product_id)
        query = self.index.reconstruct(row).reshape(1, -1)
        wanted = min(k + 1, self.index.ntotal)
        scores, rows = self.index.search(query, wanted)
        hits = [(int(r), float(s)) for r, s in zip(rows[0], scores[0], strict=True)
                if r >= 0 and r != row]
        return [(self.product_ids[r].as_py(), score) for r, score in hits[:k]]


def index_folder(table_uri: str, version: int) -> str:
    return f"{table_uri.rstrip('/')}/{INDEX_FOLDER}/v{version}"


def choose_kind(rows: int, settings: IndexConfig) -> Kind:
    """`index.kind`, or by size: exact while a scan is cheap, HNSW while its graph and full
    vectors fit one machine's memory, IVF-PQ with exact re-ranking beyond."""
    if settings.kind != "auto":
        return settings.kind
    if rows <= settings.exact_max_rows:
        return "flat"
    return "hnsw" if rows <= settings.hnsw_max_rows else "ivfpq"


def iter_embeddings(files: Sequence[str],
                    batch_rows: int) -> Iterator[tuple[pa.Array, np.ndarray]]:
    """(product_id, float32 [rows, dims] normalised) per Arrow batch of the table's files."""
    for uri in files:
        filesystem, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (None, uri)
        try:
            parquet = pq.ParquetFile(path, filesystem=filesystem)
        except FileNotFoundError as err:
            raise VectorIndexError(f"table file {uri} is gone (vacuumed after this version "
                                   "left the retention window?)") from err
        for batch in parquet.iter_batches(batch_size=batch_rows,
                                          columns=["product_id", "embedding"]):
            if batch.num_rows:
                yield batch.column(0), _vectors(batch.column(1), uri)


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


def _vectors(column: pa.Array, where: str) -> np.ndarray:
    """A batch's embeddings, normalised for cosine search."""
    return normalised(list_vectors(column, where), f"embeddings in {where}")


def _new_index(kind: Kind, dims: int, rows: int, settings: IndexConfig) -> tuple[faiss.Index,
                                                                                dict[str, int]]:
    if kind == "flat":
        return faiss.IndexFlatIP(dims), {}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dims, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.hnsw_ef_construction
        return index, {"m": settings.hnsw_m, "ef_construction": settings.hnsw_ef_construction}
    lists = settings.ivf_lists or max(1, min(int(4 * math.sqrt(rows)), rows // 39))
    sub = settings.pq_subquantizers or _divisor_at_most(dims, max(1, dims // 4))
    if dims % sub:
        raise VectorIndexError(
            f"index.pq_subquantizers={sub} must divide the embedding dimension {dims}")
    quantizer = faiss.IndexFlatIP(dims)
    ivfpq = faiss.IndexIVFPQ(quantizer, dims, lists, sub, 8, faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexRefineFlat(ivfpq)
    index.k_factor = settings.rerank_factor
    return index, {"lists": lists, "subquantizers": sub, "bits": 8,
                   "rerank_factor": settings.rerank_factor}


def _divisor_at_most(value: int, limit: int) -> int:
    return max(d for d in range(1, limit + 1) if value % d == 0)


def _knob(kind: Kind, index: faiss.Index, settings: IndexConfig) -> tuple[str, int, int]:
    """(name, start, cap) of the search-time parameter that trades speed for recall."""
    if kind == "hnsw":
        return "ef_search", settings.hnsw_ef_search, 4096
    if kind == "ivfpq":
        lists = faiss.extract_index_ivf(index).nlist
        return "nprobe", min(settings.ivf_probe, lists), lists
    return "", 0, 0


def _set_knob(index: faiss.Index, name: str, value: int) -> None:
    if name == "ef_search":
        faiss.downcast_index(index).hnsw.efSearch = value
    elif name == "nprobe":
        faiss.extract_index_ivf(index).nprobe = value


def _sample_rows(rows: int, wanted: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(rows, size=min(wanted, rows),
                                                      replace=False))


def _pick(vectors: np.ndarray, start: int, rows: np.ndarray) -> np.ndarray:
    """The rows of `rows` (global, sorted) that fall in this batch, as batch vectors."""
    lo, hi = np.searchsorted(rows, [start, start + len(vectors)])
    return vectors[rows[lo:hi] - start]


def _exact_top(files: Sequence[str], queries: np.ndarray, k: int, batch_rows: int,
               gpu: bool) -> np.ndarray:
    """Exact k-th best score per query over the whole version, streamed batch by batch."""
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for _, vectors in iter_embeddings(files, batch_rows):
        scores, _ = exact_neighbours(vectors, queries, min(k, len(vectors)), gpu=gpu)
        merged = np.concatenate([best, scores], axis=1)
        best = -np.sort(-merged, axis=1)[:, :k]
    return best[:, k - 1]


def _recall(index: faiss.Index, queries: np.ndarray, kth: np.ndarray, k: int) -> float:
    """Tie-aware recall@k: a returned row counts when it scores at least the exact k-th."""
    scores, rows = index.search(queries, k)
    found = [np.flatnonzero((r >= 0) & (s >= t - _TIE_TOLERANCE)).tolist()
             for s, r, t in zip(scores, rows, kth, strict=True)]
    return mean_average_recall(found, [range(k)] * len(queries), k)


def build_index(table: EmbeddingTable, settings: IndexConfig, *, seed: int) -> IndexInfo:
    """Index one version of `table` (settings.version, else the latest) and save it beside
    the table; see the module docstring for kinds, recall and layout."""
    started = time.perf_counter()
    snapshot = table.snapshot(settings.version)
    if snapshot.rows == 0:
        raise VectorIndexError(f"version {snapshot.version} of {table.uri} has no rows to index")
    kind = choose_kind(snapshot.rows, settings)
    query_rows = _sample_rows(snapshot.rows, settings.recall_queries, seed)
    index: faiss.Index | None = None
    params: dict[str, int] = {}
    if kind == "ivfpq":
        index, params = _trained_ivfpq(snapshot.files, snapshot.rows, settings, seed)
    ids: list[pa.Array] = []
    queries: list[np.ndarray] = []
    start = 0
    for product_ids, vectors in iter_embeddings(snapshot.files, settings.batch_rows):
        if index is None:
            index, params = _new_index(kind, vectors.shape[1], snapshot.rows, settings)
        index.add(vectors)
        ids.append(product_ids)
        queries.append(_pick(vectors, start, query_rows))
        start += len(vectors)
    if start != snapshot.rows:
        raise VectorIndexError(f"version {snapshot.version} of {table.uri} lists "
                               f"{snapshot.rows} rows but its files hold {start}")
    sample = np.concatenate(queries)
    k = min(RECALL_K, snapshot.rows)
    kth = _exact_top(snapshot.files, sample, k, settings.batch_rows, settings.gpu)
    knob, value, cap = _knob(kind, index, settings)
    _set_knob(index, knob, value)
    recall = _recall(index, sample, kth, k)
    while knob and recall < settings.target_recall and value < cap:
        value = min(cap, value * 2)
        _set_knob(index, knob, value)
        recall = _recall(index, sample, kth, k)
    if knob:
        params[knob] = value
    if recall < settings.target_recall:
        log.warning("index: recall@10 %.4f stays below index.target_recall %.2f (%s %s)",
                    recall, settings.target_recall, kind, params)
    info = IndexInfo(folder=index_folder(table.uri, snapshot.version), kind=kind, params=params,
                     table=table.uri, table_version=snapshot.version, rows=snapshot.rows,
                     dims=index.d, recall_at_10=recall, recall_queries=len(sample),
                     build_seconds=time.perf_counter() - started,
                     files_digest=_files_digest(snapshot.files))
    _save(index, pa.concat_arrays(ids), info)
    log.info("index %s: %s over %d x %d, recall@10 %.4f, %s", info.folder, kind, info.rows,
             info.dims, recall, params)
    return info


def _trained_ivfpq(files: Sequence[str], rows: int, settings: IndexConfig,
                   seed: int) -> tuple[faiss.Index, dict[str, int]]:
    """IVF-PQ needs its centroids and codebooks before the first add: one streamed pass
    takes a uniform sample of `train_rows` rows to train on."""
    chosen = _sample_rows(rows, settings.train_rows, seed + 1)
    picked, start = [], 0
    for _, vectors in iter_embeddings(files, settings.batch_rows):
        picked.append(_pick(vectors, start, chosen))
        start += len(vectors)
    sample = np.concatenate(picked)
    index, params = _new_index("ivfpq", sample.shape[1], rows, settings)
    index.train(sample)
    return index, params


def _save(index: faiss.Index, product_ids: pa.Array, info: IndexInfo) -> None:
    """Index and ids first, meta.json last: its presence marks a finished build."""
    filesystem, folder = pafs.FileSystem.from_uri(_as_uri(info.folder))
    filesystem.create_dir(folder, recursive=True)
    with filesystem.open_output_stream(f"{folder}/index.faiss") as out:
        out.write(faiss.serialize_index(index).tobytes())
    pq.write_table(pa.table({"product_id": product_ids}), f"{folder}/ids.parquet",
                   filesystem=filesystem)
    with filesystem.open_output_stream(f"{folder}/meta.json") as out:
        out.write(json.dumps(_meta(info), indent=2).encode())


def _meta(info: IndexInfo) -> dict[str, Any]:
    meta = {key: value for key, value in vars(info).items() if key != "folder"}
    return meta | {"faiss_version": faiss.__version__, "metric": "cosine",
                   "built_at": datetime.now(UTC).isoformat(timespec="seconds")}


def _as_uri(path: str) -> str:
    return path if "://" in path else f"file://{path}"


def _files_digest(files: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()[:16]


def _read_meta(filesystem: pafs.FileSystem, folder: str) -> dict[str, Any] | None:
    """meta.json of a finished build, None when the folder holds none."""
    if filesystem.get_file_info(f"{folder}/meta.json").type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(f"{folder}/meta.json") as source:
        return json.loads(source.read())


def _latest_indexed(table: EmbeddingTable, filesystem: pafs.FileSystem) -> int:
    """The latest version, or the newest indexed version holding the same data files: vacuum
    (and other maintenance) commits versions that change no data, and need no new index."""
    latest = table.snapshot()
    digest = _files_digest(latest.files)
    root = pafs.FileSystem.from_uri(_as_uri(f"{table.uri}/{INDEX_FOLDER}"))[1]
    found = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    built = sorted((int(info.base_name[1:]) for info in found
                    if re.fullmatch(r"v\d+", info.base_name)), reverse=True)
    for version in (v for v in built if v <= latest.version):
        meta = _read_meta(filesystem, f"{root}/v{version}")
        if version == latest.version or (meta and meta.get("files_digest") == digest):
            return version
    return latest.version


def load_index(table: EmbeddingTable, version: int | None = None) -> LoadedIndex:
    """The saved index of a table version (default: the latest, or the index of an earlier
    version with exactly the latest's data files)."""
    filesystem = pafs.FileSystem.from_uri(_as_uri(table.uri))[0]
    if version is None:
        version = _latest_indexed(table, filesystem)
    folder = pafs.FileSystem.from_uri(_as_uri(index_folder(table.uri, version)))[1]
    meta = _read_meta(filesystem, folder)
    if meta is None:
        raise VectorIndexError(
            f"no index for version {version} of {table.uri} (looked in {folder}): run "
            f"`prodvec index index.version={version}` first")
    with filesystem.open_input_stream(f"{folder}/index.faiss") as source:
        index = faiss.deserialize_index(np.frombuffer(source.read(), dtype=np.uint8))
    for knob in ("ef_search", "nprobe"):
        if knob in meta["params"]:
            _set_knob(index, knob, meta["params"][knob])
    ids = pq.read_table(f"{folder}/ids.parquet", filesystem=filesystem).column(0)
    return LoadedIndex(index, ids.combine_chunks(), meta)


def run(spark: SparkSession, config: Config) -> StageResult:
    """Build the index of `index.version` (default the latest) of the embedding table. Spark
    is not used: faiss builds in the driver from the version's Parquet files."""
    table = EmbeddingTable.from_config(config)
    info = build_index(table, config.index, seed=config.seed)
    if mlflow.active_run():
        mlflow.log_params({f"index.{key}": value for key, value in info.params.items()})
        mlflow.set_tags({"prodvec.index.kind": info.kind,
                         "prodvec.index.table_version": str(info.table_version)})
        mlflow.log_metrics({"index_recall_at_10": info.recall_at_10,
                            "index_build_seconds": info.build_seconds})
        mlflow.log_dict(_meta(info), "index/meta.json")
    return StageResult(rows={"indexed": info.rows, "recall_queries": info.recall_queries},
                       outputs={"index": info.folder, "table": table.uri},
                       metrics={"recall_at_10": info.recall_at_10, "dims": float(info.dims)})


def neighbours_report(config: Config, product_id: str, k: int, version: int | None) -> str:
    """`prodvec neighbors`: the product and its k neighbours from the saved index, with
    titles from the clean catalog when it is there (the index alone answers otherwise)."""
    loaded = load_index(EmbeddingTable.from_config(config), version)
    hits = loaded.neighbours(product_id, k)
    titles = _titles(config, [product_id, *(pid for pid, _ in hits)])
    meta = loaded.meta
    lines = [f"{product_id}  {titles.get(product_id, '')}".rstrip(),
             (f"{len(hits)} neighbours from the {meta['kind']} index of version "
             f"{meta['table_version']} ({meta['rows']:,} products, recall@10 "
             f"{meta['recall_at_10']:.3f}):")]
    lines += [f"{rank:>3}  {pid}  {score:.4f}  {titles.get(pid, '')}".rstrip()
              for rank, (pid, score) in enumerate(hits, start=1)]
    return "\n".join(lines)


def _titles(config: Config, product_ids: list[str]) -> dict[str, str]:
    """Titles of a few products, read from the clean catalog's Parquet with a pushed-down
    filter (no Spark start-up for one lookup); empty when clean has not run here."""
    import pyarrow.dataset as ds

    folder = config.stage_dir("clean") / "catalog"
    if not folder.is_dir():
        return {}
    found = ds.dataset(str(folder), format="parquet").to_table(
        columns=["product_id", "title_raw"],
        filter=pc.field("product_id").isin(product_ids))
    return dict(zip(found.column(0).to_pylist(), found.column(1).to_pylist(), strict=True))
