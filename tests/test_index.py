"""The index module: exact cosine neighbours, eProduct's MAR@k, diverse query sampling, the
index stage on the shared embedded pipeline, and `prodvec neighbors`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from gensim.models import KeyedVectors

from pipelines.analysis.retrieval import (
    diverse_queries,
    exact_neighbours,
    mean_average_recall,
    title_vectors,
    unit_vectors,
)
from pipelines.cli import main
from pipelines.core import tracking
from pipelines.core.config import IndexConfig
from pipelines.core.errors import VectorIndexError
from pipelines.stages.registry import run_stage
from pipelines.table import EmbeddingTable, vacuum
from pipelines.table.index import build_index, choose_kind, load_index


def test_exact_neighbours_match_brute_force_cosine():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(300, 16)) * rng.uniform(0.1, 10, size=(300, 1))  # varied norms
    queries = rng.normal(size=(25, 16))
    scores, indices = exact_neighbours(vectors, queries, k=7)

    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
    expected = np.argsort(-cosine, axis=1)[:, :7]
    assert scores.dtype == np.float32 and indices.shape == (25, 7)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(cosine, expected, axis=1), atol=1e-5)


def test_exact_neighbours_find_the_query_itself_first():
    vectors = np.random.default_rng(1).normal(size=(50, 8)).astype(np.float32)
    scores, indices = exact_neighbours(vectors, vectors[[3, 17]], k=1)
    assert indices[:, 0].tolist() == [3, 17]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("vectors", "queries", "k", "message"),
    [
        (np.ones((5, 4)), np.ones((2, 4)), 6, "k=6 must be between 1 and the 5 rows"),
        (np.ones((5, 4)), np.ones((2, 4)), 0, "k=0 must be between 1"),
        (np.ones((5, 4)), np.ones((2, 3)), 2, "queries have 3 dims but vectors have 4"),
        (np.ones(4), np.ones((2, 4)), 1, "vectors must be a 2-d array"),
        (np.array([[1.0, 0.0], [np.nan, 1.0]]), np.ones((1, 2)), 1, "vectors row 1 holds NaN"),
        (np.ones((3, 2)), np.array([[np.inf, 0.0]]), 1, "queries row 0 holds NaN or inf"),
    ],
)
def test_exact_neighbours_reject_bad_input(vectors, queries, k, message):
    with pytest.raises(VectorIndexError, match=message):
        exact_neighbours(vectors, queries, k)


@pytest.mark.parametrize(
    ("retrieved", "relevant", "k", "expected"),
    [
        # r_i / min(k, g_i): 2 of 3 matches found in the top 3 -> 2/3
        ([[1, 2, 9]], [{1, 2, 3}], 3, 2 / 3),
        # more matches than k: the denominator is k, so a perfect top-2 scores 1
        ([[1, 2, 3]], [{1, 2, 5, 6, 7}], 2, 1.0),
        # a match beyond the top k does not count
        ([[9, 8, 1]], [{1}], 2, 0.0),
        # macro average over queries: (1 + 0) / 2
        ([[5, 6], [7, 8]], [{5}, {1}], 2, 0.5),
        # a repeated id counts once; faiss's -1 padding matches nothing
        ([[4, 4, -1]], [{4, 5}], 3, 0.5),
        # product ids and numpy rows work alike
        (np.array([["a", "b"], ["c", "d"]]), [["b"], np.array(["x", "c"])], 2, 0.75),
    ],
)
def test_mean_average_recall_follows_eproduct(retrieved, relevant, k, expected):
    assert mean_average_recall(retrieved, relevant, k) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("retrieved", "relevant", "k", "message"),
    [
        ([[1]], [{1}, {2}], 1, "1 retrieved lists but 2 relevant sets"),
        ([[1], [2]], [{1}, set()], 1, "query 1 has no ground-truth matches"),
        ([], [], 10, "no queries"),
        ([[1]], [{1}], 0, "k=0 must be at least 1"),
    ],
)
def test_mean_average_recall_rejects_bad_input(retrieved, relevant, k, message):
    with pytest.raises(VectorIndexError, match=message):
        mean_average_recall(retrieved, relevant, k)


def test_exact_neighbours_feed_mean_average_recall():
    """Two well-separated clusters: every query's top-k are its own cluster, so MAR@k = 1."""
    rng = np.random.default_rng(2)
    centres = np.array([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    labels = np.repeat([0, 1], 20)
    vectors = centres[labels] + rng.normal(scale=0.5, size=(40, 3))
    _, indices = exact_neighbours(vectors, vectors[[0, 25]], k=5)
    relevant = [set(np.flatnonzero(labels == 0)), set(np.flatnonzero(labels == 1))]
    assert mean_average_recall(indices, relevant, k=5) == 1.0


# ---- the index stage on small tables -------------------------------------------------------

DIMS = 16


@pytest.mark.parametrize(
    ("rows", "kind", "expected"),
    [
        (100_000, "auto", "flat"),
        (100_001, "auto", "hnsw"),
        (10_000_000, "auto", "hnsw"),
        (10_000_001, "auto", "ivfpq"),
        (50, "hnsw", "hnsw"),
        (50, "ivfpq", "ivfpq"),
    ],
)
def test_index_kind_follows_size_thresholds_unless_configured(rows, kind, expected):
    assert choose_kind(rows, IndexConfig(kind=kind)) == expected


def clustered(rows: int, seed: int) -> np.ndarray:
    """Vectors around 40 centres, so neighbours are meaningful and approximate search has
    something to get wrong."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, DIMS)) * 3
    return (centres[rng.integers(0, 40, rows)] + rng.normal(size=(rows, DIMS))).astype("float32")


def commit_vectors(spark, table: EmbeddingTable, vectors: np.ndarray, app_id: str) -> None:
    data = [(f"p{i:05d}", f"{app_id}-{i}", vector.tolist()) for i, vector in enumerate(vectors)]
    frame = spark.createDataFrame(
        data, "product_id string, content_hash string, embedding array<float>"
    )
    table.commit(
        frame,
        app_id=app_id,
        run_id=f"run-{app_id}",
        mode="full",
        model_uri="models:/prodvec-test/1",
        model_name="prodvec-test",
        model_version="1",
        config_hash="cafe01",
        dimension=DIMS,
    )


@pytest.fixture(scope="module")
def two_versions(spark, tmp_path_factory) -> EmbeddingTable:
    """Version 0: 3,000 clustered vectors in five files; version 1: 1,000 other ones."""
    table = EmbeddingTable(tmp_path_factory.mktemp("index") / "table", rows_per_file=700)
    commit_vectors(spark, table, clustered(3000, seed=3), "v0")
    commit_vectors(spark, table, clustered(1000, seed=4), "v1")
    return table


def table_vectors(table: EmbeddingTable, version: int) -> tuple[list[str], np.ndarray]:
    frame = DeltaTable(table.uri, version=version).to_pyarrow_table(
        columns=["product_id", "embedding"]
    )
    return frame.column(0).to_pylist(), np.array(frame.column(1).to_pylist(), dtype=np.float32)


SMALL = {"batch_rows": 500, "recall_queries": 200}  # batches cross file boundaries


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("flat", {}),
        ("hnsw", {"hnsw_m": 16, "hnsw_ef_search": 4}),
        ("ivfpq", {"pq_subquantizers": 8, "ivf_probe": 1}),
    ],
)
def test_each_kind_indexes_a_version_and_answers_like_exact_search(two_versions, kind, params):
    info = build_index(two_versions, IndexConfig(kind=kind, version=0, **SMALL, **params), seed=5)
    assert (info.kind, info.table_version, info.rows, info.dims) == (kind, 0, 3000, DIMS)
    assert info.folder == f"{two_versions.uri}/_index/v0"
    assert info.recall_at_10 >= 0.95  # the knob was raised until target_recall
    loaded = load_index(two_versions, version=0)
    assert loaded.meta["kind"] == kind and loaded.meta["recall_at_10"] == info.recall_at_10
    assert loaded.meta["params"] == info.params
    if kind != "flat":
        knob = "ef_search" if kind == "hnsw" else "nprobe"
        assert info.params[knob] > params[f"{'hnsw_ef_search' if kind == 'hnsw' else 'ivf_probe'}"]

    ids, vectors = table_vectors(two_versions, 0)
    assert sorted(loaded.product_ids.to_pylist()) == sorted(ids)
    by_id = dict(zip(ids, vectors, strict=True))
    row = loaded.row_of("p00042")
    unit = by_id["p00042"] / np.linalg.norm(by_id["p00042"])
    np.testing.assert_allclose(loaded.index.reconstruct(row), unit, atol=1e-6)

    # independent check: MAR@10 of the saved index against exact search over the table
    queries = [f"p{i:05d}" for i in range(0, 3000, 60)]
    _, exact = exact_neighbours(vectors, np.stack([by_id[q] for q in queries]), k=11)
    truth = [{ids[r] for r in rows if ids[r] != q} for q, rows in zip(queries, exact)]
    found = [[pid for pid, _ in loaded.neighbours(q, 10)] for q in queries]
    assert mean_average_recall(found, truth, 10) >= 0.9


def test_versions_get_their_own_index_and_errors_name_what_is_missing(two_versions):
    build_index(two_versions, IndexConfig(kind="flat", version=0, **SMALL), seed=1)
    latest = build_index(two_versions, IndexConfig(kind="flat", **SMALL), seed=1)
    assert latest.table_version == 1 and latest.folder.endswith("/_index/v1")
    assert load_index(two_versions, version=0).meta["rows"] == 3000
    newest = load_index(two_versions)
    assert newest.meta["rows"] == 1000
    assert [score for _, score in newest.neighbours("p00007", 3)] == sorted(
        (score for _, score in newest.neighbours("p00007", 3)), reverse=True
    )
    with pytest.raises(VectorIndexError, match="product 'p02500' is not in version 1"):
        newest.neighbours("p02500", 3)
    with pytest.raises(VectorIndexError, match="no index for version 7 of .*prodvec index"):
        load_index(two_versions, version=7)


def test_vacuum_and_delta_readers_leave_the_index_folder_alone(spark, tmp_path):
    """Vacuum removes version 0's files and commits versions of its own (same data files as
    version 1): the index stays, and still answers for the latest version."""
    table = EmbeddingTable(tmp_path / "table")
    commit_vectors(spark, table, clustered(300, seed=6), "v0")
    commit_vectors(spark, table, clustered(200, seed=7), "v1")
    build_index(table, IndexConfig(kind="flat", **SMALL), seed=1)
    folder = Path(table.uri) / "_index" / "v1"
    before = sorted(path.name for path in folder.iterdir())
    assert before == ["ids.parquet", "index.faiss", "meta.json"]
    removed = vacuum(table.uri, retention_hours=0)
    assert removed and not any("_index" in path for path in removed)
    assert sorted(path.name for path in folder.iterdir()) == before
    assert table.version() > 1 and DeltaTable(table.uri).to_pyarrow_table().num_rows == 200
    assert load_index(table).meta["table_version"] == 1
    with pytest.raises(VectorIndexError, match="is gone"):
        build_index(table, IndexConfig(kind="flat", version=0, **SMALL), seed=1)


def test_an_unfinished_build_is_refused(two_versions, tmp_path):
    build_index(two_versions, IndexConfig(kind="flat", version=0, **SMALL), seed=1)
    (Path(two_versions.uri) / "_index" / "v0" / "meta.json").unlink()
    with pytest.raises(VectorIndexError, match="no index for version 0"):
        load_index(two_versions, version=0)


@pytest.mark.parametrize(
    ("column", "message"),
    [
        (pa.array([[1.0, 2.0], None], pa.list_(pa.float32())), "1 null embeddings"),
        (pa.array([[1.0, 2.0], [1.0, 2.0, 3.0]], pa.list_(pa.float32())), "different lengths"),
        (pa.array([[1.0, 2.0, 3.0], [1.0]], pa.list_(pa.float32())), "different lengths"),
        (pa.array([[1.0, float("nan")]], pa.list_(pa.float32())), "holds NaN or inf"),
    ],
)
def test_bad_embedding_batches_are_refused_by_name(column, message):
    with pytest.raises(VectorIndexError, match=message):
        unit_vectors(column, "part-0.parquet")


def test_vectors_come_from_the_flat_buffer_of_a_sliced_batch():
    column = pa.array([[3.0, 4.0], [0.0, 2.0], [6.0, 8.0]], pa.list_(pa.float32())).slice(1)
    np.testing.assert_allclose(unit_vectors(column, "x"), [[0.0, 1.0], [0.6, 0.8]])


# ---- the stage, `prodvec neighbors` and diverse queries on the embedded pipeline ------------


@pytest.fixture(scope="module")
def indexed(embedded_pipeline, tmp_path_factory):
    """The index stage run on a copy of the shared pipeline's table (the fixture stays
    read-only), with its own MLflow store: (config, StageResult)."""
    config, results = embedded_pipeline
    scratch = tmp_path_factory.mktemp("indexed")
    shutil.copytree(results["embed"].outputs["table"], scratch / "table")
    config = config.model_copy(
        update={
            "embed": config.embed.model_copy(update={"table_path": str(scratch / "table")}),
            "tracking": config.tracking.model_copy(
                update={"uri": f"sqlite:///{scratch}/mlflow.db"}
            ),
        }
    )
    return config, run_stage("index", config)


def test_the_stage_indexes_the_embedded_table_exactly_and_logs_to_mlflow(indexed):
    config, result = indexed
    products = DeltaTable(config.embed.table_path).to_pyarrow_table().num_rows
    assert result.rows == {"indexed": products, "recall_queries": 1000}
    assert result.outputs["index"] == f"{config.embed.table_path}/_index/v0"
    meta = json.loads((Path(result.outputs["index"]) / "meta.json").read_text())
    dims = config.train.embedding_size
    assert (meta["kind"], meta["rows"], meta["dims"]) == ("flat", products, dims)
    assert meta["recall_at_10"] == result.metrics["recall_at_10"] == 1.0

    tracking.configure(config)
    run = mlflow.search_runs(filter_string="tags.`prodvec.stage` = 'index'", output_format="list")[
        0
    ]
    assert run.data.metrics["index_recall_at_10"] == 1.0
    assert run.data.metrics["rows_indexed"] == products
    assert run.data.tags["prodvec.index.kind"] == "flat"


def cli_overrides(config) -> list[str]:
    return [
        f"workdir={config.workdir}",
        f"embed.table_path={config.embed.table_path}",
        f"tracking.uri={config.tracking.uri}",
    ]


@pytest.mark.parametrize("order", ["options first", "id first"])
def test_neighbors_command_prints_ids_scores_and_titles(indexed, capsys, order):
    config, _ = indexed
    loaded = load_index(EmbeddingTable.from_config(config))
    product = loaded.product_ids[0].as_py()
    arguments = ["-k", "3", product] if order == "options first" else [product, "-k", "3"]
    assert main(["neighbors", *arguments, *cli_overrides(config)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(product) and len(lines[0]) > len(product)  # its title follows
    assert (
        f"3 neighbours from the flat index of version 0 ({len(loaded.product_ids):,} "
        "products, recall@10 1.000)" in lines[1]
    )
    rows = [line.split(maxsplit=3) for line in lines[2:]]
    assert [row[0] for row in rows] == ["1", "2", "3"]
    assert [row[1] for row in rows] == [pid for pid, _ in loaded.neighbours(product, 3)]
    assert all(len(row) == 4 and product not in row[1] for row in rows)  # ids, scores, titles


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["no-such-product"], "product 'no-such-product' is not in version 0"),
        (["--version", "3", "x"], "no index for version 3"),
    ],
)
def test_neighbors_command_fails_clearly(indexed, capsys, arguments, message):
    config, _ = indexed
    assert main(["neighbors", *arguments, *cli_overrides(config)]) == 2
    assert message in capsys.readouterr().err


def test_neighbors_command_refuses_an_unknown_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["neighbors", "x", "--bogus", "workdir=/nowhere"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_diverse_queries_cover_more_categories_than_uniform_sampling(embedded_pipeline):
    """Seeded within each top-level group (as eProduct seeds within categories), the picks
    spread over more second-level categories, which the sampler is never told about."""
    config, results = embedded_pipeline
    catalog = pq.read_table(config.outputs.clean_catalog, columns=["title", "category_path"])
    words = KeyedVectors.load(results["corpus"].outputs["vectors"])
    vectors = title_vectors(catalog.column("title"), words)
    paths = catalog.column("category_path").to_pylist()
    groups = np.array([path[0] if path else "" for path in paths])
    categories = np.array([" > ".join(path[:2]) for path in paths])
    n = 20

    def covered(rows: np.ndarray) -> int:
        return len(set(categories[rows]))

    diverse = [covered(diverse_queries(vectors, n, groups=groups, seed=seed)) for seed in range(5)]
    uniform = [
        covered(np.random.default_rng(seed).choice(len(categories), n, replace=False))
        for seed in range(50)
    ]
    assert np.mean(diverse) > np.mean(uniform) + 1, (diverse, np.mean(uniform))


@pytest.mark.parametrize(
    ("groups", "n", "expected_per_group"),
    [
        (None, 7, {0: 7}),
        (np.repeat(["a", "b", "c"], [10, 5, 1]), 7, {"a": 3, "b": 3, "c": 1}),
        (np.repeat(["a", "b"], [10, 2]), 9, {"a": 7, "b": 2}),
    ],
)
def test_diverse_queries_share_picks_over_groups(groups, n, expected_per_group):
    vectors = np.random.default_rng(0).normal(size=(16 if groups is None else len(groups), 8))
    picked = diverse_queries(vectors, n, groups=groups, seed=1)
    assert len(set(picked.tolist())) == n
    labels = np.zeros(len(vectors), dtype=int) if groups is None else groups
    assert dict(zip(*np.unique(labels[picked], return_counts=True), strict=True)) == (
        expected_per_group
    )


def test_title_vectors_average_known_words_and_skip_stop_words():
    words = KeyedVectors(vector_size=2)
    words.add_vectors(["red", "shoe", "the"], np.array([[1, 0], [0, 1], [9, 9]], np.float32))
    vectors = title_vectors(["red shoe", "the red", "unknown", None], words)
    np.testing.assert_allclose(vectors, [[0.5, 0.5], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])


@pytest.mark.parametrize(
    ("vectors", "n", "message"),
    [
        (np.ones((5, 3)), 6, "n=6 queries must be between 1 and the 5 rows"),
        (np.ones((5, 3)), 0, "n=0 queries"),
        (np.full((5, 3), np.nan), 2, "finite 2-d array"),
        (np.ones((5, 3)), 2, "groups needs one label per row: 4 labels for 5 rows"),
    ],
)
def test_diverse_queries_reject_bad_input(vectors, n, message):
    groups = np.arange(4) if "groups" in message else None
    with pytest.raises(VectorIndexError, match=message):
        diverse_queries(vectors, n, groups=groups)
