"""Embed stage: Spark embeddings equal the model's own in-process output, the model loads
once per Python worker, refreshes embed only what changed (everything after a new model),
the ad-hoc command writes one row per input row, the per-group model runs too, and two embed
processes racing with different catalogs end with the newer catalog's content.

The catalog is a real 400-row synthetic one through the clean stage; models are untrained
8-d MRNets registered with pipelines.training.publish.log_and_register (embedding does not care about training).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from pyspark.sql import functions as F

from models.autoencoders import GroupSparseAutoencoder
from models.encoders import GroupEncoder, TitleEncoder
from models.mrnet import BiLSTMTitles, MRNet, TaskHead
from pipelines import cli
from pipelines.core import tracking
from pipelines.core.config import Config, load_config
from pipelines.core.errors import CatalogError
from pipelines.core.faults import FAULT_VARIABLE, RELEASE_VARIABLE
from pipelines.core.outputs import COMPLETION_RECORD
from pipelines.data.catalog import read_clean, seal_catalog
from pipelines.data.tokenizer import PAD_ID, Vocabulary, tokenize
from pipelines.model_types.serving import cached_model, pin, prepare_model
from pipelines.stages import clean
from pipelines.stages.embed import embed_frame
from pipelines.stages.registry import run_stage
from pipelines.table import EmbeddingTable
from pipelines.training.publish import log_and_register

REPO = Path(__file__).resolve().parent.parent
MAX_LEN = 12
NAME = "prodvec-mrnet-synthetic"


def _mrnet(vocabulary: Vocabulary, seed: int) -> MRNet:
    torch.manual_seed(seed)
    return MRNet(
        BiLSTMTitles(len(vocabulary) + 2, 8, 8), [TaskHead("flag", "binary", 1, scalar=True)]
    )


def register(config: Config, module: torch.nn.Module, name: str, group: bool = False) -> str:
    """Log and register as the train stage does; returns models:/name/version."""
    export = config.workdir / "export"
    vocabulary = export / "vocabulary.parquet"
    (export / "tokenizer.json").write_text(f'{{"max_len": {MAX_LEN}}}')
    (export / "labels.json").write_text("{}")
    example = np.zeros((2, MAX_LEN + group), dtype=np.int64)
    example[:, group] = 2
    tracking.configure(config)
    with mlflow.start_run():
        _, version = log_and_register(
            module,
            example,
            name,
            [str(vocabulary), str(export / "tokenizer.json"), str(export / "labels.json")],
            {"test": True},
        )
    return f"models:/{name}/{version}"


@pytest.fixture(scope="module")
def base(spark, tmp_path_factory) -> tuple[Config, Vocabulary, str]:
    """Clean catalog, its vocabulary, and model version 1 of NAME."""
    workdir = tmp_path_factory.mktemp("embed")
    config = load_config(
        overrides=[
            f"workdir={workdir}",
            "catalog.synthetic.rows=400",
            f"tracking.uri=sqlite:///{workdir}/mlflow.db",
            f"tracking.artifact_location={(workdir / 'mlartifacts').as_uri()}",
        ]
    )
    clean.run(spark, config)
    titles = (
        read_clean(spark, config)
        .select(F.explode(F.split("title", " ")).alias("word"))
        .groupBy("word")
        .count()
        .toPandas()
    )
    vocabulary = Vocabulary.from_counts(titles["word"], titles["count"], min_count=2)
    vocabulary.save(workdir / "export" / "vocabulary.parquet")
    uri = register(config, TitleEncoder(_mrnet(vocabulary, 1), MAX_LEN), NAME)
    return config, vocabulary, uri


def scratch(base_config: Config, tmp_path: Path, *overrides: str) -> Config:
    """Its own workdir (copy of the clean catalog, own table), the shared MLflow store."""
    catalog = base_config.outputs.clean_catalog
    config = load_config(
        overrides=[
            f"workdir={tmp_path}",
            "catalog.synthetic.rows=400",
            f"tracking.uri={base_config.tracking.uri}",
            f"tracking.artifact_location={base_config.tracking.artifact_location}",
            *overrides,
        ]
    )
    shutil.copytree(catalog, config.outputs.clean_catalog)
    return config


def reference(
    uri: str, vocabulary: Vocabulary, titles: list[str], groups: list[int] | None = None
) -> np.ndarray:
    """The model's output in this process, ids built token by token in Python."""
    module = mlflow.pytorch.load_model(uri).eval()
    ids = np.full((len(titles), MAX_LEN), PAD_ID, dtype=np.int64)
    for row, title in enumerate(titles):
        words = tokenize(title)[:MAX_LEN]
        ids[row, : len(words)] = vocabulary.ids(words) if words else []
    if groups is not None:
        ids = np.concatenate([np.array(groups, dtype=np.int64)[:, None], ids], axis=1)
    with torch.no_grad():
        return module(torch.from_numpy(ids)).numpy()


def table_rows(config: Config) -> pa.Table:
    files = EmbeddingTable.from_config(config).snapshot().files
    tables = [pq.read_table(f) for f in files]
    return pa.concat_tables(tables, promote_options="permissive").sort_by("product_id")


def catalog_rows(config: Config) -> pa.Table:
    return pq.read_table(config.outputs.clean_catalog).sort_by("product_id")


def test_stage_equals_in_process_model(spark, base, tmp_path):
    config, vocabulary, uri = base
    config = scratch(config, tmp_path, f"embed.model_uri={uri}")
    result = run_stage("embed", config, spark)
    table, catalog = table_rows(config), catalog_rows(config)
    assert result.outputs["mode"] == "full"
    assert result.rows["embedded"] == result.rows["table"] == catalog.num_rows
    assert table["product_id"].to_pylist() == catalog["product_id"].to_pylist()
    got = np.array(table["embedding"].to_pylist(), dtype=np.float32)
    want = reference(uri, vocabulary, catalog["title"].to_pylist())
    assert got.shape == (catalog.num_rows, 8)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len(set(map(tuple, got.round(5)))) > catalog.num_rows // 2  # not one constant vector
    assert config.outputs.model_cache.stat().st_mode & 0o777 == 0o700  # models are code


def test_model_loads_once_per_python_worker(spark, base, tmp_path):
    """Sixteen tasks on the test session: reused Python workers load the model once, not per task.

    Spark forks a new worker when none is idle at task start, so the exact count depends on
    timing; loading per task would give sixteen."""
    config, vocabulary, _ = base
    uri = register(config, TitleEncoder(_mrnet(vocabulary, 5), MAX_LEN), "prodvec-loads")
    spec = prepare_model(uri, tmp_path / "models")
    frame = read_clean(spark, config).repartition(16)
    embedded, loads = embed_frame(frame, spec)
    assert embedded.count() == catalog_rows(config).num_rows
    assert frame.rdd.getNumPartitions() == 16
    assert 1 <= loads.value < 16


def test_worker_cache_loads_a_model_once(base, tmp_path):
    config, vocabulary, _ = base
    uri = register(config, TitleEncoder(_mrnet(vocabulary, 5), MAX_LEN), "prodvec-cache")
    spec = prepare_model(uri, tmp_path / "models")
    cpu = torch.device("cpu")
    first, _, loaded_first = cached_model(spec, cpu)
    second, _, loaded_second = cached_model(spec, cpu)
    assert (loaded_first, loaded_second) == (True, False)
    assert first is second


def test_incremental_then_full_refresh(spark, base, tmp_path):
    config, vocabulary, uri = base
    config = scratch(config, tmp_path, f"embed.model_uri={uri}")
    first = run_stage("embed", config, spark)
    second = run_stage("embed", config, spark)
    assert second.outputs["mode"] == "incremental"
    assert second.rows["embedded"] == 0 and second.rows["table"] == first.rows["table"]
    before = table_rows(config)

    path = config.outputs.clean_catalog
    catalog = catalog_rows(config)
    changed = set(catalog["product_id"].to_pylist()[:5])
    is_changed = pc.is_in(catalog["product_id"], pa.array(sorted(changed)))
    titles = pc.if_else(
        is_changed,
        pc.binary_join_element_wise(catalog["title"], pa.scalar("leather sofa"), " "),
        catalog["title"],
    )
    hashes = pc.if_else(
        is_changed,
        pc.binary_join_element_wise(catalog["content_hash"], pa.scalar("x"), ""),
        catalog["content_hash"],
    )
    catalog = catalog.set_column(catalog.schema.get_field_index("title"), "title", titles)
    catalog = catalog.set_column(
        catalog.schema.get_field_index("content_hash"), "content_hash", hashes
    )
    shutil.rmtree(path)
    path.mkdir()
    pq.write_table(catalog, path / "part-0.parquet")
    seal_catalog(path, catalog.num_rows, config)

    third = run_stage("embed", config, spark)
    after = table_rows(config)
    assert third.outputs["mode"] == "incremental" and third.rows["embedded"] == 5
    moved = [
        pid
        for pid, old, new in zip(
            before["product_id"].to_pylist(),
            before["embedded_at"].to_pylist(),
            after["embedded_at"].to_pylist(),
            strict=True,
        )
        if old != new
    ]
    assert set(moved) == changed
    rows = after.filter(pc.is_in(after["product_id"], pa.array(sorted(changed))))
    titles = catalog.filter(is_changed).sort_by("product_id")["title"].to_pylist()
    np.testing.assert_allclose(
        np.array(rows["embedding"].to_pylist()),
        reference(uri, vocabulary, titles),
        rtol=1e-5,
        atol=1e-6,
    )

    new_uri = register(base[0], TitleEncoder(_mrnet(vocabulary, 2), MAX_LEN), NAME)
    fourth = run_stage(
        "embed",
        config.model_copy(
            update={
                "embed": config.embed.model_copy(update={"model_uri": f"models:/{NAME}@candidate"})
            }
        ),
        spark,
    )
    assert fourth.outputs["mode"] == "full" and fourth.outputs["model_uri"] == new_uri
    assert fourth.rows["embedded"] == catalog.num_rows
    assert set(table_rows(config)["model_version"].to_pylist()) == {new_uri.rsplit("/", 1)[1]}


def test_adhoc_command_one_row_per_input_row(spark, base, tmp_path, capsys):
    config, vocabulary, uri = base
    source = tmp_path / "products.csv"
    source.write_text(
        "id,title\n"
        "a1,Red Leather Sofa\n"
        "a2,\n"
        "a3,Blue Cotton Shirt\n"
        "a3,Blue Cotton Shirt\n"
        'a4,"Ünïcode   Headphones!"\n'
    )
    out = tmp_path / "out"
    code = cli.main(
        [
            "embed",
            "--model",
            uri,
            "--input",
            str(source),
            "--output",
            str(out),
            f"workdir={tmp_path}",
            f"tracking.uri={config.tracking.uri}",
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows = {(r["product_id"], r["reason"]): r for r in pq.read_table(out).to_pylist()}
    assert set(rows) == {
        ("a1", None),
        ("a2", "missing_title"),
        ("a3", None),
        ("a3", "exact_duplicate"),
        ("a4", None),
    }
    assert rows[("a2", "missing_title")]["embedding"] is None
    ok = [rows[(pid, None)] for pid in ("a1", "a3", "a4")]
    np.testing.assert_allclose(
        np.array([r["embedding"] for r in ok]),
        reference(uri, vocabulary, [r["title"] for r in ok]),
        rtol=1e-5,
        atol=1e-6,
    )
    assert ok[2]["title"] == "unicode headphones"


def _group_encoder(
    vocabulary: Vocabulary, groups: list[str], seed: int, fallback: str | None = None
) -> GroupEncoder:
    """A per-group model with one random 8-d MRNet per group."""
    torch.manual_seed(seed)
    return GroupEncoder(
        groups,
        [_mrnet(vocabulary, 10 * seed + i) for i in range(len(groups))],
        GroupSparseAutoencoder(len(groups), 8),
        MAX_LEN,
        fallback=fallback,
    )


def test_group_model(spark, base, tmp_path):
    config, vocabulary, _ = base
    groups = sorted(set(catalog_rows(config)["product_group"].to_pylist()))
    module = _group_encoder(vocabulary, groups, 3)
    uri = register(config, module, "prodvec-mrnet-pg-synthetic", group=True)
    config = scratch(config, tmp_path, f"embed.model_uri={uri}")
    result = run_stage("embed", config, spark)
    table, catalog = table_rows(config), catalog_rows(config)
    assert result.rows["unknown_group"] == 0 and result.rows["table"] == catalog.num_rows
    index = [groups.index(g) for g in catalog["product_group"].to_pylist()]
    np.testing.assert_allclose(
        np.array(table["embedding"].to_pylist()),
        reference(uri, vocabulary, catalog["title"].to_pylist(), index),
        rtol=1e-5,
        atol=1e-6,
    )
    assert len(table["embedding"][0]) == 16


def test_products_of_a_group_without_an_mrnet_are_embedded_by_the_fallback_group(
    spark, base, tmp_path
):
    """A group with too few products for its own MRNet (or new since training) is embedded
    by the fallback group's MRNet, counted, never left out of the table."""
    config, vocabulary, _ = base
    catalog = catalog_rows(config)
    names = catalog["product_group"].to_pylist()
    small = min(set(names), key=names.count)
    groups = sorted(set(names) - {small})
    module = _group_encoder(vocabulary, groups, 4, fallback=groups[-1])
    uri = register(config, module, "prodvec-mrnet-pg-fallback", group=True)
    config = scratch(config, tmp_path, f"embed.model_uri={uri}")
    result = run_stage("embed", config, spark)
    table = table_rows(config)
    assert result.rows["fallback"] == names.count(small) > 0
    assert "unknown_group" not in result.rows and result.rows["table"] == catalog.num_rows
    index = [groups.index(g) if g in groups else len(groups) - 1 for g in names]
    np.testing.assert_allclose(
        np.array(table["embedding"].to_pylist()),
        reference(uri, vocabulary, catalog["title"].to_pylist(), index),
        rtol=1e-5,
        atol=1e-6,
    )


def test_a_truncated_or_unsealed_clean_catalog_leaves_the_table_unchanged(spark, base, tmp_path):
    """Part files gone (a half-written or truncated clean output) or no completion record:
    embed stops naming the catalog before it plans, so no product is removed."""
    config, _, uri = base
    config = scratch(config, tmp_path, f"embed.model_uri={uri}")
    run_stage("embed", config, spark)
    table = EmbeddingTable.from_config(config)
    version, before = table.version(), table_rows(config)
    path = config.outputs.clean_catalog
    parts = sorted(path.glob("part-*"))
    assert len(parts) > 1
    for part in parts[1:]:
        part.unlink()
    with pytest.raises(CatalogError, match=r"is not the one its stage sealed .* missing"):
        run_stage("embed", config, spark)
    (path / COMPLETION_RECORD).unlink()
    with pytest.raises(CatalogError, match="has no completion record"):
        run_stage("embed", config, spark)
    assert table.version() == version and table_rows(config).equals(before)


def test_a_model_folder_is_identified_by_its_content(tmp_path):
    """Retraining into the same folder is a new model version (so the next embed refreshes
    fully); the same files are the same version wherever they lie."""
    vocabulary = Vocabulary.from_counts(["blue", "shirt"], [3, 3], min_count=1)
    folder, copy = tmp_path / "model", tmp_path / "copy"

    def save(module: torch.nn.Module, where: Path) -> None:
        mlflow.pytorch.save_model(
            module.eval(), str(where), serialization_format="pickle", pip_requirements=[]
        )

    save(TitleEncoder(_mrnet(vocabulary, 1), MAX_LEN), folder)
    _, name, first = pin(str(folder))
    assert name == str(folder) and first.startswith("sha256-")
    shutil.copytree(folder, copy)
    assert pin(copy.as_uri())[2] == first
    shutil.rmtree(folder)
    save(TitleEncoder(_mrnet(vocabulary, 2), MAX_LEN), folder)
    assert pin(str(folder))[2] not in (first, "0")


def test_annotate_round_trip(spark, base, tmp_path, capsys):
    """`prodvec annotate`: suggestions from the keyword alone, labelled and appended to the
    labels file, then a second batch of other products in which the nearest-neighbour and
    classifier sources take part; a label that is not yes/no is one error line."""
    config, _, uri = base
    config = scratch(config, tmp_path, f"embed.model_uri={uri}")
    run_stage("embed", config, spark)
    keyword = catalog_rows(config)["title"][0].as_py().split()[0]
    labels, batch = tmp_path / "labels.csv", tmp_path / "next.csv"
    argv = ["annotate", "--category", "kw", "--labels", str(labels), "-n", "6",
            "--keywords", keyword, "--output", str(batch),
            f"workdir={tmp_path}", "catalog.synthetic.rows=400"]  # fmt: skip
    assert cli.main(argv) == 0
    first = list(csv.DictReader(batch.open()))
    assert len(first) == 6 and {row["source"] for row in first} == {"keyword"}
    assert all(keyword in row["title"].split() for row in first)
    for number, row in enumerate(first):
        row["label"] = "yes" if number % 3 else "no"
    with labels.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(first[0]))
        writer.writeheader()
        writer.writerows(first)
    assert cli.main(argv) == 0
    second = list(csv.DictReader(batch.open()))
    assert len(second) == 6
    assert not {row["product_id"] for row in second} & {row["product_id"] for row in first}
    assert {"knn", "uncertainty"} <= {row["source"] for row in second}
    capsys.readouterr()
    with labels.open("a", newline="") as handle:
        handle.write(f"{second[0]['product_id']},kw,maybe,knn,x\n")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "label 'maybe' is not yes/no" in err, err


def _write_catalog(config: Config, catalog: pa.Table, written_at_s: int) -> None:
    """Replace a workdir's clean catalog, sealed as clean seals it and dated `written_at_s`
    (its stamp, set, not slept on)."""
    path = config.outputs.clean_catalog
    shutil.rmtree(path)
    path.mkdir()
    pq.write_table(catalog, path / "part-0.parquet")
    seal_catalog(path, catalog.num_rows, config)
    record = json.loads((path / COMPLETION_RECORD).read_text())
    record["written_at"] = datetime.fromtimestamp(written_at_s, UTC).isoformat()
    (path / COMPLETION_RECORD).write_text(json.dumps(record))


def _embed_process(config: Config, table: Path, uri: str, log: Path, **env: str):
    """`prodvec embed` in a process of its own, on one core, writing to the shared table."""
    command = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "embed",
        f"workdir={config.workdir}",
        "catalog.synthetic.rows=400",
        f"tracking.uri={config.tracking.uri}",
        f"tracking.artifact_location={config.tracking.artifact_location}",
        f"embed.model_uri={uri}",
        f"embed.table_path={table}",
        "spark.master=local[1]",
        "spark.shuffle_partitions=2",
    ]
    with log.open("w") as out:
        return subprocess.Popen(
            command, cwd=REPO, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
        )


@pytest.mark.slow  # two whole `prodvec embed` processes, each with its own JVM
def test_racing_embed_processes_end_with_the_newer_catalog(spark, base, tmp_path):
    """The newer catalog's run plans against version 0 and is held before its commit while
    the older catalog's run commits version 1 (deleting products 0-9, which the newer keeps);
    released, the newer run must plan again: final rows are exactly its catalog."""
    base_config, _, uri = base
    table_path = tmp_path / "table"
    original = catalog_rows(base_config)
    ids = original["product_id"].to_pylist()
    first = scratch(
        base_config, tmp_path / "first", f"embed.table_path={table_path}", f"embed.model_uri={uri}"
    )
    _write_catalog(first, original, 1_700_000_000)
    assert run_stage("embed", first, spark).rows["table"] == len(ids)

    older = scratch(base_config, tmp_path / "older")
    _write_catalog(
        older,
        original.filter(pc.invert(pc.is_in(original["product_id"], pa.array(ids[:10])))),
        1_700_000_100,
    )
    changed = pc.is_in(original["product_id"], pa.array(ids[20:25]))
    newer_catalog = original.set_column(
        original.schema.get_field_index("content_hash"),
        "content_hash",
        pc.if_else(
            changed,
            pc.binary_join_element_wise(original["content_hash"], pa.scalar("n"), ""),
            original["content_hash"],
        ),
    ).filter(pc.invert(pc.is_in(original["product_id"], pa.array(ids[10:20]))))
    newer = scratch(base_config, tmp_path / "newer")
    _write_catalog(newer, newer_catalog, 1_700_000_200)

    release = tmp_path / "release"
    held_log, older_log = tmp_path / "newer.log", tmp_path / "older.log"
    held = _embed_process(
        newer,
        table_path,
        uri,
        held_log,
        **{FAULT_VARIABLE: "embed:pause-commit", RELEASE_VARIABLE: str(release)},
    )
    try:
        while "injected pause-commit" not in held_log.read_text():
            assert held.poll() is None, held_log.read_text()[-3000:]
            time.sleep(0.5)
        racer = _embed_process(older, table_path, uri, older_log)
        assert racer.wait(timeout=900) == 0, older_log.read_text()[-3000:]
        release.touch()
        assert held.wait(timeout=900) == 0, held_log.read_text()[-3000:]
    finally:
        held.kill()

    table = EmbeddingTable(table_path)
    assert table.version() == 2
    final = table_rows(first)
    assert final.num_rows == newer_catalog.num_rows
    assert dict(zip(final["product_id"].to_pylist(), final["content_hash"].to_pylist())) == dict(
        zip(newer_catalog["product_id"].to_pylist(), newer_catalog["content_hash"].to_pylist())
    )
    assert not set(ids[10:20]) & set(final["product_id"].to_pylist())  # none resurrected
    assert table.commit_info()["catalog_written_at"] == 1_700_000_200_000


def test_embed_of_a_truncated_catalog_stops_before_writing(spark, base, tmp_path, capsys):
    """A sealed clean catalog of an eighth of the products (clean ran over a truncated
    source): the embed stops, names the counts, and writes nothing; the limits set for one
    run let it through."""
    base_config, _, uri = base
    config = scratch(base_config, tmp_path, f"embed.model_uri={uri}")
    run_stage("embed", config, spark)
    table = EmbeddingTable.from_config(config)
    written = sorted(Path(table.uri).rglob("*.parquet"))
    catalog = catalog_rows(config)
    kept = catalog.slice(0, catalog.num_rows // 8)
    _write_catalog(config, kept, int(time.time()) + 100)
    command = [
        "embed",
        f"workdir={tmp_path}",
        "catalog.synthetic.rows=400",
        f"tracking.uri={config.tracking.uri}",
        f"tracking.artifact_location={config.tracking.artifact_location}",
        f"embed.model_uri={uri}",
    ]

    assert cli.main(command) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("prodvec: error: ")
    err = errors[0]
    removed = catalog.num_rows - kept.num_rows
    assert (
        f"would remove {removed} and carry {kept.num_rows} of the table's "
        f"{catalog.num_rows} products" in err
    )
    assert "embed.max_removed_fraction=0.05" in err and "embed.min_carried_fraction=0.5" in err
    assert table.version() == 0 and sorted(Path(table.uri).rglob("*.parquet")) == written

    allowed = [*command, "embed.max_removed_fraction=1", "embed.min_carried_fraction=0"]
    assert cli.main(allowed) == 0, capsys.readouterr().err
    assert table.version() == 1 and table.snapshot().rows == kept.num_rows
