"""The embedding table: versions and time travel for every reader, crash safety and vacuum,
contract checks before commit, idempotent re-runs, incremental refresh, concurrent commits,
the refresh guard, the catalog stamp, re-planning after a lost race, verified files."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F

from pipelines.cli import main
from pipelines.core.config import load_config
from pipelines.core.errors import (
    ConfigError,
    MassChangeError,
    StaleCatalogError,
    TableError,
    VectorIndexError,
)
from pipelines.table import TABLE_SCHEMA, EmbeddingTable, vacuum
from pipelines.table.index import iter_embeddings
from pipelines.table.refresh import ChangeLimits, RefreshSource
from pipelines.table.storage import damaged_file

DIM = 8
MODEL = {
    "model_uri": "models:/prodvec-test/1",
    "model_name": "prodvec-test",
    "model_version": "1",
    "config_hash": "cafe01",
    "dimension": DIM,
}


def catalog_rows(ids, tag: str = "a") -> list[tuple[str, str]]:
    return [(f"p{i:05d}", f"{i}-{tag}") for i in ids]


def embed(spark, rows: list[tuple[str, str]], seed: int, dimension: int = DIM):
    """A fake model: a random vector per product, as the inference stage would hand over."""
    vectors = np.random.default_rng(seed).normal(size=(len(rows), dimension)).astype("float32")
    data = [(pid, chash, vector.tolist()) for (pid, chash), vector in zip(rows, vectors)]
    return spark.createDataFrame(
        data, "product_id string, content_hash string, embedding array<float>"
    )


def commit(table: EmbeddingTable, frame, app_id: str, mode: str = "full", **kwargs):
    return table.commit(
        frame, app_id=app_id, run_id=f"mlflow-{app_id}", mode=mode, **{**MODEL, **kwargs}
    )


def read(path: Path, version: int | None = None) -> dict[str, dict]:
    table = DeltaTable(str(path), version=version).to_pyarrow_table()
    return {row["product_id"]: row for row in table.to_pylist()}


def parquet_on_disk(path: Path) -> set[str]:
    return {
        str(p.relative_to(path))
        for p in (path / "data").rglob("*.parquet")
        if not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    }


def snapshot_paths(table: EmbeddingTable, version: int | None = None) -> set[str]:
    return {f[len(table.uri) + 1 :] for f in table.snapshot(version).files}


@pytest.fixture(scope="module")
def two_versions(spark, tmp_path_factory):
    """Version 0: 2000 products; version 1: a full refresh down to 1500, new hashes."""
    path = tmp_path_factory.mktemp("delta") / "table"
    table = EmbeddingTable(path, rows_per_file=700)
    first = commit(table, embed(spark, catalog_rows(range(2000)), seed=1), "run-0")
    second = commit(table, embed(spark, catalog_rows(range(1500), "b"), seed=2), "run-1")
    return path, table, first, second


def test_two_commits_make_two_versions_and_time_travel_returns_the_first(spark, two_versions):
    path, table, first, second = two_versions
    assert (first.version, first.rows, first.committed) == (0, 2000, True)
    assert first.files_added >= 3  # 700 rows a file at most
    assert (second.version, second.rows, second.files_removed) == (1, 1500, first.files_added)
    assert table.version() == 1

    old, new = read(path, 0), read(path)
    assert len(old) == 2000 and {row["content_hash"][-1] for row in old.values()} == {"a"}
    assert len(new) == 1500 and {row["content_hash"][-1] for row in new.values()} == {"b"}
    assert {len(row["embedding"]) for row in old.values()} == {DIM}

    first_polars = pl.read_delta(str(path), version=0)
    assert first_polars.height == 2000
    assert first_polars.schema["embedding"] == pl.List(pl.Float32)
    assert set(first_polars["content_hash"].str.slice(-1)) == {"a"}
    assert pl.read_delta(str(path)).height == 1500

    first_spark = table.read_spark(spark, version=0)
    assert first_spark.count() == 2000
    assert first_spark.where(F.col("content_hash").endswith("b")).count() == 0
    assert table.read_spark(spark).count() == 1500
    assert table.snapshot(0).rows == 2000 and len(table.snapshot(0).files) == first.files_added


def test_versions_carry_the_contract_schema_and_commit_metadata(two_versions):
    path, table, _, second = two_versions
    schema = DeltaTable(str(path)).schema().to_arrow()
    assert [field.name for field in schema] == TABLE_SCHEMA.names
    info = table.commit_info(1)
    assert info["run_id"] == "mlflow-run-1" and info["app_id"] == "run-1"
    assert info["model_uri"] == MODEL["model_uri"] and info["model_version"] == "1"
    assert info["config_hash"] == "cafe01" and info["rows"] == second.rows == 1500
    files = pa.table(DeltaTable(str(path)).get_add_actions(flatten=True)).to_pydict()
    assert set(files["min.model_name"]) == {"prodvec-test"}  # file stats written with the adds
    assert sum(files["num_records"]) == 1500


def test_duckdb_reads_versions_through_the_delta_extension(two_versions):
    duckdb = pytest.importorskip("duckdb")
    extension = pytest.importorskip("duckdb_extension_delta")
    path, *_ = two_versions
    binary = next(Path(extension.__file__).parent.glob("extensions/*/delta.duckdb_extension"))
    connection = duckdb.connect(config={"autoinstall_known_extensions": False})
    connection.load_extension(str(binary))
    query = "select count(*), min(len(embedding)), max(len(embedding)) from delta_scan(?{})"
    assert connection.execute(query.format(", version => 0"), [str(path)]).fetchone() == (
        2000,
        DIM,
        DIM,
    )
    assert connection.execute(query.format(""), [str(path)]).fetchone() == (1500, DIM, DIM)


def test_crash_before_commit_changes_nothing_and_vacuum_removes_its_files(spark, tmp_path):
    path = tmp_path / "table"
    table = EmbeddingTable(path, rows_per_file=400)
    commit(table, embed(spark, catalog_rows(range(1000)), seed=1), "run-0")
    before_files = parquet_on_disk(path)

    def crash(files: list[str]) -> None:
        assert files and all(Path(f).is_file() for f in files)  # written, not committed
        raise RuntimeError("executor lost after write")

    new = embed(spark, catalog_rows(range(1200), "b"), seed=2)
    with pytest.raises(RuntimeError, match="executor lost"):
        commit(table, new, "run-1", before_commit=crash)
    assert table.version() == 0
    assert len(read(path)) == 1000 and pl.read_delta(str(path)).height == 1000
    assert table.read_spark(spark).count() == 1000
    orphans = parquet_on_disk(path) - before_files
    assert orphans and not orphans & snapshot_paths(table)

    result = commit(table, new, "run-1")  # the re-run of the same run id completes
    assert (result.committed, result.version, result.rows) == (True, 1, 1200)
    assert set(vacuum(path, dry_run=True, retention_hours=0)) >= orphans
    assert orphans <= parquet_on_disk(path)  # a dry run deletes nothing
    removed = vacuum(path, retention_hours=0)
    assert orphans <= set(removed)
    assert parquet_on_disk(path) == snapshot_paths(table)
    assert len(read(path)) == 1200
    assert not any(d.is_dir() and not any(d.iterdir()) for d in (path / "data").rglob("*"))


def test_rerun_of_a_committed_app_id_commits_and_writes_nothing(spark, tmp_path):
    path = tmp_path / "table"
    table = EmbeddingTable(path)
    commit(table, embed(spark, catalog_rows(range(300)), seed=1), "nightly-2026-11-22")
    files = parquet_on_disk(path)
    again = commit(table, embed(spark, catalog_rows(range(500), "b"), seed=2), "nightly-2026-11-22")
    assert (again.committed, again.version, again.rows, again.embedded_rows) == (False, 0, 300, 0)
    assert table.version() == 0 and parquet_on_disk(path) == files
    assert len(DeltaTable(str(path)).history()) == 1


def _write_file(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _contract_table(
    n: int, dimension: int = DIM, double: bool = False, drop: str | None = None
) -> pa.Table:
    vectors = np.random.default_rng(3).normal(size=(n, dimension))
    columns = {
        "product_id": pa.array([f"x{i}" for i in range(n)]),
        "embedding": pa.array(vectors.tolist(), pa.list_(pa.float64() if double else pa.float32())),
        "model_name": pa.array(["prodvec-test"] * n),
        "model_version": pa.array(["1"] * n),
        "content_hash": pa.array([f"h{i}" for i in range(n)]),
        "embedded_at": pa.array([0] * n, pa.timestamp("us", tz="UTC")),
    }
    return pa.table({k: v for k, v in columns.items() if k != drop})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            _contract_table(20, double=True),
            r"embedding is list<element: double>, expected list<float>",
        ),
        (_contract_table(20, dimension=DIM + 1), rf"embedding dimension is not {DIM}"),
        (_contract_table(20, drop="content_hash"), r"missing column content_hash"),
    ],
    ids=["double-embedding", "wrong-dimension", "missing-column"],
)
def test_a_file_breaking_the_contract_is_refused_before_commit(spark, tmp_path, bad, message):
    path = tmp_path / "table"
    table = EmbeddingTable(path)
    commit(table, embed(spark, catalog_rows(range(100)), seed=1), "run-0")
    good = _write_file(path / "data" / "manual" / "good.parquet", _contract_table(20))
    broken = _write_file(path / "data" / "manual" / "broken.parquet", bad)
    with pytest.raises(TableError, match=rf"broken\.parquet: .*{message}"):
        commit(table, [good, broken], "run-1", mode="incremental")
    assert table.version() == 0 and len(read(path)) == 100
    result = commit(table, [good], "run-1", mode="incremental")  # the good file alone passes
    assert (result.version, result.rows, result.embedded_rows) == (1, 120, 20)


def test_bad_embeddings_are_refused_and_their_staged_files_removed(spark, tmp_path):
    path = tmp_path / "table"
    table = EmbeddingTable(path)
    commit(table, embed(spark, catalog_rows(range(100)), seed=1), "run-0")
    files = parquet_on_disk(path)
    frame = embed(spark, catalog_rows(range(100, 150)), seed=2)

    with_nan = frame.withColumn(
        "embedding",
        F.when(
            F.col("product_id") == "p00120", F.array_repeat(F.lit(float("nan")).cast("float"), DIM)
        ).otherwise(F.col("embedding")),
    )
    with pytest.raises(TableError, match=r"1 embeddings hold NaN"):
        commit(table, with_nan, "run-1", mode="incremental")

    ragged = frame.withColumn(
        "embedding",
        F.when(F.col("product_id") == "p00101", F.slice("embedding", 1, DIM - 1)).otherwise(
            F.col("embedding")
        ),
    )
    with pytest.raises(TableError, match=rf"sizes range {DIM - 1}\.\.{DIM}|dimension is not"):
        commit(table, ragged, "run-1", mode="incremental")

    repeated = frame.unionByName(frame.limit(2))
    with pytest.raises(TableError, match=r"product_id repeats"):
        commit(table, repeated, "run-1", mode="incremental")

    as_double = frame.withColumn("embedding", F.col("embedding").cast("array<double>"))
    with pytest.raises(TableError, match=r"embedding is array<double>, expected array<float>"):
        commit(table, as_double, "run-1", mode="incremental")

    other_model = frame.withColumn("model_version", F.lit("7"))
    with pytest.raises(TableError, match=r"50 rows name another model"):
        commit(table, other_model, "run-1", mode="incremental")

    assert table.version() == 0 and parquet_on_disk(path) == files


def test_incremental_refresh_reembeds_exactly_the_changed_and_new_products(spark, tmp_path):
    path = tmp_path / "table"
    table = EmbeddingTable(path, rows_per_file=400)
    old_rows = catalog_rows(range(2000))
    first = commit(table, embed(spark, old_rows, seed=1), "run-0")
    assert first.files_added >= 5

    # Changes and deletions all inside one data file: only that file may be rewritten.
    located = (
        table.read_spark(spark)
        .select("product_id", F.col("_metadata.file_path"))
        .orderBy("product_id")
        .collect()
    )
    one_file = located[0].file_path
    in_file = [row.product_id for row in located if row.file_path == one_file]
    changed, deleted = set(in_file[:37]), set(in_file[37:60])
    added = catalog_rows(range(5000, 5050))
    catalog = [
        (pid, chash + "-v2" if pid in changed else chash)
        for pid, chash in old_rows
        if pid not in deleted
    ] + added
    catalog_frame = spark.createDataFrame(catalog, "product_id string, content_hash string")

    plan = table.plan_refresh(spark, catalog_frame, model_name="prodvec-test", model_version="1")
    assert plan.mode == "incremental"
    to_embed = [(row.product_id, row.content_hash) for row in plan.to_embed.collect()]
    assert {pid for pid, _ in to_embed} == changed | {pid for pid, _ in added}
    assert {row.product_id for row in plan.deleted.collect()} == deleted

    result = commit(
        table, embed(spark, to_embed, seed=2), "run-1", mode="incremental", deleted=plan.deleted
    )
    assert (result.version, result.embedded_rows, result.removed_rows) == (1, 37 + 50, 37 + 23)
    assert result.rows == 2000 - 23 + 50 and result.carried_rows == 2000 - 37 - 23
    assert result.files_removed == 1 and result.rewritten_rows == len(in_file) - 60
    assert snapshot_paths(table, 0) - snapshot_paths(table) == {one_file.split(str(path) + "/")[-1]}

    before, after = read(path, 0), read(path)
    assert set(after) == {pid for pid, _ in catalog}
    assert all(after[pid]["content_hash"] == chash for pid, chash in catalog)
    unchanged = set(before) - changed - deleted
    assert all(after[pid]["embedding"] == before[pid]["embedding"] for pid in unchanged)
    assert all(after[pid]["embedded_at"] == before[pid]["embedded_at"] for pid in unchanged)
    assert all(after[pid]["embedding"] != before[pid]["embedding"] for pid in changed)

    again = table.plan_refresh(spark, catalog_frame, model_name="prodvec-test", model_version="1")
    assert again.to_embed.count() == 0 and again.deleted.count() == 0


def test_a_new_model_means_a_full_refresh(spark, tmp_path):
    path = tmp_path / "table"
    table = EmbeddingTable(path)
    rows = catalog_rows(range(200))
    commit(table, embed(spark, rows, seed=1), "run-0")
    catalog = spark.createDataFrame(rows, "product_id string, content_hash string")
    plan = table.plan_refresh(spark, catalog, model_name="prodvec-test", model_version="2")
    assert plan.mode == "full" and "prodvec-test v1" in plan.reason
    assert plan.deleted is None and plan.to_embed.count() == 200
    v2 = {**MODEL, "model_version": "2"}
    with pytest.raises(TableError, match="would mix models; run a full refresh"):
        table.commit(
            embed(spark, rows[:10], seed=2), app_id="run-1", run_id="r", mode="incremental", **v2
        )
    result = table.commit(embed(spark, rows, seed=2), app_id="run-1", run_id="r", mode="full", **v2)
    assert (result.version, result.rows) == (1, 200)
    assert {row["model_version"] for row in read(path).values()} == {"2"}


def test_concurrent_commits_do_not_lose_rows(spark, tmp_path):
    path = tmp_path / "table"
    table = EmbeddingTable(path)  # one data file: both writers must copy-on-write it
    commit(table, embed(spark, catalog_rows(range(1000)), seed=1), "base")
    assert len(table.snapshot().files) == 1
    both_planned = threading.Barrier(2, timeout=120)

    def writer(name: str, changed: range, new: range, seed: int):
        calls = []

        def meet(files: list[str]) -> None:  # both read the same version before committing
            calls.append(files)
            if len(calls) == 1:
                both_planned.wait()

        rows = catalog_rows(changed, name) + catalog_rows(new, name)
        return commit(
            EmbeddingTable(path),
            embed(spark, rows, seed=seed),
            f"run-{name}",
            mode="incremental",
            before_commit=meet,
        )

    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(writer, "x", range(50), range(1000, 1100), 2),
            pool.submit(writer, "y", range(50, 100), range(1100, 1200), 3),
        ]
        results = [future.result() for future in futures]

    assert all(result.committed for result in results)
    assert sorted(result.version for result in results) == [1, 2]
    assert sorted(result.attempts for result in results) == [1, 2]  # the loser planned again
    rows = read(path)
    assert len(rows) == 1200 and table.version() == 2
    tags = {pid: row["content_hash"].split("-")[1] for pid, row in rows.items()}
    assert {tags[f"p{i:05d}"] for i in [*range(50), *range(1000, 1100)]} == {"x"}
    assert {tags[f"p{i:05d}"] for i in [*range(50, 100), *range(1100, 1200)]} == {"y"}
    assert {tags[f"p{i:05d}"] for i in range(100, 1000)} == {"a"}


def test_refresh_guard_stops_mass_removal_before_writing_and_the_limits_allow_it(spark, tmp_path):
    path = tmp_path / "table"
    table = EmbeddingTable(path, rows_per_file=400)
    commit(table, embed(spark, catalog_rows(range(1000)), seed=1), "run-0")
    on_disk = parquet_on_disk(path)
    truncated = spark.createDataFrame(
        catalog_rows(range(100)), "product_id string, content_hash string"
    )
    model = {"model_name": "prodvec-test", "model_version": "1"}

    with pytest.raises(MassChangeError) as refused:
        table.plan_refresh(spark, truncated, **model, limits=ChangeLimits(0.05, 0.5))
    message = str(refused.value)
    assert "remove 900 and carry 100 of the table's 1000 products" in message
    assert "embed.max_removed_fraction=0.05" in message
    assert "embed.min_carried_fraction=0.5" in message
    assert parquet_on_disk(path) == on_disk and table.version() == 0

    with pytest.raises(MassChangeError, match="min_carried_fraction=0.5 .set 0"):
        table.plan_refresh(spark, truncated, **model, limits=ChangeLimits(1.0, 0.5))
    allowed = table.plan_refresh(spark, truncated, **model, limits=ChangeLimits(1.0, 0.0))
    assert allowed.mode == "incremental" and allowed.deleted.count() == 900

    # A new model re-embeds every row by design: only its removals are limited.
    new_model = {"model_name": "prodvec-test", "model_version": "2"}
    whole = spark.createDataFrame(
        catalog_rows(range(1000), "b"), "product_id string, content_hash string"
    )
    assert (
        table.plan_refresh(spark, whole, **new_model, limits=ChangeLimits(0.05, 0.5)).mode == "full"
    )
    with pytest.raises(MassChangeError, match="full refresh would remove 900"):
        table.plan_refresh(spark, truncated, **new_model, limits=ChangeLimits(0.05, 0.5))


def test_a_catalog_older_than_the_last_commit_is_refused(spark, tmp_path):
    path = tmp_path / "table"
    table = EmbeddingTable(path)
    rows = catalog_rows(range(100))
    commit(table, embed(spark, rows, seed=1), "newer", catalog_stamp=2_000)
    assert table.commit_info()["catalog_written_at"] == 2_000
    catalog = spark.createDataFrame(rows, "product_id string, content_hash string")
    model = {"model_name": "prodvec-test", "model_version": "1"}
    with pytest.raises(StaleCatalogError, match="newer than this run's .1000."):
        table.plan_refresh(spark, catalog, **model, catalog_stamp=1_000)
    with pytest.raises(StaleCatalogError):
        commit(table, embed(spark, rows, seed=2), "older", catalog_stamp=1_000)
    assert table.version() == 0 and parquet_on_disk(path) == snapshot_paths(table)
    assert commit(table, embed(spark, rows, seed=3), "same", catalog_stamp=2_000).version == 1


def _constant_model(rows):
    """Embeddings of catalog rows, as the embed stage's model hands them over."""
    return rows.select(
        "product_id",
        "content_hash",
        F.array_repeat(F.lit(0.5).cast("float"), DIM).alias("embedding"),
    )


def _refresh(spark, table: EmbeddingTable, rows, app_id: str, stamp: int, limits=None):
    """Plan an embed run of `rows` (the catalog) and return a commit of it to call later."""
    catalog = spark.createDataFrame(rows, "product_id string, content_hash string")
    plan = table.plan_refresh(
        spark, catalog, model_name="prodvec-test", model_version="1", catalog_stamp=stamp
    )
    source = RefreshSource(plan, catalog, _constant_model, limits)
    return lambda: commit(
        table,
        _constant_model(plan.to_embed),
        app_id,
        mode=plan.mode,
        deleted=plan.deleted,
        source=source,
        catalog_stamp=stamp,
    )


def test_a_commit_that_lost_the_race_plans_again_and_resurrects_nothing(spark, tmp_path):
    path = tmp_path / "table"
    table = EmbeddingTable(path, rows_per_file=300)
    commit(table, embed(spark, catalog_rows(range(1000)), seed=1), "base", catalog_stamp=1)
    # The older catalog drops 0-99 and adds 1000-1099; the newer one, planned against the
    # same version but committed second, keeps 0-99, changes 100-199, drops 900-999.
    older = catalog_rows(range(100, 1100))
    newer = (
        catalog_rows(range(100))
        + catalog_rows(range(100, 200), "n")
        + catalog_rows(range(200, 900))
    )
    commit_newer = _refresh(spark, table, newer, "newer", stamp=3)
    commit_older = _refresh(spark, table, older, "older", stamp=2)
    assert commit_older().version == 1
    result = commit_newer()

    assert (result.version, result.mode, result.rows) == (2, "incremental", 900)
    after = read(path)
    assert {pid: row["content_hash"] for pid, row in after.items()} == dict(newer)
    assert table.commit_info()["catalog_written_at"] == 3
    # 0-99 came back from the older catalog's deletion: re-embedded at the new version.
    assert result.embedded_rows == 200 and result.removed_rows == 100 + 200  # replaced, deleted


def test_delta_spark_writer_without_its_jar_fails_naming_the_package(spark, tmp_path):
    table = EmbeddingTable(tmp_path / "table", writer="delta-spark")
    with pytest.raises(TableError, match=r"needs the delta-spark package .*io\.delta:delta-spark"):
        commit(table, embed(spark, catalog_rows(range(10)), seed=1), "run-0")
    assert not table.exists() and not (tmp_path / "table").exists()


def test_config_names_the_table_and_its_writer(tmp_path):
    config = load_config(
        ["local"], [f"workdir={tmp_path}", "embed.rows_per_file=1000", "embed.writer=delta-spark"]
    )
    table = EmbeddingTable.from_config(config)
    assert table.uri == str(tmp_path / "synthetic" / "embed" / "table") == config.outputs.table
    assert (table.files.rows_per_file, table.writer) == (1000, "delta-spark")
    with pytest.raises(ConfigError, match="embed.writer"):
        load_config(["local"], ["embed.writer=parquet"])


def test_vacuum_command(spark, tmp_path, capsys):
    path = tmp_path / "table"
    table = EmbeddingTable(path)
    commit(table, embed(spark, catalog_rows(range(50)), seed=1), "run-0")
    orphan = _write_file(path / "data" / "dead-run" / "part-0.parquet", _contract_table(5))
    now = ["vacuum", "--table", str(path), "--retention-hours", "0"]
    assert main([*now, "--dry-run", "--force"]) == 0
    assert "data/dead-run/part-0.parquet" in capsys.readouterr().out and orphan.exists()
    assert main(now) == 2  # below embed.vacuum_min_retention_hours: a running embed's files
    assert "below embed.vacuum_min_retention_hours=24" in capsys.readouterr().err
    assert orphan.exists()
    assert main([*now, "--force"]) == 0
    assert "removed 1 file" in capsys.readouterr().out and not orphan.exists()
    assert main(["vacuum", "--table", str(tmp_path / "nothing")]) == 2
    assert "is not a Delta table" in capsys.readouterr().err


def test_a_corrupted_data_file_fails_verify_and_every_reader(spark, tmp_path, capsys):
    path = tmp_path / "table"
    table = EmbeddingTable(path, rows_per_file=700)
    commit(
        table, embed(spark, catalog_rows(range(2000)), seed=1, dimension=64), "run-0", dimension=64
    )
    assert main(["verify", "--table", str(path), "--version", "0"]) == 0
    assert "version 0: 3 file(s), 2000 rows, dimension 64: ok" in capsys.readouterr().out

    victim = sorted(table.snapshot().files)[1]
    relative = victim[len(table.uri) + 1 :]
    size = Path(victim).stat().st_size
    with open(victim, "r+b") as data:  # 4 KB overwritten mid-file: the footer still reads
        data.seek(size // 2)
        data.write(np.random.default_rng(0).bytes(4096))
    assert pq.read_metadata(victim).num_rows > 0

    assert main(["verify", "--table", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("prodvec: error: ") and "\n" not in err
    assert f"{relative}: corrupt" in err and "CRC checksum verification failed" in err
    with pytest.raises(Exception, match="CRC checksum verification failed") as failed:
        table.read_spark(spark).agg(
            F.sum(F.aggregate("embedding", F.lit(0.0), lambda a, x: a + x))
        ).collect()
    assert str(damaged_file(failed.value)).startswith(f"file://{victim}: page CRC checksum")
    with pytest.raises(VectorIndexError, match=f"table file {victim} is corrupt"):
        list(iter_embeddings(table.snapshot().files, 1000))
