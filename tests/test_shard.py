"""Shard stage: split without title leakage, labels as specified, ids from the shared
vocabulary, a manifest that describes the files, and shards the loader reads exactly once.

Labels are checked against an independent pandas / scikit-learn computation over the clean
catalog, not against values the stage reports.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.feature_extraction.text import TfidfVectorizer

from pipelines.core.config import Config, ShardConfig, load_config
from pipelines.core.errors import CatalogError, CorpusError, ShardError
from pipelines.data.catalog import seal_catalog
from pipelines.data.shards import FORMAT, MANIFEST, SPLITS, load_manifest, shard_sets
from pipelines.data.tokenizer import Vocabulary, tokenize, tokenize_arrow
from pipelines.stages import clean, corpus, shard
from pipelines.tasks.kinds.multiclass import OTHER
from pipelines.tasks.kinds.multilabel import NODE_SEPARATOR
from pipelines.training.loader import make_loader

MIN_COUNT = 50
TASKS = [
    {
        "name": "category",
        "kind": "multilabel",
        "source": "category_path",
        "max_depth": 2,
        "min_count": MIN_COUNT,
    },
    {"name": "subcategory", "kind": "multiclass", "source": "category_path[1]", "top_n": 40},
    {"name": "brand", "kind": "multiclass", "source": "brand", "top_n": 10},
    {"name": "size", "kind": "multiclass", "source": "attributes.size", "top_n": 5},
    {"name": "high_value", "kind": "binary", "source": "price", "threshold": 100},
    {
        "name": "leather",
        "kind": "binary",
        "source": "attributes.material",
        "positive": ["Leather", "suede"],
    },
    {"name": "weight", "kind": "regression", "source": "attributes.weight_kg", "log": True},
    {"name": "price", "kind": "regression", "source": "price"},
    {"name": "title_tfidf", "kind": "decoding", "source": "title", "vocab_size": 60},
]
TEXT_FIELDS = {"title": 8, "description": 24, "bullets": 16, "brand": 3}
ROW_GROUP_ROWS, ROWS_PER_FILE = 100, 500


def with_shard(config: Config, **changes) -> Config:
    settings = ShardConfig.model_validate({**config.shard.model_dump(), **changes})
    return config.model_copy(update={"shard": settings})


def level(path, i: int) -> str | None:
    return path[i] if path is not None and len(path) > i else None


def stored(products: pd.DataFrame, name: str) -> pd.Series:
    """A task's shard column (suffixed where the catalog has a column of that name)."""
    return products[f"{name}_shard"] if f"{name}_shard" in products else products[name]


@pytest.fixture(scope="module")
def built(spark, tmp_path_factory):
    """A 1,500-row synthetic catalog through clean, corpus and shard."""
    workdir = tmp_path_factory.mktemp("shard")
    config = load_config(
        overrides=[
            f"workdir={workdir}",
            "catalog.synthetic.rows=1500",
            "word2vec.epochs=1",
            "word2vec.min_count=3",
        ]
    )
    config = with_shard(
        config,
        tasks=TASKS,
        text_fields=TEXT_FIELDS,
        row_group_rows=ROW_GROUP_ROWS,
        rows_per_file=ROWS_PER_FILE,
    )
    clean.run(spark, config)
    corpus.run(spark, config)
    result = shard.run(spark, config)
    return config, result


@pytest.fixture(scope="module")
def products(built) -> pd.DataFrame:
    """The clean catalog joined with every shard row (split, label columns) by product id."""
    config, _ = built
    catalog = pq.read_table(config.outputs.clean_catalog).to_pandas()
    root = config.outputs.shards
    parts = []
    for split in SPLITS:
        table = pq.read_table(root / split).to_pandas()
        parts.append(table.assign(split=split))
    shards = pd.concat(parts, ignore_index=True)
    assert len(shards) == len(catalog) and shards.product_id.is_unique
    return catalog.merge(shards, on="product_id", suffixes=("", "_shard"), validate="1:1")


@pytest.fixture(scope="module")
def manifest(built) -> dict:
    config, _ = built
    return json.loads((config.outputs.shards / MANIFEST).read_text())


def task_entry(manifest: dict, name: str) -> dict:
    return next(task for task in manifest["tasks"] if task["name"] == name)


def test_rows_files_and_manifest(built, manifest, products):
    config, result = built
    root = config.outputs.shards
    assert sum(result.rows[split] for split in SPLITS) == len(products)
    assert result.rows["skipped"] == 0
    assert manifest["splits"] == {split: result.rows[split] for split in SPLITS}
    assert manifest["config_hash"] == config.digest() and manifest["format"] == FORMAT
    for split in SPLITS:
        files = manifest["files"][split]
        assert sorted(f["path"] for f in files) == sorted(
            f"{split}/{p.name}" for p in (root / split).glob("*.parquet")
        )
        assert sum(f["rows"] for f in files) == manifest["splits"][split]
        for entry in files:
            assert entry["rows"] <= ROWS_PER_FILE and sum(entry["row_groups"]) == entry["rows"]
            assert max(entry["row_groups"]) <= ROW_GROUP_ROWS
    assert len(manifest["files"]["train"]) > 1
    assert manifest["pad_id"] == 0 and manifest["oov_id"] == 1
    assert manifest["max_len"] == TEXT_FIELDS
    vocabulary = root / manifest["vocabulary"]["path"]
    assert hashlib.sha256(vocabulary.read_bytes()).hexdigest() == manifest["vocabulary"]["sha256"]
    assert manifest["vocabulary"]["size"] == len(Vocabulary.load(vocabulary)) + 2
    columns = {column["name"]: column["type"] for column in manifest["schema"]}
    assert columns["title_ids"].startswith("list<") and columns["brand_len"] == "int32"
    assert {"title_tfidf_idx", "title_tfidf_val", "category", "leather"} <= columns.keys()
    assert [task["name"] for task in manifest["tasks"]] == [task["name"] for task in TASKS]
    for task in manifest["tasks"]:
        assert task["labelled"]["train"] <= manifest["splits"]["train"]


def test_titles_never_straddle_splits_and_strata_are_exact(products, manifest):
    splits_per_title = products.groupby("title").split.nunique()
    assert (splits_per_title == 1).all()
    strata = products.category_path.map(lambda path: level(path, 1))
    groups = (
        products.assign(stratum=strata)
        .groupby("title")
        .agg(stratum=("stratum", "min"), split=("split", "first"))
    )
    validation, test = manifest["split"]["validation"], manifest["split"]["test"]
    for _, members in groups.groupby("stratum", dropna=False):
        n = len(members)
        position = (np.arange(1, n + 1) - 0.5) / n
        expected = {
            "validation": int((position < validation).sum()),
            "test": int(((position >= validation) & (position < validation + test)).sum()),
        }
        seen = members.split.value_counts()
        assert {key: int(seen.get(key, 0)) for key in expected} == expected


def test_assign_split_keeps_title_groups_together_deterministically(spark):
    rng = np.random.default_rng(0)
    rows = [
        (f"t{t}", f"s{t % 3}" if t % 11 else None)
        for t in range(300)
        for _ in range(rng.integers(1, 6))
    ]
    frame = spark.createDataFrame(rows, "title string, stratum string")

    def split(seed: int) -> pd.DataFrame:
        out = shard.assign_split(frame, frame.stratum, 0.2, 0.1, seed)
        return out.toPandas().sort_values(["title", "_split"]).reset_index(drop=True)

    first, again, other = split(1), split(1), split(2)
    assert first.equals(again)
    assert not first._split.equals(other._split)
    assert (first.groupby("title")._split.nunique() == 1).all()
    assert len(first) == len(rows)
    titles = first.drop_duplicates("title")
    for _, members in titles.groupby("stratum", dropna=False):
        position = (np.arange(1, len(members) + 1) - 0.5) / len(members)
        shares = members._split.value_counts()
        assert shares.get("validation", 0) == (position < 0.2).sum() > 0
        assert shares.get("test", 0) == ((position >= 0.2) & (position < 0.3)).sum() > 0


def test_multiclass_top_n_from_train_with_other(products, manifest):
    for name, source, top_n in [
        ("brand", "brand", 10),
        ("size", "size", 5),
        ("subcategory", "subcategory", 40),
    ]:
        if source == "size":
            raw = products.attributes.map(lambda a: dict(a).get("size"))
        elif source == "subcategory":
            raw = products.category_path.map(lambda path: level(path, 1))
        else:
            raw = products[source]
        counts = Counter(raw[(products.split == "train") & raw.notna()])
        top = [value for value, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:top_n]
        entry = task_entry(manifest, name)
        assert entry["labels"] == [*top, OTHER] and entry["num_outputs"] == len(top) + 1
        index = {value: i for i, value in enumerate(top)}
        expected = pd.Series(
            [None if v is None else index.get(v, len(top)) for v in raw],
            index=raw.index,
            dtype=object,
        )
        labels = stored(products, name)
        assert (labels.isna() == expected.isna()).all()
        assert (
            labels[expected.notna()].astype(int) == expected[expected.notna()].astype(int)
        ).all()
    assert products["size"].isna().any(), "products without a size must be masked"
    assert (products.brand_shard == 10).any(), "rare brands must fall into 'other'"


def test_binary_labels_and_pos_weight(products, manifest):
    high = products.price.map(lambda p: None if pd.isna(p) else p >= 100)
    assert (products.high_value.isna() == high.isna()).all()
    assert (products.high_value[high.notna()] == high[high.notna()]).all()
    material = products.attributes.map(lambda a: dict(a).get("material"))
    leather = material.map(lambda m: None if m is None else m in ("leather", "suede"))
    assert (products.leather.isna() == leather.isna()).all()
    assert (products.leather[leather.notna()] == leather[leather.notna()]).all()
    assert leather.any()
    train = leather[(products.split == "train") & leather.notna()]
    assert task_entry(manifest, "leather")["pos_weight"] == pytest.approx(
        [(len(train) - train.sum()) / train.sum()]
    )


def test_regression_standardised_with_train_stats(products, manifest):
    weight = pd.to_numeric(products.attributes.map(lambda a: dict(a).get("weight_kg")))
    for name, raw, log in [("weight", weight, True), ("price", products.price, False)]:
        value = np.log1p(raw) if log else raw
        train = value[(products.split == "train") & value.notna()]
        stats = task_entry(manifest, name)["stats"]
        assert stats["log"] is log
        assert [stats["mean"], stats["std"]] == pytest.approx([train.mean(), train.std(ddof=1)])
        expected = (value - stats["mean"]) / stats["std"]
        labels = stored(products, name).astype(float)
        assert (labels.isna() == value.isna()).all()
        assert np.allclose(labels[value.notna()], expected[value.notna()], atol=1e-5)
    assert products.price.isna().any(), "products without a price must be masked"


def test_multilabel_nodes_and_weights(products, manifest):
    entry = task_entry(manifest, "category")

    def nodes(path) -> list[str]:
        levels = list(path)[:2]
        return [NODE_SEPARATOR.join(levels[: i + 1]) for i in range(len(levels))]

    all_nodes = products.category_path.map(nodes)
    train = all_nodes[products.split == "train"]
    counts = Counter(node for row in train for node in row)
    kept = sorted(node for node, count in counts.items() if count >= MIN_COUNT)
    assert entry["labels"] == kept and len(kept) < len(counts)
    labelled = int((train.map(len) > 0).sum())
    expected_weights = [min(max((labelled - counts[n]) / counts[n], 0.01), 100.0) for n in kept]
    assert any(weight > 1 for weight in expected_weights)
    assert entry["pos_weight"] == pytest.approx(expected_weights)
    index = {node: i for i, node in enumerate(kept)}
    for row_nodes, stored in zip(all_nodes, products.category, strict=True):
        wanted = sorted(index[n] for n in row_nodes if n in index)
        assert (list(stored) if stored is not None else []) == wanted


def test_tfidf_matches_scikit_learn(products, manifest):
    entry = task_entry(manifest, "title_tfidf")
    train_titles = products.title[products.split == "train"]
    frequency = Counter(term for title in train_titles for term in set(tokenize(title)))
    top = sorted(frequency.items(), key=lambda kv: (-kv[1], kv[0]))[:60]
    assert entry["labels"] == [term for term, _ in top]
    reference = TfidfVectorizer(
        tokenizer=tokenize, lowercase=False, token_pattern=None, vocabulary=entry["labels"]
    ).fit(train_titles)
    assert entry["idf"] == pytest.approx(reference.idf_.tolist())
    expected = reference.transform(products.title)
    for i, (indices, values) in enumerate(
        zip(products.title_tfidf_idx, products.title_tfidf_val, strict=True)
    ):
        row = expected.getrow(i)
        if indices is None:
            assert row.nnz == 0
            continue
        assert list(indices) == sorted(row.indices.tolist())
        assert np.allclose(values, row.toarray()[0][list(indices)], atol=1e-6)


def test_token_ids_come_from_the_shared_vocabulary(built, products):
    config, _ = built
    vocabulary = Vocabulary.load(config.outputs.shards / shard.VOCABULARY_FILE)
    assert vocabulary == Vocabulary.load(config.outputs.vocabulary)
    texts = {
        "title": products.title,
        "description": products.description,
        "bullets": products.bullets.map(lambda b: None if b is None else " ".join(b)),
        "brand": products.brand,
    }
    for field, max_len in TEXT_FIELDS.items():
        words = tokenize_arrow(pa.array(texts[field], pa.string()))
        expected = vocabulary.encode(words, max_len)
        assert np.array_equal(np.stack(products[f"{field}_ids"].to_numpy()), expected)
        lengths = np.minimum(pc.list_value_length(words).to_numpy(), max_len)
        assert np.array_equal(products[f"{field}_len"].to_numpy(), np.maximum(lengths, 1))
    assert (products.title.map(lambda t: len(tokenize(t))) > TEXT_FIELDS["title"]).any()
    assert products.description.isna().any(), "an empty field must still have length 1"


def test_loader_reads_the_stage_output_exactly_once(built, manifest):
    config, _ = built
    root = config.outputs.shards
    for split in SPLITS:
        ids = np.concatenate(
            [
                batch["row_id"].numpy()
                for rank in range(2)
                for batch in make_loader(root, split, 64, rank=rank, world_size=2, num_workers=2)
            ]
        )
        assert np.array_equal(np.sort(ids[ids >= 0]), np.arange(manifest["splits"][split]))
    batch = next(iter(make_loader(root, "train", 16)))
    assert batch["category"].shape == (16, task_entry(manifest, "category")["num_outputs"])
    assert batch["title_tfidf"].shape == (16, 60)
    assert batch["bullets_ids"].shape == (16, TEXT_FIELDS["bullets"])


@pytest.mark.slow
def test_per_group_shard_sets(spark, built, tmp_path):
    config, _ = built
    for stage in ("clean", "corpus"):
        shutil.copytree(config.outputs.stage(stage), tmp_path / "synthetic" / stage)
    groups = pq.read_table(config.outputs.clean_catalog).to_pandas().product_group
    sizes = groups.value_counts()
    grouped = with_shard(
        config.model_copy(update={"workdir": tmp_path}),
        per_group=True,
        min_group_rows=int(sizes.min()) + 1,
    )
    result = shard.run(spark, grouped)
    root = grouped.outputs.shards
    index = json.loads((root / MANIFEST).read_text())
    smallest = sizes.idxmin()
    assert index["skipped_groups"] == {smallest: int(sizes.min())}
    assert sorted(index["groups"]) == sorted(set(sizes.index) - {smallest})
    assert sum(result.rows[s] for s in SPLITS) + result.rows["skipped"] == len(groups)
    with pytest.raises(ShardError, match="indexes per-group"):
        make_loader(root, "train", 8)
    catalog = pq.read_table(config.outputs.clean_catalog).to_pandas()
    for group, path in shard_sets(root).items():
        manifest = load_manifest(path)
        assert manifest["group"] == group
        subcategories = {
            p[1] for p in catalog.category_path[catalog.product_group == group] if len(p) > 1
        }
        assert set(task_entry(manifest, "subcategory")["labels"]) - {OTHER} <= subcategories
        assert sum(manifest["splits"].values()) == sizes[group]
        ids = [batch["row_id"] for batch in make_loader(path, "train", 32)]
        assert sum(len(i) for i in ids) == manifest["splits"]["train"]


def test_image_features_have_one_length_and_a_missing_flag(spark, built, tmp_path):
    """Vectors of the catalog's (most common) length pass through; missing ones and ones of
    another length become zeros with image_missing set, as ProductNet feeds a zero image."""
    config, _ = built
    shutil.copytree(config.outputs.corpus, tmp_path / "synthetic" / "corpus")
    catalog = pq.read_table(config.outputs.clean_catalog)
    ids = catalog.column("product_id").to_pylist()
    vectors = {
        pid: None if i % 5 == 0 else [0.5, 0.5] if i % 7 == 0 else [i, 1.0, -1.0, 2.0]
        for i, pid in enumerate(ids)
    }
    column = pa.array([vectors[pid] for pid in ids], pa.list_(pa.float32()))
    catalog = catalog.set_column(
        catalog.schema.get_field_index("image_features"), "image_features", column
    )
    (tmp_path / "synthetic" / "clean" / "catalog").mkdir(parents=True)
    pq.write_table(catalog, tmp_path / "synthetic" / "clean" / "catalog" / "part-0.parquet")
    columns = config.catalog.columns.model_copy(update={"image_features": "image"})
    imaged = config.model_copy(
        update={
            "workdir": tmp_path,
            "catalog": config.catalog.model_copy(update={"columns": columns}),
        }
    )
    seal_catalog(imaged.outputs.clean_catalog, catalog.num_rows, imaged)
    shard.run(spark, with_shard(imaged, tasks=TASKS[:2]))
    root = imaged.outputs.shards
    assert load_manifest(root)["image_features"] == {"dim": 4}
    rows = pa.concat_tables(pq.read_table(root / split) for split in SPLITS).to_pylist()
    assert len(rows) == len(ids)
    for row in rows:
        given = vectors[row["product_id"]]
        missing = given is None or len(given) != 4
        assert row["image_missing"] is missing
        assert row["image_features"] == ([0.0] * 4 if missing else given)
    batch = next(iter(make_loader(root, "train", 8)))
    assert batch["image_features"].shape == (8, 4) and batch["image_missing"].dtype == torch.bool


def test_failures_are_clear_and_keep_the_published_shards(spark, built, tmp_path):
    config, _ = built
    manifest = (config.outputs.shards / MANIFEST).read_text()
    nolabel = {"name": "nothing", "kind": "multiclass", "source": "attributes.nope", "top_n": 3}
    # Mapped by the catalog but empty in every row: an error. (Unmapped, it is left out.)
    attributes = {**config.catalog.attributes, "nope": "nope"}
    mapped = config.model_copy(
        update={"catalog": config.catalog.model_copy(update={"attributes": attributes})}
    )
    with pytest.raises(ShardError, match="no train product has a label"):
        shard.run(spark, with_shard(mapped, tasks=[*TASKS, nolabel]))
    assert (config.outputs.shards / MANIFEST).read_text() == manifest
    assert not list(config.outputs.root.glob(".shard-*"))
    badsource = {"name": "bad", "kind": "regression", "source": "weight"}
    with pytest.raises(CatalogError, match="not a clean-catalog column"):
        shard.run(spark, with_shard(config, tasks=[*TASKS, badsource]))
    elsewhere = config.model_copy(update={"workdir": tmp_path})
    with pytest.raises(CorpusError, match="has no completion record.*run `prodvec corpus`"):
        shard.run(spark, elsewhere)
