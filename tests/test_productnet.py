"""ProductNet master model (issue 6): field encoders honour lengths and missing fields, the
served one-tensor form gives the same embedding as the trained module, top-k metrics agree
with scikit-learn, the accuracy loss and the balanced subset behave as Products-10K says, and
a tiny master model trains through the real train stage (fine-tuning included), is registered
and embedded by the embed stage with exactly the embeddings the model gives the shard rows.

The end-to-end part runs clean -> corpus -> shard -> train -> embed on a 600-product
synthetic catalog with title, description, bullets and brand, tiny sizes: about a minute.
"""

from __future__ import annotations

import json
import math

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient
from sklearn.metrics import top_k_accuracy_score

from models.encoders import ProductNetEncoder, pack_fields
from models.mrnet import PAD_ID
from models.productnet import (
    BIGRAM_PRIME,
    DPCNN,
    AttentionLSTM,
    BagOfWords,
    ProductNet,
)
from pipelines.core.config import Config, load_config
from pipelines.core.errors import ConfigError
from pipelines.data.catalog import read_clean
from pipelines.data.shards import load_manifest
from pipelines.data.tokenizer import Vocabulary
from pipelines.model_types.contract import InputLayout
from pipelines.model_types.registry import model_type
from pipelines.stages import clean, corpus, shard
from pipelines.stages.registry import run_stage
from pipelines.table import EmbeddingTable
from pipelines.tasks import TaskMetrics, kind_of
from pipelines.training.finetune import balanced_subset
from pipelines.training.inputs import word_vectors
from pipelines.training.loader import make_loader
from pipelines.training.objectives import AccuracyObjective, accuracy_loss
from pipelines.training.publish import CANDIDATE

FIELDS = {"title": 6, "description": 16, "bullets": 12, "brand": 4}
TASKS = [
    kind_of("multiclass").head({"name": "leaf", "num_outputs": 7}),
    kind_of("regression").head({"name": "price", "num_outputs": 1}),
]


def tiny(fields=FIELDS, image_dim: int | None = 5, **sizes) -> ProductNet:
    torch.manual_seed(0)
    return ProductNet(
        60,
        8,
        fields,
        TASKS,
        embedding_size=10,
        field_size=6,
        hidden_size=12,
        bigram_buckets=17,
        image_dim=image_dim,
        image_size=4,
        dropout=0.0,
        **sizes,
    ).eval()


def random_batch(model: ProductNet, rows: int = 5, seed: int = 1) -> dict[str, torch.Tensor]:
    """Real tokens up to a random length per row (0: the field is missing), then padding."""
    generator = torch.Generator().manual_seed(seed)
    batch = {}
    for name, length in model.fields:
        ids = torch.randint(2, 60, (rows, length), generator=generator)
        lengths = torch.randint(0, length + 1, (rows,), generator=generator)
        lengths[0] = length  # at least one full row
        batch[f"{name}_ids"] = ids.masked_fill(torch.arange(length) >= lengths[:, None], PAD_ID)
    if model.image_dim is not None:
        batch["image_features"] = torch.randn(rows, model.image_dim, generator=generator)
        batch["image_missing"] = torch.arange(rows) % 2 == 1
    return batch


# ---- the model --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, image_dim",
    [
        ({"title": 6}, None),
        (FIELDS, None),
        (FIELDS, 5),
        ({"title": 3, "brand": 2}, 3),
    ],
)
def test_outputs_and_embedding_shapes(fields, image_dim) -> None:
    model = tiny(fields, image_dim)
    batch = random_batch(model)
    outputs = model(batch)
    assert outputs["leaf"].shape == (5, 7) and outputs["price"].shape == (5,)
    embedding = model.encode(batch)
    assert embedding.shape == (5, 10) and torch.isfinite(embedding).all()
    assert set(model(batch, tasks=["price"])) == {"embedding", "price"}


@pytest.mark.parametrize("field", list(FIELDS))
def test_a_missing_field_gives_zeros_and_sets_its_flag(field: str) -> None:
    model = tiny()
    batch = random_batch(model)
    batch[f"{field}_ids"][2] = PAD_ID
    assert torch.equal(model.encode_field(field, batch[f"{field}_ids"])[2], torch.zeros(6))
    assert model.encode_field(field, batch[f"{field}_ids"])[0].abs().sum() > 0
    # the flag reaches the fusion: an all-padding field differs from the same zeros unflagged
    with torch.no_grad():
        flagged = model.encode(batch)[2]
        model.fusion[0].weight[:, -(len(FIELDS) + 1) :] = 0.0  # drop the flags' weights
        unflagged = model.encode(batch)[2]
    assert not torch.allclose(flagged, unflagged)


def test_a_missing_image_ignores_its_features() -> None:
    model = tiny()
    batch = random_batch(model)
    before = model.encode(batch)
    batch["image_features"] = batch["image_features"] * 3 + 1
    after = model.encode(batch)
    missing = batch["image_missing"]
    assert torch.allclose(before[missing], after[missing])
    assert not torch.allclose(before[~missing], after[~missing])


@pytest.mark.parametrize("encoder", ["attention_lstm", "dpcnn"])
def test_sequence_encoders_ignore_what_follows_the_last_token(encoder: str) -> None:
    torch.manual_seed(0)
    vectors = torch.randn(4, 9, 5)
    lengths = torch.tensor([9, 4, 1, 6])
    real = torch.arange(9)[None, :] < lengths[:, None]
    module = AttentionLSTM(5, 6) if encoder == "attention_lstm" else DPCNN(5, 6, 9)
    run = (
        (lambda v: module(v, lengths))
        if encoder == "attention_lstm"
        else (lambda v: module(v, real))
    )
    noisy = torch.where(real.unsqueeze(-1), vectors, torch.randn(4, 9, 5) * 10)
    assert torch.allclose(run(vectors), run(noisy), atol=1e-6)
    changed = vectors.clone()
    changed[1, 2] += 1.0  # a real token of row 1
    moved = run(changed)
    assert not torch.allclose(moved[1], run(vectors)[1])


@pytest.mark.parametrize("max_len, blocks", [(1, 0), (4, 1), (16, 3), (32, 4), (100, 5)])
def test_dpcnn_depth_halves_to_about_two_positions(max_len: int, blocks: int) -> None:
    assert len(DPCNN(4, 4, max_len).blocks) == blocks


@pytest.mark.parametrize(
    "ids, expected",
    [
        ([[5, 7, 0, 0]], [[(5 * BIGRAM_PRIME + 7) % 17 + 1, 0, 0]]),
        ([[7, 5, 9, 0]], [[(7 * BIGRAM_PRIME + 5) % 17 + 1, (5 * BIGRAM_PRIME + 9) % 17 + 1, 0]]),
        ([[3, 0, 0, 0]], [[0, 0, 0]]),
    ],
)
def test_bag_hashes_neighbouring_real_tokens(ids, expected) -> None:
    bag = BagOfWords(4, 3, buckets=17)
    assert bag.bigram_ids(torch.tensor(ids)).tolist() == expected


def test_bag_is_word_order_sensitive_only_through_bigrams() -> None:
    torch.manual_seed(0)
    bag, words = BagOfWords(4, 3, buckets=97), torch.nn.Embedding(20, 4, padding_idx=0)
    forward, backward = torch.tensor([[5, 7, 9]]), torch.tensor([[9, 7, 5]])
    assert not torch.allclose(bag(words(forward), forward), bag(words(backward), backward))
    with torch.no_grad():
        bag.bigrams.weight.zero_()
    assert torch.allclose(bag(words(forward), forward), bag(words(backward), backward))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"fields": {"title": 4, "colour": 3}}, "fields must be some of"),
        ({"fields": {}}, "fields must be some of"),
        ({"tasks": [TASKS[0], TASKS[0]]}, "task names must be unique"),
        ({"pretrained": np.zeros((3, 8))}, "pretrained vectors are"),
    ],
)
def test_bad_construction_is_refused(change, message) -> None:
    arguments = {"fields": FIELDS, "tasks": TASKS, **change}
    fields, tasks = arguments.pop("fields"), arguments.pop("tasks")
    with pytest.raises(ValueError, match=message):
        ProductNet(60, 8, fields, tasks, **arguments)


# ---- the served form --------------------------------------------------------------------------


@pytest.mark.parametrize("image_dim", [None, 5])
def test_served_form_gives_the_trained_modules_embedding(image_dim) -> None:
    model = tiny(image_dim=image_dim)
    batch = random_batch(model)
    image = (
        (batch["image_features"].numpy(), batch["image_missing"].numpy())
        if image_dim
        else (None, None)
    )
    packed = pack_fields([batch[f"{name}_ids"].numpy() for name, _ in model.fields], *image)
    served = ProductNetEncoder(model)
    assert packed.dtype == np.int64 and packed.shape == (5, served.width)
    unpacked = served.unpack(torch.from_numpy(packed))
    if image_dim:  # the features cross bit for bit
        assert torch.equal(unpacked["image_features"], batch["image_features"])
    expected = torch.nn.functional.normalize(model.encode(batch), dim=1)  # served: unit length
    assert torch.allclose(served(torch.from_numpy(packed)), expected, atol=1e-6)
    with pytest.raises(ValueError, match="columns, expected"):
        served(torch.from_numpy(packed[:, 1:]))


def test_embed_packs_fields_and_image_features_as_the_shards_do() -> None:
    """Missing image: null or the wrong length (the shard stage's rule); bullets joined."""
    vocabulary = Vocabulary.from_counts(["red", "shoe", "acme", "soft", "sole"], [5, 4, 3, 2, 1])
    features = [[0.5, -1.25, 3.0], None, [1.0, 2.0], [7.0, 8.0, 9.0]]
    batch = pa.RecordBatch.from_pydict(
        {
            "title": ["red shoe", "shoe", None, "acme red shoe"],
            "bullets": [["soft sole", "red"], [], None, ["sole"]],
            "brand": ["acme", None, "acme", "unknown"],
            "image_features": pa.array(features, pa.list_(pa.float32())),
        }
    )
    layout = InputLayout(
        max_len=3, fields=(("title", 3), ("bullets", 4), ("brand", 2)), image_dim=3
    )
    packed = model_type("productnet").inputs(layout, batch, vocabulary)
    red, shoe, acme, soft, sole = range(2, 7)
    assert packed[:, :9].tolist() == [
        [red, shoe, 0, soft, sole, red, 0, acme, 0],
        [shoe, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, acme, 0],
        [acme, red, shoe, sole, 0, 0, 0, 1, 0],
    ]
    assert packed[:, 9].tolist() == [0, 1, 1, 0]  # missing flags
    bits = packed[:, 10:].astype(np.int32).view(np.float32)
    np.testing.assert_array_equal(bits[[0, 3]], np.array([features[0], features[3]]))
    assert not bits[[1, 2]].any()


# ---- metrics and losses -----------------------------------------------------------------------


def test_top_k_accuracy_agrees_with_scikit_learn() -> None:
    generator = torch.Generator().manual_seed(3)
    task = kind_of("multiclass").head({"name": "leaf", "num_outputs": 9})
    metrics = TaskMetrics(task, torch.device("cpu"), top_k=(1, 3, 5))
    logits, targets = [], []
    for _ in range(4):  # several batches, some rows unlabelled
        output = torch.randn(50, 9, generator=generator)
        target = torch.randint(0, 9, (50,), generator=generator)
        mask = torch.rand(50, generator=generator) > 0.2
        metrics.update(output, target, mask, torch.tensor(1.0))
        logits.append(output[mask])
        targets.append(target[mask])
    logits, targets = torch.cat(logits).numpy(), torch.cat(targets).numpy()
    result = metrics.compute()
    for k, key in ((1, "accuracy"), (3, "top3_accuracy"), (5, "top5_accuracy")):
        expected = top_k_accuracy_score(targets, logits, k=k, labels=range(9))
        assert result[key] == pytest.approx(expected)


def test_top_k_is_left_out_when_k_covers_every_class() -> None:
    metrics = TaskMetrics(
        kind_of("multiclass").head({"name": "leaf", "num_outputs": 4}),
        torch.device("cpu"),
        top_k=(1, 3, 5),
    )
    metrics.update(
        torch.randn(8, 4), torch.arange(8) % 4, torch.ones(8, dtype=torch.bool), torch.tensor(1.0)
    )
    result = metrics.compute()
    assert "top3_accuracy" in result and "top5_accuracy" not in result


@pytest.mark.parametrize(
    "logits, target, mask, expected",
    [
        ([[0.0, 0.0, 0.0, 0.0]], [2], [True], 0.75),  # uniform: 1 - 1/C
        ([[20.0, 0.0], [0.0, 20.0]], [0, 1], [True, True], 0.0),  # confident and right
        ([[20.0, 0.0], [0.0, 20.0]], [1, 0], [True, True], 1.0),  # confident and wrong
        ([[20.0, 0.0], [0.0, 0.0]], [0, 99], [True, False], 0.0),  # unlabelled row ignored
        ([[1.0, 2.0]], [5], [False], 0.0),  # no label: 0, not NaN
        ([[math.log(3.0), 0.0]], [0], [True], 0.25),
    ],
)
def test_accuracy_loss(logits, target, mask, expected) -> None:
    loss = accuracy_loss(torch.tensor(logits), torch.tensor(target), torch.tensor(mask))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_accuracy_objective_sums_accuracy_loss_and_normalised_others() -> None:
    objective = AccuracyObjective(TASKS)
    logits = torch.zeros(4, 7, requires_grad=True)
    price = torch.zeros(4, requires_grad=True)
    batch = {
        "leaf": torch.tensor([0, 1, 2, 3]),
        "leaf_mask": torch.ones(4, dtype=torch.bool),
        "price": torch.tensor([1.0, -1.0, 1.0, -1.0]),
        "price_mask": torch.ones(4, dtype=torch.bool),
    }
    total, per_task = objective({"leaf": logits, "price": price}, batch)
    assert per_task["leaf"].item() == pytest.approx(1 - 1 / 7)
    assert per_task["price"].item() == pytest.approx(1.0)  # MSE 1 over the default variance 1
    assert total.item() == pytest.approx(1 - 1 / 7 + 1.0)
    total.backward()
    assert logits.grad.abs().sum() > 0 and price.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.model=bert"], "unknown model type 'bert'; model types are mrnet, "),
        (["train.per_group=true"], "unknown key 'train.per_group'"),
        (["train.finetune.per_class=0"], "per_class"),
        (["train.productnet.colour=1"], "colour"),
    ],
)
def test_bad_productnet_settings_are_config_errors(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


# ---- end to end: shards, training, fine-tuning, registry, embed -------------------------------

ROWS = 600


@pytest.fixture(scope="module")
def trained(spark, tmp_path_factory) -> tuple[Config, dict]:
    """A tiny master model over five text fields (keywords from two catalog columns), trained
    and fine-tuned by the train stage."""
    workdir = tmp_path_factory.mktemp("productnet")
    config = load_config(
        overrides=[
            f"workdir={workdir}",
            f"catalog.synthetic.rows={ROWS}",
            "spark.shuffle_partitions=2",
            "word2vec.epochs=2",
            "word2vec.min_count=2",
            "word2vec.dims=8",
            "shard.row_group_rows=64",
            # the paper's keyword fields, here two of the synthetic catalog's columns
            "catalog.columns.keywords=[color, material]",
            "shard.text_fields={title: 12, description: 24, bullets: 16, brand: 3, keywords: 4}",
            "train.model=productnet",
            "train.tasks=[subcategory]",
            "train.embedding_size=12",
            "train.batch_size=32",
            "train.epochs=2",
            "train.lr=0.01",
            "train.distributed=false",
            "train.threads_per_process=1",
            "train.calibration_batches=3",
            "train.productnet.field_size=8",
            "train.productnet.hidden_size=16",
            "train.productnet.bigram_buckets=500",
            "train.finetune.epochs=1",
            "train.finetune.per_class=3",
            "train.finetune.lr=0.001",
        ]
    )
    clean.run(spark, config)
    corpus.run(spark, config)
    shard.run(spark, config)
    result = run_stage("train", config, spark)
    return config, {"train": result}


@pytest.mark.slow
def test_balanced_subset_keeps_at_most_k_rows_a_class(trained, tmp_path) -> None:
    config, _ = trained
    shard_dir = config.outputs.shards
    manifest = load_manifest(shard_dir)
    train = pq.read_table([shard_dir / f["path"] for f in manifest["files"]["train"]]).to_pandas()
    assert all(ids[0] != 0 for ids in train["keywords_ids"])  # colour and material, tokenised
    subset_dir = balanced_subset(
        shard_dir, tmp_path / "subset", "subcategory", 3, seed=5, row_group_rows=16
    )
    subset = pq.read_table(tmp_path / "subset" / "train").to_pandas()
    per_class = train.groupby("subcategory").size()
    expected = per_class.clip(upper=3)
    assert (
        subset.groupby("subcategory").size().sort_index().tolist() == expected.sort_index().tolist()
    )
    assert subset["product_id"].is_unique and set(subset["product_id"]) <= set(train["product_id"])
    rows = train.set_index("product_id").loc[subset["product_id"], "title_ids"]
    assert [list(r) for r in rows] == [list(r) for r in subset["title_ids"]]  # whole rows
    assert subset["subcategory"].head(len(expected)).nunique() > 1  # shuffled, not by class
    # the loader reads it: the subset's train split, the source's validation split
    assert sum(len(b["row_id"]) for b in make_loader(subset_dir, "train", 8)) == len(subset)
    validation = sum(
        int((b["row_id"] >= 0).sum()) for b in make_loader(subset_dir, "validation", 64)
    )
    assert validation == manifest["splits"]["validation"]
    again = pq.read_table(
        balanced_subset(shard_dir, tmp_path / "again", "subcategory", 3, seed=5, row_group_rows=16)
        / "train"
    ).to_pandas()
    assert again["product_id"].tolist() == subset["product_id"].tolist()  # by seed


@pytest.mark.slow
def test_train_stage_trains_fine_tunes_and_registers(trained) -> None:
    config, results = trained
    result = results["train"]
    name = f"prodvec-productnet-{config.catalog.name}"
    assert result.outputs["registered_model"].startswith(f"models:/{name}/")
    assert result.outputs["run_dir"].endswith("finetune")
    history = json.loads((config.outputs.training / "model" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [0, 1, 2]
    for row in history:  # top-1/3/5 on the held-out split every epoch
        assert {
            "val_subcategory_accuracy",
            "val_subcategory_top3_accuracy",
            "val_subcategory_top5_accuracy",
        } <= set(row)
        assert (
            row["val_subcategory_accuracy"]
            <= row["val_subcategory_top3_accuracy"]
            <= row["val_subcategory_top5_accuracy"]
        )
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    tuned = json.loads((config.outputs.training / "finetune" / "history.json").read_text())
    assert [row["epoch"] for row in tuned] == [0, 1]
    best = min(history, key=lambda row: row["val_loss"])  # fine-tuning starts from it
    for key in ("val_subcategory_accuracy", "val_subcategory_top3_accuracy"):
        assert tuned[0][key] == pytest.approx(best[key])
    assert 0.0 <= tuned[1]["val_subcategory_loss"] <= 1.0  # the accuracy loss's range
    client = MlflowClient()
    version = client.get_model_version_by_alias(name, CANDIDATE)
    run = client.get_run(version.run_id)
    assert "best_finetune.val_subcategory_accuracy" in run.data.metrics
    steps = client.get_metric_history(version.run_id, "val_subcategory_top3_accuracy")
    assert sorted(m.step for m in steps) == [0, 1, 2]
    served = mlflow.pytorch.load_model(f"models:/{name}@{CANDIDATE}")
    assert isinstance(served, ProductNetEncoder)
    assert [field for field, _ in served.fields] == [
        "title",
        "description",
        "bullets",
        "brand",
        "keywords",
    ]


@pytest.mark.slow
def test_embed_stage_serves_the_master_model(trained, spark) -> None:
    config, _ = trained
    result = run_stage("embed", config, spark)
    assert result.metrics["dimension"] == 12
    table = EmbeddingTable.from_config(config).read_spark(spark).toPandas()
    clean_rows = read_clean(spark, config).count()
    assert len(table) == clean_rows == result.rows["table"]
    assert (table["model_name"] == f"prodvec-productnet-{config.catalog.name}").all()
    # the embed stage's tokenisation of every field = the shard stage's: same embeddings
    shard_dir = config.outputs.shards
    model = model_type("productnet").load_trained(
        config,
        shard_dir,
        config.outputs.training / "finetune",
        word_vectors(config, shard_dir, config.outputs.training),
    )
    by_id = dict(zip(table["product_id"], table["embedding"], strict=True))
    products = split_product_ids(shard_dir, "test")
    compared = 0
    for batch in make_loader(shard_dir, "test", 64, shuffle=False):
        with torch.no_grad():
            expected = torch.nn.functional.normalize(model.encode(batch), dim=1).numpy()
        actual = np.stack([by_id[p] for p in products[batch["row_id"].numpy()]])
        np.testing.assert_allclose(actual, expected, atol=1e-5)
        compared += len(actual)
    assert compared == len(products) == load_manifest(shard_dir)["splits"]["test"]


def split_product_ids(shard_dir, split: str) -> np.ndarray:
    """product_id by the loader's row_id (a split's rows in manifest file order)."""
    manifest = load_manifest(shard_dir)
    return np.concatenate(
        [
            pq.read_table(shard_dir / f["path"], columns=["product_id"])
            .column(0)
            .to_numpy(zero_copy_only=False)
            for f in manifest["files"][split]
        ]
    )
