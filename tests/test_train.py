"""Train stage: every task kind learns (joint and alternating), validation metrics agree with
scikit-learn, a run interrupted mid-epoch resumes from its checkpoint to the same weights as an
uninterrupted one, two gloo processes launched by TorchDistributor stay in sync, the model is
logged and registered, the per-group path trains group models and the group autoencoder, and
on the Flipkart catalog a small MRNet beats the majority class on category level 1.

The shards come from the real clean -> corpus -> shard stages over a small synthetic catalog;
models are tiny (16-d) and runs are a few epochs, so the module takes a couple of minutes.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient
from sklearn.metrics import accuracy_score, f1_score

from models.encoders import TitleEncoder
from models.mrnet import TaskHead
from pipelines.core.config import Config, ShardConfig, TrainConfig, load_config
from pipelines.core.errors import TrainingError
from pipelines.data.shards import MANIFEST
from pipelines.model_types.kinds.mrnet_per_group import embed_split
from pipelines.model_types.registry import model_type
from pipelines.stages import clean, corpus, shard
from pipelines.stages.registry import run_stage
from pipelines.tasks import TaskMetrics, kind_of
from pipelines.training.inputs import loop_spec, word_vectors
from pipelines.training.launch import Launch, local_cores, train_model
from pipelines.training.loop import BEST, LAST, load_checkpoint
from pipelines.training.objectives import MultitaskObjective
from pipelines.training.publish import CANDIDATE
from pipelines.training.reporting import read_history

DRIVER = Launch("driver", 1, False, 1)
KINDS = ("multiclass", "binary", "regression", "multilabel", "decoding")


def with_train(config: Config, **changes) -> Config:
    settings = TrainConfig.model_validate({**config.train.model_dump(), **changes})
    return config.model_copy(update={"train": settings})


@pytest.fixture(scope="module")
def built(small_shards) -> Config:
    """The shared 800-row catalog through clean, corpus and shard (conftest `small_shards`)."""
    return small_shards


def fit(
    config: Config, out: Path, objective=MultitaskObjective, resume: bool = True
) -> tuple[dict, list[dict]]:
    """The training loop in this process (the single-process path), as the stage runs it."""
    shards = config.outputs.shards
    out.mkdir(parents=True, exist_ok=True)
    vectors = word_vectors(config, shards, out)
    spec, factory = loop_and_factory(config, shards, out / "run", vectors, DRIVER)
    result = train_model(DRIVER, spec, factory, resume, objective)
    return result, read_history(out / "run")


def loop_and_factory(config: Config, shards: Path, run_dir: Path, vectors: Path, launch: Launch):
    """The loop's settings and the network factory, as the configured model type makes them."""
    chosen = model_type(config.train.model)
    spec = loop_spec(config, shards, run_dir, vectors, launch, chosen.fingerprint_part(config))
    return spec, chosen.factory(config, vectors)


def manifest_of(config: Config) -> dict:
    return json.loads((config.outputs.shards / MANIFEST).read_text())


# -- learning --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("optimisation", ["joint", "alternating"])
def test_every_task_kind_learns(built, tmp_path, optimisation):
    """Both optimisations lower every task's validation loss from the untrained model's."""
    alternating = optimisation == "alternating"
    tasks = (
        [
            next(t["name"] for t in manifest_of(built)["tasks"] if t["kind"] == kind)
            for kind in KINDS
        ]
        if alternating
        else []
    )  # alternating: one task of each kind
    config = with_train(
        built, optimisation=optimisation, tasks=tasks, epochs=6 if alternating else 3
    )
    result, history = fit(config, tmp_path)
    assert [row["epoch"] for row in history] == list(range(config.train.epochs + 1))
    first, last = history[0], history[-1]
    trained = [t for t in manifest_of(built)["tasks"] if not tasks or t["name"] in tasks]
    assert {t["kind"] for t in trained} == set(KINDS)
    for task in trained:
        name = task["name"]
        assert last[f"val_{name}_loss"] < first[f"val_{name}_loss"], (name, first, last)
    assert last["val_loss"] < first["val_loss"]
    assert history[-1]["train_loss"] < history[1]["train_loss"]
    assert result["epochs_run"] == config.train.epochs and result["world_size"] == 1
    # every kind reports its metrics
    expected = {
        "multiclass": ("accuracy", "macro_f1"),
        "binary": ("accuracy", "macro_f1"),
        "regression": ("rmse",),
        "multilabel": ("micro_f1", "macro_f1"),
        "decoding": (),
    }
    for task in trained:
        for metric in ("loss", *expected[task["kind"]]):
            assert np.isfinite(last[f"val_{task['name']}_{metric}"])


def head(name: str, kind: str, outputs: int) -> TaskHead:
    return kind_of(kind).head({"name": name, "num_outputs": outputs})


def test_metrics_agree_with_scikit_learn():
    gen = torch.Generator().manual_seed(0)
    n = 500
    mask = torch.rand(n, generator=gen) < 0.8
    loss = torch.tensor(0.5)

    def state(task: TaskHead, output, target) -> dict[str, float]:
        metrics = TaskMetrics(task, torch.device("cpu"), top_k=())
        for rows in (slice(0, 200), slice(200, n)):  # two batches sum up
            metrics.update(output[rows], target[rows], mask[rows], loss)
        return metrics.compute()

    m = mask.numpy()
    logits = torch.randn(n, 6, generator=gen)
    labels = torch.randint(0, 5, (n,), generator=gen)  # class 5 predicted but never true
    got = state(head("kind", "multiclass", 6), logits, labels)
    predicted = logits.argmax(1).numpy()[m]
    assert got["accuracy"] == pytest.approx(accuracy_score(labels.numpy()[m], predicted))
    assert got["macro_f1"] == pytest.approx(f1_score(labels.numpy()[m], predicted, average="macro"))
    assert got["loss"] == pytest.approx(0.5)

    flags = (torch.rand(n, generator=gen) < 0.3).float()
    logit = torch.randn(n, generator=gen)
    got = state(head("flag", "binary", 1), logit, flags)
    predicted = (logit > 0).long().numpy()[m]
    assert got["macro_f1"] == pytest.approx(f1_score(flags.numpy()[m], predicted, average="macro"))

    value, target = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    got = state(head("price", "regression", 1), value, target)
    assert got["rmse"] == pytest.approx(np.sqrt(np.mean((value - target).numpy()[m] ** 2)))

    nodes = (torch.rand(n, 7, generator=gen) < 0.2).float()
    nodes[:, 6] = 0  # a node with no positives, predicted nowhere: no F1, left out
    logits = torch.randn(n, 7, generator=gen)
    logits[:, 6] = -5
    got = state(head("path", "multilabel", 7), logits, nodes)
    truth, predicted = nodes.numpy()[m], (logits > 0).numpy()[m]
    assert got["micro_f1"] == pytest.approx(f1_score(truth, predicted, average="micro"))
    assert got["macro_f1"] == pytest.approx(
        f1_score(truth, predicted, average="macro", labels=range(6))
    )


# -- resume ----------------------------------------------------------------------------------


class Interrupted(Exception):
    """Stands for the kill: raised mid-step, so nothing after it runs or is saved."""


class InterruptingObjective(MultitaskObjective):
    """The real objective, which stops the run at training step `at_step` (1-based)."""

    def __init__(self, tasks, at_step: int) -> None:
        super().__init__(tasks)
        self.at_step, self.steps = at_step, 0

    def forward(self, outputs, batch, task=None):
        if torch.is_grad_enabled():  # a training step, not validation
            self.steps += 1
            if self.steps == self.at_step:
                raise Interrupted(f"interrupted at step {self.steps}")
        return super().forward(outputs, batch, task)


@pytest.mark.parametrize("optimisation", ["joint", "alternating"])
def test_an_interrupted_run_resumes_from_its_last_checkpoint(built, tmp_path, optimisation):
    config = with_train(built, epochs=2, checkpoint_every_steps=4, optimisation=optimisation)
    reference, reference_history = fit(config, tmp_path / "whole")
    steps_per_epoch = reference["global_step"] // 2
    at_step = steps_per_epoch + 7  # mid-epoch 2: the checkpoint before it is mid-epoch too
    saved = (at_step - 1) // 4 * 4
    assert saved > steps_per_epoch

    with pytest.raises(Interrupted):
        fit(config, tmp_path / "cut", partial(InterruptingObjective, at_step=at_step))
    checkpoint = load_checkpoint(tmp_path / "cut" / "run" / LAST)
    assert checkpoint["global_step"] == saved
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, saved - steps_per_epoch)

    result, history = fit(config, tmp_path / "cut")
    assert result["resumed_from"] == {
        "epoch": 1,
        "step": saved - steps_per_epoch,
        "global_step": saved,
    }
    assert result["steps_this_run"] == reference["global_step"] - saved
    final = load_checkpoint(tmp_path / "cut" / "run" / LAST)["model"]
    expected = load_checkpoint(tmp_path / "whole" / "run" / LAST)["model"]
    for name, tensor in expected.items():  # same batches, same order, same RNG: same weights
        assert torch.allclose(final[name], tensor, rtol=0, atol=1e-6), name
    assert history[-1]["val_loss"] == pytest.approx(reference_history[-1]["val_loss"])
    assert history[-1]["train_loss"] == pytest.approx(reference_history[-1]["train_loss"])


@pytest.mark.parametrize(
    ("select_by", "best_of"),
    [("val_loss", min), ("val_contrastive_loss", min), ("val_color_top5_accuracy", max)],
)
def test_the_kept_epoch_is_the_best_by_select_by(built, tmp_path, select_by, best_of):
    """The kept checkpoint is the epoch whose `select_by` figure is the lowest (a loss) or
    the highest (any other figure); here each of the three picks another epoch."""
    config = with_train(built, epochs=3, patience=3, select_by=select_by)
    result, history = fit(config, tmp_path)
    values = [row[select_by] for row in history]
    assert result["best_epoch"] == values.index(best_of(values))
    assert (result["selected_by"], result["best_selected"]) == (select_by, best_of(values))
    assert load_checkpoint(tmp_path / "run" / BEST)["epoch"] == result["best_epoch"]


def test_select_by_a_figure_the_model_lacks_is_a_clear_error(built, tmp_path):
    with pytest.raises(TrainingError, match="'val_colour_accuracy' is not a validation figure"):
        fit(with_train(built, epochs=1, select_by="val_colour_accuracy"), tmp_path)


def test_a_checkpoint_of_another_setup_is_not_resumed(built, tmp_path):
    fit(with_train(built, epochs=1), tmp_path)
    result, history = fit(with_train(built, epochs=1, lr=0.02), tmp_path)
    assert result["resumed_from"] is None and result["steps_this_run"] > 0
    assert [row["epoch"] for row in history] == [0, 1]
    finished, _ = fit(with_train(built, epochs=1, lr=0.02), tmp_path)  # same setup: done
    assert finished["steps_this_run"] == 0 and finished["resumed_from"]["epoch"] == 1


# -- the stage: TorchDistributor, MLflow, registry -------------------------------------------


@pytest.mark.slow
def test_stage_with_two_gloo_processes_logs_and_registers(spark, built):
    config = with_train(built, distributed=True, num_processes=2, epochs=2)
    result = run_stage("train", config, spark)
    run_dir = Path(result.outputs["run_dir"])
    outcome = json.loads((run_dir / "result.json").read_text())
    assert outcome["world_size"] == 2 and outcome["backend"] == "gloo"
    digests = outcome["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # DDP kept the ranks identical

    client = MlflowClient()
    name = f"prodvec-mrnet-{config.catalog.name}"
    version = client.get_model_version_by_alias(name, CANDIDATE)
    assert result.outputs["registered_model"] == f"models:/{name}/{version.version}"
    run = client.get_run(version.run_id)
    assert run.data.params["launch.mode"] == "local"
    assert run.data.params["launch.processes"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
    assert steps == [0, 1, 2]
    assert "learning_curves.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert result.metrics["best_val_loss"] == run.data.metrics["best_val_loss"]

    # The checkpoint loads without unpickling code; the served model is its encoder.
    best = torch.load(run_dir / BEST, weights_only=True)
    assert best["epoch"] == outcome["best_epoch"]
    served = mlflow.pyfunc.load_model(f"models:/{name}@{CANDIDATE}")
    signature = served.metadata.signature
    width = manifest_of(config)["subwords"]["width"]
    assert signature.inputs.inputs[0].shape == (-1, 16 + width)  # title ids, subword ids
    shard = pq.read_table(config.outputs.shards / "test", columns=["title_ids", "title_subwords"])
    ids = np.concatenate(
        [np.stack(shard.column(c).to_numpy(zero_copy_only=False)[:8]) for c in shard.column_names],
        axis=1,
    ).astype(np.int64)
    embedding = served.predict(ids)
    assert embedding.shape == (8, 16)
    assert np.allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)  # L2-normalised
    model = model_type("mrnet").load_trained(
        config, config.outputs.shards, run_dir, config.outputs.training / "word_vectors.npy"
    )
    with torch.no_grad():
        expected = TitleEncoder(model, 16, width)(torch.from_numpy(ids)).numpy()
    assert np.allclose(embedding, expected, atol=1e-6)
    extra = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{CANDIDATE}"))
    labels = json.loads((extra / "extra_files" / "labels.json").read_text())
    assert [t["name"] for t in labels["all"]] == [t["name"] for t in manifest_of(config)["tasks"]]
    assert (extra / "extra_files" / "vocabulary.parquet").is_file()


@pytest.mark.slow
def test_alternating_ddp_keeps_ranks_in_sync(spark, built, tmp_path):
    """Alternating steps train one head: DDP must find the unused ones and every rank must
    draw the same task, or the replicas drift apart."""
    config = with_train(built, optimisation="alternating", epochs=1)
    shards = config.outputs.shards
    vectors = word_vectors(config, shards, tmp_path)
    launch = Launch("local", 2, False, 1)
    spec, factory = loop_and_factory(config, shards, tmp_path / "run", vectors, launch)
    result = train_model(launch, spec, factory)
    assert result["world_size"] == 2 and result["steps_this_run"] > 0
    assert len(result["replica_digests"]) == 2
    assert result["replica_digests"][0] == result["replica_digests"][1]


def test_more_processes_than_slots_fails_before_launching(spark, built):
    cores = local_cores()
    config = with_train(built, distributed=True, num_processes=cores + 1)
    with pytest.raises(TrainingError, match=rf"num_processes={cores + 1} .* only {cores} CPU"):
        run_stage("train", config, spark)


def test_per_group_setting_must_match_the_shards(spark, built):
    with pytest.raises(TrainingError, match="per-group shards"):
        run_stage("train", with_train(built, model="mrnet_per_group"), spark)


# -- one model per product group, then the group autoencoder ---------------------------------


@pytest.fixture(scope="module")
def grouped(spark, built, tmp_path_factory) -> Config:
    """The same catalog and vectors, sharded per product group; the three groups under 110
    products (of 100-128) get no MRNet of their own."""
    workdir = tmp_path_factory.mktemp("train-groups")
    config = built.model_copy(update={"workdir": workdir})
    for stage in ("clean", "corpus"):
        shutil.copytree(built.outputs.stage(stage), config.outputs.stage(stage))
    settings = ShardConfig.model_validate(
        {**built.shard.model_dump(), "per_group": True, "min_group_rows": 110}
    )
    config = config.model_copy(update={"shard": settings})
    shard.run(spark, config)
    return with_train(
        config,
        model="mrnet_per_group",
        epochs=2,
        group_autoencoder={"epochs": 15, "batch_size": 64, "lr": 0.01},
    )


@pytest.mark.slow
def test_per_group_models_and_group_autoencoder(spark, grouped):
    result = run_stage("train", grouped, spark)
    groups = json.loads((grouped.outputs.shards / MANIFEST).read_text())["groups"]
    assert len(groups) >= 3 and result.rows["groups"] == len(groups)
    for group in groups:
        assert (grouped.outputs.training / f"group={group}" / BEST).is_file()
    state = torch.load(grouped.outputs.training / "autoencoder.pt", weights_only=True)
    history = state["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert history[-1]["val_reconstruction"] < history[0]["val_reconstruction"]

    name = f"prodvec-mrnet-pg-{grouped.catalog.name}"
    model = mlflow.pytorch.load_model(f"models:/{name}@{CANDIDATE}")
    assert model.groups == sorted(groups) == state["groups"]
    # Products of groups without an MRNet: the group trained on the most products serves them.
    assert model.fallback == max(groups, key=lambda name: groups[name]["splits"]["train"])
    # A row of group g: g's MRNet embeds the title, the autoencoder maps it (2 x 16 dims).
    g = 1
    rows = pq.read_table(
        grouped.outputs.shards / f"group={model.groups[g]}" / "test",
        columns=["title_ids", "title_len", "title_subwords"],
    )
    title = {
        name: torch.from_numpy(
            np.stack(rows.column(name).to_numpy(zero_copy_only=False)[:4]).astype(np.int64)
            if name != "title_len"
            else rows.column(name).to_numpy()[:4].astype(np.int64)
        )
        for name in rows.column_names
    }
    inputs = torch.cat((torch.full((4, 1), g), title["title_ids"], title["title_subwords"]), 1)
    with torch.no_grad():
        embedding = model(inputs)
        expected = torch.nn.functional.normalize(
            model.autoencoder.encode(model.encoders[g].encode(title), torch.full((4,), g)), dim=1
        )
    assert embedding.shape == (4, 32)
    assert torch.allclose(embedding, expected, atol=1e-6)
    # The autoencoder's rows: each group's first rows in shard order, up to the cap.
    set_dir = grouped.outputs.shards / f"group={model.groups[g]}"
    every = embed_split(model.encoders[g], set_dir, "train", torch.device("cpu"), 32, 10**9)
    capped = embed_split(model.encoders[g], set_dir, "train", torch.device("cpu"), 32, 45)
    assert len(every) == groups[model.groups[g]]["splits"]["train"]
    assert capped.shape == (45, 16) and torch.allclose(capped, every[:45])

    # Config to table: every product embedded, those of groups under shard.min_group_rows
    # (no MRNet of their own) by the fallback group's MRNet.
    embedded = run_stage("embed", grouped, spark)
    names = pq.read_table(grouped.outputs.clean_catalog, columns=["product_group"]).column(0)
    small = [name for name in names.to_pylist() if name not in groups]
    assert embedded.rows["table"] == len(names) and embedded.rows["fallback"] == len(small) > 0


# -- a real catalog --------------------------------------------------------------------------


@pytest.mark.shared_data
def test_flipkart_mrnet_beats_the_majority_class_on_category_level_1(spark, shared_data, tmp_path):
    """Level 1 is the second level of the path (levels 0-2, as the brief numbers them): the
    overlay's `subcategory` task. The shards are the overlay's; the MRNet trains on four of
    its tasks."""
    config = load_config(
        ["flipkart"],
        [
            f"workdir={tmp_path}",
            f"catalog.path={shared_data / 'flipkart/flipkart_products.csv'}",
            "word2vec.dims=32",
            "word2vec.epochs=5",
            "shard.text_fields={title: 24}",
            "shard.row_group_rows=1024",
            "train.embedding_size=32",
            "train.batch_size=128",
            "train.epochs=3",
            "train.lr=0.005",
            "train.distributed=false",
            "train.tasks=[category, top_category, subcategory, price]",
        ],
    )
    clean.run(spark, config)
    corpus.run(spark, config)
    shard.run(spark, config)
    _, history = fit(config, tmp_path / "fit")

    manifest = manifest_of(config)
    level1 = next(t for t in manifest["tasks"] if t["name"] == "subcategory")
    majority = int(np.argmax(level1["counts"]))  # the most frequent train class
    labels = pq.read_table(config.outputs.shards / "validation", columns=["subcategory"])
    labels = labels.column(0).drop_null().to_numpy()
    baseline = float(np.mean(labels == majority))
    accuracy = history[-1]["val_subcategory_accuracy"]
    print(
        f"flipkart level 1: accuracy {accuracy:.3f}, macro-F1 "
        f"{history[-1]['val_subcategory_macro_f1']:.3f}, majority class {baseline:.3f}"
    )
    assert accuracy > baseline + 0.3
    assert accuracy > 2 * baseline
