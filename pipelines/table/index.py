"""The faiss index of one embedding-table version: built in the driver (faiss builds in one
process, so Spark has nothing to distribute), tuned, saved beside the version, loaded, searched. The version's
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
Delta readers skip `_`-prefixed folders and `pipelines.table.vacuum` leaves them alone.
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.analysis.retrieval import (
    exact_neighbours,
    mean_average_recall,
    unit_vectors,
)
from pipelines.core.config import IndexConfig
from pipelines.core.errors import VectorIndexError
from pipelines.table import EmbeddingTable

__all__ = [
    "INDEX_FOLDER",
    "RECALL_K",
    "IndexInfo",
    "Kind",
    "LoadedIndex",
    "build_index",
    "choose_kind",
    "index_folder",
    "index_meta",
    "iter_embeddings",
    "load_index",
]

log = logging.getLogger(__name__)

Kind = Literal["flat", "hnsw", "ivfpq"]


INDEX_FOLDER = "_index"  # '_' prefix: Delta readers and vacuum leave it alone


RECALL_K = 10


_TIE_TOLERANCE = 1e-5  # float32 cosine noise: a score this close to the 10th counts as a tie


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
                f"{self.meta['table']}"
            )
        return found

    def neighbours(self, product_id: str, k: int) -> list[tuple[str, float]]:
        """The k products most similar to `product_id` (itself excluded), best first."""
        if k < 1:
            raise VectorIndexError(f"k={k} must be at least 1")
        row = self.row_of(product_id)
        query = self.index.reconstruct(row).reshape(1, -1)
        wanted = min(k + 1, self.index.ntotal)
        scores, rows = self.index.search(query, wanted)
        hits = [
            (int(r), float(s))
            for r, s in zip(rows[0], scores[0], strict=True)
            if r >= 0 and r != row
        ]
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


def iter_embeddings(files: Sequence[str], batch_rows: int) -> Iterator[tuple[pa.Array, np.ndarray]]:
    """(product_id, float32 [rows, dims] normalised) per Arrow batch of the table's files."""
    for uri in files:
        filesystem, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (None, uri)
        try:
            parquet = pq.ParquetFile(path, filesystem=filesystem, page_checksum_verification=True)
        except FileNotFoundError as err:
            raise VectorIndexError(
                f"table file {uri} is gone (vacuumed after this version left the retention window?)"
            ) from err
        batches = parquet.iter_batches(batch_size=batch_rows, columns=["product_id", "embedding"])
        while True:
            try:
                batch = next(batches, None)
            except OSError as err:  # a page whose CRC does not match: the file changed on disk
                raise VectorIndexError(
                    f"table file {uri} is corrupt ({err}): `prodvec verify` checks the version"
                ) from err
            if batch is None:
                break
            if batch.num_rows:
                yield batch.column(0), unit_vectors(batch.column(1), uri)


def _new_index(
    kind: Kind, dims: int, rows: int, settings: IndexConfig
) -> tuple[faiss.Index, dict[str, int]]:
    if kind == "flat":
        return faiss.IndexFlatIP(dims), {}
    if kind == "hnsw":
        graph = faiss.IndexHNSWFlat(dims, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = settings.hnsw_ef_construction
        return graph, {"m": settings.hnsw_m, "ef_construction": settings.hnsw_ef_construction}
    lists = settings.ivf_lists or max(1, min(int(4 * math.sqrt(rows)), rows // 39))
    sub = settings.pq_subquantizers or _divisor_at_most(dims, max(1, dims // 4))
    if dims % sub:
        raise VectorIndexError(
            f"index.pq_subquantizers={sub} must divide the embedding dimension {dims}"
        )
    quantizer = faiss.IndexFlatIP(dims)
    ivfpq = faiss.IndexIVFPQ(quantizer, dims, lists, sub, 8, faiss.METRIC_INNER_PRODUCT)
    refined = faiss.IndexRefineFlat(ivfpq)
    refined.k_factor = settings.rerank_factor
    return refined, {
        "lists": lists,
        "subquantizers": sub,
        "bits": 8,
        "rerank_factor": settings.rerank_factor,
    }


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
        graph: Any = faiss.downcast_index(index)  # the HNSW index behind the generic handle
        graph.hnsw.efSearch = value
    elif name == "nprobe":
        faiss.extract_index_ivf(index).nprobe = value


def _sample_rows(rows: int, wanted: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(rows, size=min(wanted, rows), replace=False))


def _pick(vectors: np.ndarray, start: int, rows: np.ndarray) -> np.ndarray:
    """The rows of `rows` (global, sorted) that fall in this batch, as batch vectors."""
    lo, hi = np.searchsorted(rows, [start, start + len(vectors)])
    return vectors[rows[lo:hi] - start]


def _exact_top(
    files: Sequence[str], queries: np.ndarray, k: int, batch_rows: int, gpu: bool
) -> np.ndarray:
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
    found = [
        np.flatnonzero((r >= 0) & (s >= t - _TIE_TOLERANCE)).tolist()
        for s, r, t in zip(scores, rows, kth, strict=True)
    ]
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
    if index is None or start != snapshot.rows:
        raise VectorIndexError(
            f"version {snapshot.version} of {table.uri} lists "
            f"{snapshot.rows} rows but its files hold {start}"
        )
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
        log.warning(
            "index: recall@10 %.4f stays below index.target_recall %.2f (%s %s)",
            recall,
            settings.target_recall,
            kind,
            params,
        )
    info = IndexInfo(
        folder=index_folder(table.uri, snapshot.version),
        kind=kind,
        params=params,
        table=table.uri,
        table_version=snapshot.version,
        rows=snapshot.rows,
        dims=index.d,
        recall_at_10=recall,
        recall_queries=len(sample),
        build_seconds=time.perf_counter() - started,
        files_digest=_files_digest(snapshot.files),
    )
    _save(index, pa.concat_arrays(ids), info)
    log.info(
        "index %s: %s over %d x %d, recall@10 %.4f, %s",
        info.folder,
        kind,
        info.rows,
        info.dims,
        recall,
        params,
    )
    return info


def _trained_ivfpq(
    files: Sequence[str], rows: int, settings: IndexConfig, seed: int
) -> tuple[faiss.Index, dict[str, int]]:
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
    pq.write_table(
        pa.table({"product_id": product_ids}), f"{folder}/ids.parquet", filesystem=filesystem
    )
    with filesystem.open_output_stream(f"{folder}/meta.json") as out:
        out.write(json.dumps(index_meta(info), indent=2).encode())


def index_meta(info: IndexInfo) -> dict[str, Any]:
    meta = {key: value for key, value in vars(info).items() if key != "folder"}
    return meta | {
        "faiss_version": faiss.__version__,
        "metric": "cosine",
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


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
    built = sorted(
        (int(info.base_name[1:]) for info in found if re.fullmatch(r"v\d+", info.base_name)),
        reverse=True,
    )
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
            f"`prodvec index index.version={version}` first"
        )
    with filesystem.open_input_stream(f"{folder}/index.faiss") as source:
        index = faiss.deserialize_index(np.frombuffer(source.read(), dtype=np.uint8))
    for knob in ("ef_search", "nprobe"):
        if knob in meta["params"]:
            _set_knob(index, knob, meta["params"][knob])
    ids = pq.read_table(f"{folder}/ids.parquet", filesystem=filesystem).column(0)
    return LoadedIndex(index, ids.combine_chunks(), meta)
