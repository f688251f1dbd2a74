"""The cross_locale stage (MRNet section 5) on a real two-locale catalog: the clean stage's
output of the synthetic catalog listed in en_US and fr_FR (plus a few de_DE listings), an
embedding table whose fr_FR embeddings are a rotation of the en_US ones (two unrelated spaces,
as two per-language models give), the real stage, MLflow registry and Delta commits."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pyspark.sql import functions as F

from models.autoencoders import CrossLocaleAutoencoder
from pipelines.core.config import Config, load_config
from pipelines.core.errors import ConfigError, CrossLocaleError
from pipelines.data.catalog import clean_written_at, read_clean
from pipelines.data.synthetic import (
    generate_catalog,
    pseudo_word,
    translate,
    with_translated_locale,
    write_catalog,
)
from pipelines.stages.cross_locale import Projection, unit
from pipelines.stages.registry import run_stage
from pipelines.table import EmbeddingTable

DIM = 16
EN, FR, DE = "en_US", "fr_FR", "de_DE"
TRAINING = [
    "cross_locale.holdout=0.3",
    "cross_locale.epochs=60",
    "cross_locale.lr=0.01",
    "cross_locale.batch_size=128",
]


def two_locale_config(catalog: Path, workdir: Path, tracking: str, *overrides: str) -> Config:
    return load_config(
        overlays=["two_locale"],
        overrides=[
            f"workdir={workdir}",
            "catalog.synthetic=null",
            f"catalog.path={catalog}",
            tracking,
            *TRAINING,
            *overrides,
        ],
    )


def commit_embeddings(spark, config: Config, stamp_offset: int = 0) -> pd.DataFrame:
    """Every clean product's hand-made embedding, committed to the configured table: en_US
    listings near a random vector per product, fr_FR ones that vector rotated, de_DE random."""
    products = (
        read_clean(spark, config)
        .select("product_id", "content_hash", "locale", F.col("attributes")["global_id"].alias("g"))
        .toPandas()
    )
    rng = np.random.default_rng(3)
    ids = {g: i for i, g in enumerate(sorted(products["g"].unique()))}
    base = rng.normal(size=(len(ids), DIM))
    rotation = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0]
    vectors = base[products["g"].map(ids).to_numpy()] + 0.05 * rng.normal(size=(len(products), DIM))
    french = (products["locale"] == FR).to_numpy()
    vectors[french] = vectors[french] @ rotation
    vectors[(products["locale"] == DE).to_numpy()] = rng.normal(
        size=((products["locale"] == DE).sum(), DIM)
    )
    products["embedding"] = list(vectors.astype(np.float32))
    frame = spark.createDataFrame(products[["product_id", "content_hash", "embedding"]])
    EmbeddingTable.from_config(config).commit(
        frame,
        app_id=f"handmade-{stamp_offset}",
        run_id="handmade",
        model_uri="handmade",
        model_name="handmade",
        model_version="1",
        config_hash=config.digest(),
        mode="full",
        dimension=DIM,
        catalog_stamp=clean_written_at(config.outputs.clean_catalog) + stamp_offset,
    )
    return products


def paired_by(config: Config, pairs: Path) -> Config:
    """`config` pairing by the file `pairs` instead of the shared attribute."""
    settings = config.cross_locale.model_copy(update={"pairs": str(pairs), "pair_attribute": None})
    return config.model_copy(update={"cross_locale": settings})


# A pairs file's rows the stage cannot use, by reason (indexes into the good pairs).
BAD_PAIRS = {
    "missing_id": 1,
    "unknown_product": 1,
    "wrong_locale": 2,  # the columns swapped; a de_DE listing
    "duplicate_pair": 1,
}


def write_pairs(path: Path, products: pd.DataFrame) -> int:
    """Every product's pair (en_US, fr_FR) plus one row of each BAD_PAIRS kind; its rows."""
    ids = {
        locale: dict(zip(group["g"], group["product_id"], strict=True))
        for locale, group in products.groupby("locale")
    }
    good = [(ids[EN][g], ids[FR][g]) for g in sorted(ids[EN])]
    bad = [
        ("", good[0][1]),
        ("no-such-product", good[1][1]),
        (good[2][1], good[2][0]),
        (next(iter(ids[DE].values())), good[3][1]),
        good[4],
    ]
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([(EN, FR), *good, *bad])
    return len(good) + len(bad)


@pytest.fixture(scope="module")
def two_locales(spark, tmp_path_factory, shared_tracking):
    """A cleaned two-locale catalog (150 products a locale, 6 de_DE listings), its hand-made
    embedding table and a pairs file: (config pairing by the file, the products with their
    embeddings, the file's rows)."""
    root = tmp_path_factory.mktemp("two-locales")
    frame = with_translated_locale(generate_catalog(150, 11, 0.0), FR)
    german = frame.iloc[:6].assign(sku=lambda f: f["sku"] + "-de", locale=DE)
    write_catalog(pd.concat([frame, german]), root / "catalog.csv", "csv")
    config = two_locale_config(root / "catalog.csv", root / "work", shared_tracking)
    run_stage("clean", config, spark)
    products = commit_embeddings(spark, config)
    return (
        paired_by(config, root / "pairs.csv"),
        products,
        write_pairs(root / "pairs.csv", products),
    )


def test_translated_catalog_shares_ids_brands_and_numbers_and_no_other_word():
    frame = with_translated_locale(generate_catalog(200, 5, 0.0), FR)
    english, french = frame[frame["locale"] == EN], frame[frame["locale"] == FR]
    assert len(english) == len(french) == 200
    assert list(french["global_id"]) == list(english["global_id"]) == list(english["sku"])
    assert list(french["sku"]) == [f"{sku}-{FR}" for sku in english["sku"]]
    assert (french["brand"].to_numpy() == english["brand"].to_numpy()).all()
    shared = set(" ".join(english["name"]).split()) & set(" ".join(french["name"]).split())
    brand_words = {word for brand in english["brand"] for word in brand.split()}
    kept = [word for word in shared if word in brand_words or not word.isalpha()]
    assert kept == list(shared) and any(c.isdigit() for word in shared for c in word), shared
    assert translate(np.array(["Red shirt, cotton."], dtype=object), frozenset()) == np.array(
        [f"{pseudo_word('red').capitalize()} {pseudo_word('shirt')}, {pseudo_word('cotton')}."]
    )


def test_projection_on_the_executors_is_the_autoencoders():
    torch.manual_seed(0)
    model = CrossLocaleAutoencoder(DIM)
    x_b = torch.randn(5, DIM)
    with torch.inference_mode():
        want = model.project_b_to_a(torch.from_numpy(unit(x_b.numpy()))).numpy()
    assert np.allclose(Projection.of(model)(x_b.numpy()), want, atol=1e-6)


@pytest.mark.slow  # a clean run, a table and the stage: the end-to-end tier
def test_stage_brings_fr_listings_into_the_en_space_and_commits_every_product(spark, two_locales):
    config, products, file_rows = two_locales
    result = run_stage("cross_locale", config, spark)
    rows, metrics = result.rows, result.metrics
    assert rows["locale_a"] == rows["locale_b"] == 150 and rows["other_locales"] == 6
    assert rows["in"] == rows["locale_a"] + rows["locale_b"] + rows["other_locales"]
    # Every row of the pairs file is used or rejected, with its reason.
    rejected = {
        key.removeprefix("pairs_rejected_"): n for key, n in rows.items() if "rejected" in key
    }
    assert rejected == BAD_PAIRS
    assert rows["pairs"] == 150 == file_rows - sum(rejected.values())
    assert rows["training_pairs"] + rows["holdout_pairs"] == rows["pairs"]
    reasons = spark.read.parquet(result.outputs["rejected_pairs"]).toPandas()["reason"]
    assert reasons.value_counts().to_dict() == BAD_PAIRS
    # Two unrelated spaces: a fr_FR listing's own embedding finds its en_US partner by chance;
    # projected into the en_US space it finds it.
    assert metrics["holdout_recall_at_1_own"] < 0.2
    assert metrics["holdout_recall_at_1_projected"] > 0.8

    table = EmbeddingTable(config.outputs.cross_locale_table)
    written = table.read_spark(spark, int(result.outputs["version"])).toPandas()
    assert rows["table"] == len(written) == 300
    listed = products[products["locale"].isin([EN, FR])]
    assert dict(zip(written["product_id"], written["content_hash"], strict=True)) == dict(
        zip(listed["product_id"], listed["content_hash"], strict=True)
    )
    vectors = np.stack(written["embedding"].to_numpy())
    assert vectors.shape == (300, DIM)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    # en_US listings keep their embedding (at unit length), fr_FR ones are projected.
    source = products.set_index("product_id").loc[written["product_id"], ["locale", "embedding"]]
    english, before = (source["locale"] == EN).to_numpy(), unit(np.stack(source["embedding"]))
    assert np.allclose(vectors[english], before[english], atol=1e-6)
    assert not np.allclose(vectors[~english], before[~english], atol=0.1)
    assert set(written["model_name"]) == {"prodvec-cross-locale-synthetic_two_locale"}
    info = table.commit_info(int(result.outputs["version"]))
    assert info["model_uri"] == result.outputs["model_uri"] and info["dimension"] == DIM

    again = run_stage("cross_locale", config, spark)  # same table version, same settings
    assert again.outputs["skipped"] == "already committed"
    assert table.version() == int(result.outputs["version"])


@pytest.mark.slow  # a clean run, a table and the stage: the end-to-end tier
def test_a_pairs_file_without_the_locales_columns_is_refused(spark, two_locales, tmp_path):
    config, _, _ = two_locales
    path = tmp_path / "pairs.csv"
    path.write_text("en_GB,fr_FR\na,b\n")
    paired = paired_by(config, path)
    with pytest.raises(CrossLocaleError, match=r"no column for locale\(s\) \['en_US'\]"):
        run_stage("cross_locale", paired, spark)


@pytest.mark.slow  # a clean run, a table and the stage: the end-to-end tier
def test_a_table_of_another_clean_catalog_is_refused(spark, two_locales, tmp_path):
    config, _, _ = two_locales
    elsewhere = config.model_copy(
        update={"embed": config.embed.model_copy(update={"table_path": str(tmp_path / "table")})}
    )
    commit_embeddings(spark, elsewhere, stamp_offset=-1)  # as if embedded before the last clean
    with pytest.raises(CrossLocaleError, match="run `prodvec embed` first"):
        run_stage("cross_locale", elsewhere, spark)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["cross_locale.enabled=true"], "names two different locales"),
        (["cross_locale.enabled=true", "cross_locale.locales=[en_US, en_US]"], "two different"),
        (
            ["cross_locale.enabled=true", "cross_locale.locales=[en_US, fr_FR]"],
            "exactly one of 'pairs' or 'pair_attribute'",
        ),
        (
            [
                "cross_locale.enabled=true",
                "cross_locale.locales=[en_US, fr_FR]",
                "cross_locale.pairs=p.csv",
                "cross_locale.pair_attribute=global_id",
            ],
            "exactly one of",
        ),
    ],
)
def test_an_enabled_stage_needs_two_locales_and_one_pairing(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


@pytest.mark.slow
def test_two_locale_example_end_to_end(spark, tmp_path, shared_tracking):
    """conf/two_locale.yaml as the README runs it, smaller: one model over both locales, the
    embed stage, then the stage pairing by the shared `global_id` attribute."""
    config = load_config(
        overlays=["two_locale"],
        overrides=[
            f"workdir={tmp_path}",
            shared_tracking,
            "catalog.synthetic.rows=400",
            "word2vec.epochs=2",
            "train.epochs=3",
            "train.distributed=false",
        ],
    )
    results = {
        stage: run_stage(stage, config, spark)
        for stage in ("clean", "corpus", "shard", "train", "embed", "cross_locale")
    }
    rows, metrics = results["cross_locale"].rows, results["cross_locale"].metrics
    clean = read_clean(spark, config).toPandas()
    listed = clean.groupby("locale").size().to_dict()
    assert rows["locale_a"] == listed[EN] and rows["locale_b"] == listed[FR]
    assert rows["table"] == results["embed"].rows["table"] == len(clean)
    both = clean.groupby(clean["attributes"].map(lambda a: a["global_id"]))["locale"].nunique()
    assert rows["pairs"] == rows["training_pairs"] + rows["holdout_pairs"] == (both == 2).sum()
    assert metrics["holdout_recall_at_1_projected"] >= metrics["holdout_recall_at_1_own"]
    assert metrics["holdout_recall_at_10_projected"] > 0.9
