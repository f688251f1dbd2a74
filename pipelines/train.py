"""Train stage: MRNet-Product2Vec or the ProductNet master model (`train.model`) on the
shard stage's output, data-parallel from Spark.

How a run goes, on the driver:
1. Decide how processes start (`plan_launch`) and fail at once when the machine or cluster
   has fewer slots than `train.num_processes` (a barrier stage would otherwise wait for
   slots that never come).
2. Align the corpus stage's word2vec vectors with the shards' vocabulary
   (`word_vectors.npy`, the embedding layer's initial weights).
3. Launch `pipelines.training.train_process`: through TorchDistributor (local mode on one
   machine, cluster mode with one process per GPU slot) or, for debugging, in the driver
   (`train.distributed: false` or `train.num_processes: 1`). NCCL or gloo, GPU or CPU, is
   decided inside each process at run time.
4. Read what rank 0 wrote to the run folder (never TorchDistributor's return value, which
   is whichever rank finished last) and log it to the stage's MLflow run from here: the
   driver is the only process that talks to MLflow, so a training process that dies leaves
   no half-logged run, and nothing needs the tracking server's credentials but the driver.
5. Log the best epoch's model with its vocabulary, tokenizer description, label maps and a
   signature, register it and point the alias `candidate` at the new version.

`train.model: productnet` trains models.productnet.ProductNet over every `shard.text_fields`
field (and the shards' image features) through the same launcher, loop, checkpoints and
registry flow, registered as `prodvec-productnet-<catalog>`. With
`train.productnet.finetune.epochs` > 0, the Products-10K recipe follows: a class-balanced
subset of the train split (`balanced_subset`) and the accuracy loss
(`pipelines.training.AccuracyObjective`), starting from the best epoch's weights; the
registered model is the better of the two by the fine-tuning run's validation loss.

With `train.per_group` (MRNet section 3.2) every product group's shard set trains its own
MRNet the same way, then a sparse autoencoder learns one group-agnostic space from their
embeddings; the registered model maps (group, title) to that embedding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mlflow import MlflowClient
from mlflow.models import infer_signature
from pyspark.sql import SparkSession
from torch import Tensor, nn

from models.autoencoders import GroupSparseAutoencoder
from models.encoders import GroupEncoder, ProductNetEncoder, TitleEncoder, pack_fields
from models.mrnet import PAD_ID, MRNet, TaskHead
from models.productnet import ProductNet
from pipelines.config import Config, GroupAutoencoderConfig, TrainConfig
from pipelines.loader import make_loader
from pipelines.shard import MANIFEST, describe_files, load_manifest, shard_sets
from pipelines.stages import StageResult
from pipelines.tokenizer import FIRST_WORD_ID, OOV_ID, SEPARATOR, VOCABULARY_FILE, Vocabulary
from pipelines.training import (
    BEST,
    HISTORY,
    LAST,
    PROGRESS,
    RESULT,
    AccuracyObjective,
    LoopSpec,
    ModelFactory,
    MultitaskObjective,
    ObjectiveFactory,
    TrainingError,
    atomic_write,
    load_checkpoint,
    resolve_device,
    save_json,
    save_torch,
    task_heads,
    train_process,
)

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
VECTORS = "word_vectors.npy"


# ---------------------------------------------------------------------------------------
# Models: the trained network and the registered (served) forms
# ---------------------------------------------------------------------------------------


def load_vectors(manifest: Mapping[str, Any], vectors: str) -> np.ndarray:
    """The word2vec rows by vocabulary id, checked against the shards' vocabulary."""
    pretrained = np.load(vectors)
    if pretrained.shape[0] != manifest["vocabulary"]["size"]:
        raise TrainingError(f"{vectors} has {pretrained.shape[0]} rows, the shards' vocabulary "
                            f"{manifest['vocabulary']['size']} ids: rerun the train stage")
    return pretrained


def build_mrnet(manifest: Mapping[str, Any], tasks: Sequence[TaskHead], *, vectors: str,
                embedding_size: int, freeze_embeddings: bool) -> MRNet:
    """The model factory the training processes call: MRNet over the word2vec vectors."""
    pretrained = load_vectors(manifest, vectors)
    return MRNet(pretrained.shape[0], pretrained.shape[1], tasks, embedding_size=embedding_size,
                 pretrained=pretrained, freeze_embeddings=freeze_embeddings)


def build_productnet(manifest: Mapping[str, Any], tasks: Sequence[TaskHead], *, vectors: str,
                     embedding_size: int, freeze_embeddings: bool, sizes: Mapping[str, Any],
                     init_from: str | None = None) -> ProductNet:
    """The master model's factory: every text field of the shards (and their image features),
    the word2vec vectors shared by the fields; `init_from` a checkpoint to start from (the
    fine-tuning run starts from the main run's best epoch)."""
    pretrained = load_vectors(manifest, vectors)
    image = manifest.get("image_features")
    model = ProductNet(pretrained.shape[0], pretrained.shape[1], manifest["max_len"], tasks,
                       embedding_size=embedding_size, image_dim=image["dim"] if image else None,
                       pretrained=pretrained, freeze_embeddings=freeze_embeddings, **sizes)
    if init_from is not None:
        model.load_state_dict(load_checkpoint(Path(init_from))["model"])
    return model


# ---------------------------------------------------------------------------------------
# Launch planning
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """How the training processes start, decided on the driver before anything runs."""

    mode: Literal["driver", "local", "cluster"]
    processes: int
    use_gpu: bool  # TorchDistributor's use_gpu: Spark assigns the processes' GPUs
    threads: int  # torch intra-op threads per process


def local_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def is_local_master(spark: SparkSession) -> bool:
    """Spark local mode, by TorchDistributor's own rule."""
    master = spark.sparkContext.master
    return master == "local" or master.startswith("local[")


def _cluster_slots(spark: SparkSession, use_gpu: bool) -> tuple[int, str]:
    """Training processes a cluster can run at once, and how that number was found."""
    conf = spark.sparkContext.getConf()
    task_cpus = int(conf.get("spark.task.cpus", "1") or 1)
    executors = int(conf.get("spark.executor.instances", None)
                    or conf.get("spark.dynamicAllocation.maxExecutors", "0") or 0)
    task_slots = spark.sparkContext.defaultParallelism // task_cpus
    if not use_gpu:
        return task_slots, "task slots (default parallelism / spark.task.cpus)"
    task_gpus = int(float(conf.get("spark.task.resource.gpu.amount", "1") or 1))
    executor_gpus = int(float(conf.get("spark.executor.resource.gpu.amount", "0") or 0))
    if executors:
        per_executor = max(executor_gpus // task_gpus, 1) * task_gpus
        return executors * per_executor, (f"GPU slots ({executors} executors x {per_executor} "
                                          "GPUs)")
    return task_slots * task_gpus, "GPU slots (task slots x spark.task.resource.gpu.amount)"


def plan_launch(spark: SparkSession, settings: TrainConfig) -> Launch:
    """Choose driver / local / cluster launch and check the slots before launching."""
    cores, wanted = local_cores(), settings.num_processes
    if not settings.distributed or wanted == 1:
        if settings.device == "cuda" and not torch.cuda.is_available():
            raise TrainingError("train.device is 'cuda' but the driver sees no GPU")
        return Launch("driver", 1, False, settings.threads_per_process or cores)
    if is_local_master(spark):
        if settings.device == "cuda" and not torch.cuda.is_available():
            raise TrainingError("train.device is 'cuda' but this machine shows no GPU")
        cuda = settings.device != "cpu" and torch.cuda.is_available()
        slots, what = ((torch.cuda.device_count(), "GPUs on this machine") if cuda
                       else (cores, "CPU cores on this machine"))
        # TorchDistributor's use_gpu needs GPUs given to the Spark driver as resources;
        # without them each process still takes GPU LOCAL_RANK itself.
        use_gpu = cuda and "gpu" in spark.sparkContext.resources
        threads = settings.threads_per_process or max(1, cores // wanted)
    else:
        conf = spark.sparkContext.getConf()
        task_gpus = float(conf.get("spark.task.resource.gpu.amount", "0") or 0)
        use_gpu = settings.device != "cpu" and task_gpus >= 1
        if settings.device == "cuda" and not use_gpu:
            raise TrainingError("train.device is 'cuda' but spark.task.resource.gpu.amount is "
                                "not set: the cluster gives the training tasks no GPU")
        slots, what = _cluster_slots(spark, use_gpu)
        threads = settings.threads_per_process or int(conf.get("spark.task.cpus", "1") or 1)
    if wanted > slots:
        raise TrainingError(f"train.num_processes={wanted} but there are only {slots} {what}: "
                            "lower train.num_processes")
    mode: Literal["local", "cluster"] = "local" if is_local_master(spark) else "cluster"
    return Launch(mode, wanted, use_gpu, threads)


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------


def word_vectors(config: Config, shard_dir: Path, out: Path) -> Path:
    """The corpus stage's word2vec vectors as rows by the shards' vocabulary ids (padding and
    OOV rows zero), saved once so that every process loads the same matrix."""
    from gensim.models import KeyedVectors

    source = config.stage_dir("corpus") / "word2vec.kv"
    if not source.is_file():
        raise TrainingError(f"no word vectors at {source}: run `prodvec corpus` first")
    manifest = load_manifest(shard_dir)
    vocabulary = Vocabulary.load(shard_dir / manifest["vocabulary"]["path"])
    matrix = vocabulary.embedding_matrix(KeyedVectors.load(str(source), mmap="r"))
    target = out / VECTORS
    atomic_write(target, lambda handle: np.save(handle, matrix))
    return target


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(config: Config, manifest: Mapping[str, Any], vectors: Path) -> str:
    """What a checkpoint belongs to: the settings that shape the training trajectory, the
    shard files and the initial vectors. Epochs, patience and the process count are left
    out, so a run can be resumed with more epochs or on fewer GPUs."""
    shaping = config.train.model_dump(mode="json", include={
        "batch_size", "lr", "weight_decay", "grad_clip", "embedding_size", "freeze_embeddings",
        "optimisation", "tasks", "max_steps_per_epoch", "calibration_batches",
        "mixed_precision"})
    if config.train.model != "mrnet":  # MRNet fingerprints stay what they were
        shaping["model"] = config.train.model
        shaping["productnet"] = config.train.productnet.model_dump(mode="json",
                                                                   exclude={"finetune"})
    with open(vectors, "rb") as handle:
        vectors_hash = hashlib.file_digest(handle, "sha256").hexdigest()
    return _digest([shaping, train_seed(config), manifest["config_hash"], manifest["files"],
                    vectors_hash])


def train_seed(config: Config) -> int:
    return config.seed if config.train.seed is None else config.train.seed


def loop_spec(config: Config, shard_dir: Path, run_dir: Path, vectors: Path,
              launch: Launch) -> LoopSpec:
    settings = config.train
    manifest = load_manifest(shard_dir)
    if not manifest["splits"]["validation"]:
        raise TrainingError(f"{shard_dir} has no validation rows: training needs them for "
                            "metrics and early stopping (raise shard.split.validation, or "
                            "shard.min_group_rows for per-group shards)")
    return LoopSpec(
        shard_dir=str(shard_dir), run_dir=str(run_dir),
        fingerprint=fingerprint(config, manifest, vectors), epochs=settings.epochs,
        batch_size=settings.batch_size, lr=settings.lr, seed=train_seed(config),
        tasks=tuple(settings.tasks), optimisation=settings.optimisation,
        weight_decay=settings.weight_decay, grad_clip=settings.grad_clip,
        patience=settings.patience, min_delta=settings.min_delta,
        max_steps_per_epoch=settings.max_steps_per_epoch,
        checkpoint_every_steps=settings.checkpoint_every_steps,
        calibration_batches=settings.calibration_batches, device=settings.device,
        mixed_precision=settings.mixed_precision, threads=launch.threads,
        loader_workers=settings.loader_workers,
        progress=launch.mode != "cluster" and sys.stderr.isatty(),
        driver_pid=os.getpid() if launch.mode == "local" else None)


def model_factory(config: Config, vectors: Path) -> partial[nn.Module]:
    """Picklable (a partial of a module function), so it crosses to the processes."""
    common = {"vectors": str(vectors), "embedding_size": config.train.embedding_size,
              "freeze_embeddings": config.train.freeze_embeddings}
    if config.train.model == "productnet":
        sizes = config.train.productnet.model_dump(exclude={"finetune"})
        return partial(build_productnet, sizes=sizes, **common)
    return partial(build_mrnet, **common)


# ---------------------------------------------------------------------------------------
# Running and reading the training processes
# ---------------------------------------------------------------------------------------


@contextmanager
def progress_bar(run_dir: Path, enabled: bool) -> Iterator[None]:
    """Draw rank 0's `progress.json` as a bar on the driver's terminal while training runs:
    TorchDistributor pipes the processes' output, so they cannot draw one themselves."""
    if not enabled:
        yield
        return
    from tqdm import tqdm

    done = threading.Event()

    def draw() -> None:
        bar = None
        while not done.wait(0.5):
            try:
                state = json.loads((run_dir / PROGRESS).read_text())
            except (OSError, ValueError):
                continue
            bar = bar or tqdm(file=sys.stderr, unit="step", leave=False, dynamic_ncols=True)
            bar.total, bar.n = state["steps"], state["step"]
            bar.set_description(f"epoch {state['epoch']}/{state['epochs']}")
        if bar is not None:
            bar.close()

    thread = threading.Thread(target=draw, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def train_model(launch: Launch, spec: LoopSpec, factory: ModelFactory, resume: bool = True,
                objective: ObjectiveFactory = MultitaskObjective) -> dict[str, Any]:
    """Run the loop as planned and return rank 0's result (from `result.json`); without
    `resume`, an earlier run's checkpoints are removed first."""
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stale = [RESULT, PROGRESS] if resume else [RESULT, PROGRESS, LAST, BEST, HISTORY]
    for name in stale:
        (run_dir / name).unlink(missing_ok=True)
    with progress_bar(run_dir, spec.progress):
        if launch.mode == "driver":
            threads = torch.get_num_threads()
            try:
                train_process(spec, factory, objective)
            finally:
                torch.set_num_threads(threads)
        else:
            from pyspark.ml.torch.distributor import TorchDistributor

            log.info("launching %d training processes (%s mode, use_gpu=%s, %d threads each)",
                     launch.processes, launch.mode, launch.use_gpu, launch.threads)
            TorchDistributor(num_processes=launch.processes, local_mode=launch.mode == "local",
                             use_gpu=launch.use_gpu).run(train_process, spec, factory, objective)
    result_file = run_dir / RESULT
    if not result_file.is_file():
        raise TrainingError(f"training ended without writing {result_file}")
    return json.loads(result_file.read_text())


def read_history(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / HISTORY
    return json.loads(path.read_text()) if path.is_file() else []


def learning_curves(history: Sequence[Mapping[str, float]], title: str) -> Figure:
    """Total losses (train, validation) and each task's validation loss by epoch; epoch 0
    is the untrained model."""
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    total, tasks = figure.subplots(1, 2)
    tasks.set_prop_cycle(color=[colormaps["tab20"](i) for i in range(20)])
    for key in ("train_loss", "val_loss"):
        points = [(row["epoch"], row[key]) for row in history if key in row]
        if points:
            total.plot(*zip(*points, strict=True), marker="o", label=key)
    total.set(xlabel="epoch", ylabel="sum of normalised task losses", title=title)
    total.legend()
    # Per-task validation losses (1 = the label prior's loss), or a model's other parts.
    keys = {key for row in history for key in row if key.startswith("val_") and key != "val_loss"}
    parts = sorted(key for key in keys if key.endswith("_loss")) or sorted(keys)
    for key in parts:
        points = [(row["epoch"], row[key]) for row in history if key in row]
        tasks.plot(*zip(*points, strict=True), marker=".", label=key[4:].removesuffix("_loss"))
    tasks.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    tasks.set(xlabel="epoch", ylabel="validation loss (tasks: 1 = label prior)",
              title="validation loss by part", yscale="log")
    tasks.legend(fontsize="small", ncol=2)
    for axes in (total, tasks):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


def metric_key(name: str) -> str:
    """MLflow metric/param names allow letters, digits, _ - . / and spaces."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def log_history(history: Sequence[Mapping[str, float]], prefix: str, title: str) -> None:
    """Per-epoch metrics (step = epoch) and the learning-curve picture."""
    for row in history:
        mlflow.log_metrics({metric_key(f"{prefix}{key}"): value for key, value in row.items()
                            if key != "epoch" and math.isfinite(value)}, step=int(row["epoch"]))
    if history:
        mlflow.log_figure(learning_curves(history, title), f"{prefix}learning_curves.png")


def train_and_log(launch: Launch, spec: LoopSpec, factory: partial[nn.Module], resume: bool,
                  prefix: str, title: str, objective: ObjectiveFactory = MultitaskObjective
                  ) -> tuple[dict[str, Any], dict[str, float]]:
    """Train, then log the history, also when training fails (what it reached is kept).
    Returns the result and the best epoch's metrics."""
    try:
        result = train_model(launch, spec, factory, resume, objective)
    finally:
        history = read_history(Path(spec.run_dir))
        log_history(history, prefix, title)
    mlflow.log_dict(result, f"{prefix}result.json")
    mlflow.log_params({metric_key(f"{prefix}run.{key}"): result[key]
                       for key in ("device", "backend", "mixed_precision", "world_size")})
    best = next(row for row in history if row["epoch"] == result["best_epoch"])
    metrics = {f"best_{prefix}{key}": value for key, value in best.items()
               if key.startswith("val_") and math.isfinite(value)}
    metrics[f"{prefix}best_epoch"] = result["best_epoch"]
    metrics[f"{prefix}epochs_run"] = result["epochs_run"]
    speeds = [row["train_samples_per_second"] for row in history
              if "train_samples_per_second" in row]
    if speeds:
        metrics[f"{prefix}median_train_samples_per_second"] = float(np.median(speeds))
    return result, {metric_key(key): value for key, value in metrics.items()}


def load_trained(config: Config, shard_dir: Path, run_dir: Path, vectors: Path
                 ) -> MRNet | ProductNet:
    """The best epoch's model (`train.model`), on the CPU, in eval mode."""
    manifest = load_manifest(shard_dir)
    model = model_factory(config, vectors)(manifest, task_heads(manifest, config.train.tasks))
    model.load_state_dict(load_checkpoint(run_dir / BEST)["model"])
    return model.eval()


# ---------------------------------------------------------------------------------------
# Logging the model and registering it
# ---------------------------------------------------------------------------------------


def export_files(shard_dir: Path, out: Path, manifests: Mapping[str, Mapping[str, Any]]
                 ) -> list[str]:
    """What travels with the model: the vocabulary, how text becomes ids, the label maps."""
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(manifests.values()))
    vocabulary = out / VOCABULARY_FILE
    vocabulary.write_bytes((shard_dir / first["vocabulary"]["path"]).read_bytes())
    save_json(out / "tokenizer.json", {
        "format": "prodvec.tokenizer/1", "tokenize": "pipelines.tokenizer.tokenize",
        "normalise": "pipelines.text.normalize_text (the clean stage)",
        "separator": SEPARATOR, "pad_id": PAD_ID, "oov_id": OOV_ID,
        "first_word_id": FIRST_WORD_ID, "vocabulary": vocabulary.name,
        "max_len": first["max_len"]["title"],
        "fields": first["max_len"],  # ProductNet: every text field's ids (bullets: joined)
        "input": "ids of the first max_len tokens of the normalised title, 0-padded at the end",
    })
    save_json(out / "labels.json", {
        group: [{key: task[key] for key in ("name", "kind", "source", "num_outputs", "labels",
                                            "stats")} for task in manifest["tasks"]]
        for group, manifest in manifests.items()})
    return [str(out / name) for name in (VOCABULARY_FILE, "tokenizer.json", "labels.json")]


def log_and_register(module: nn.Module, example: np.ndarray, name: str, extra_files: list[str],
                     metadata: dict[str, Any]) -> tuple[str, int]:
    """Log the model with its signature, register it, alias the new version `candidate`.

    Pickled, not MLflow's default `pt2`: torch.export cannot trace the packed LSTM (its
    shapes depend on the title lengths), so loading needs prodvec importable.
    """
    module = module.cpu().eval()
    with torch.no_grad():
        output = module(torch.from_numpy(example)).numpy()
    torch_version = torch.__version__.split("+")[0]
    info = mlflow.pytorch.log_model(
        module, name="model", signature=infer_signature(example, output),
        input_example=example, extra_files=extra_files, registered_model_name=name,
        serialization_format="pickle",
        pip_requirements=[f"torch=={torch_version}", f"mlflow=={mlflow.__version__}",
                          f"numpy=={np.__version__}", "prodvec"],
        metadata=metadata)
    version = info.registered_model_version
    MlflowClient().set_registered_model_alias(name, CANDIDATE, str(version))
    log.info("registered %s version %s (alias %s)", name, version, CANDIDATE)
    return info.model_uri, int(version)


def example_ids(shard_dir: Path, rows: int = 4) -> np.ndarray:
    batch = next(iter(make_loader(shard_dir, "validation", rows, shuffle=False)))
    return batch["title_ids"].numpy()


def example_fields(shard_dir: Path, model: ProductNet, rows: int = 4) -> np.ndarray:
    """A ProductNetEncoder input (models.encoders.pack_fields) from validation rows."""
    batch = next(iter(make_loader(shard_dir, "validation", rows, shuffle=False)))
    image = (batch["image_features"].numpy(), batch["image_missing"].numpy()) \
        if model.image_dim is not None else (None, None)
    return pack_fields([batch[f"{name}_ids"].numpy() for name, _ in model.fields], *image)


# ---------------------------------------------------------------------------------------
# Products-10K: balanced-subset fine-tuning with the accuracy loss
# ---------------------------------------------------------------------------------------


def balanced_subset(shard_dir: Path, out: Path, task: str, per_class: int, seed: int,
                    row_group_rows: int) -> Path:
    """A shard set whose train split holds at most `per_class` labelled rows of each class
    of `task` (all of a smaller class), sampled by seed, in random order; its validation and
    test entries point at `shard_dir`'s own files (absolute paths), so only the subset is
    written. Reads the label column of every train file, then each file's chosen rows."""
    manifest = load_manifest(shard_dir)
    entries = manifest["files"]["train"]
    labels = [pq.read_table(shard_dir / entry["path"], columns=[task]).column(task)
              for entry in entries]
    file_of = np.concatenate([np.full(len(column), i) for i, column in enumerate(labels)])
    row_of = np.concatenate([np.arange(len(column)) for column in labels])
    label = np.concatenate([pc.fill_null(column, -1).to_numpy() for column in labels])
    order = np.random.default_rng(seed).permutation(len(label))
    order = order[label[order] >= 0]  # unlabelled rows cannot balance anything
    by_class = order[np.argsort(label[order], kind="stable")]  # random within each class
    starts = np.searchsorted(label[by_class], label[by_class], side="left")
    chosen = by_class[np.arange(len(by_class)) - starts < per_class]
    if not len(chosen):
        raise TrainingError(f"{shard_dir}: no train row has a {task!r} label to fine-tune on")
    pieces = []
    for index, entry in enumerate(entries):
        rows = np.sort(row_of[chosen[file_of[chosen] == index]])
        if len(rows):
            pieces.append(pq.read_table(shard_dir / entry["path"]).take(rows))
    table = pa.concat_tables(pieces)  # in file order: shuffled below, so no batch is one class
    table = table.take(np.random.default_rng(seed + 1).permutation(table.num_rows))
    if out.exists():
        shutil.rmtree(out)
    (out / "train").mkdir(parents=True)
    pq.write_table(table, out / "train" / "part-00000.parquet", row_group_size=row_group_rows)
    root = shard_dir.resolve()
    subset = {**manifest, "splits": {**manifest["splits"], "train": table.num_rows}}
    subset["files"] = {split: describe_files(out / "train") if split == "train" else
                       [{**entry, "path": str(root / entry["path"])} for entry in files]
                       for split, files in manifest["files"].items()}
    subset["vocabulary"] = {**manifest["vocabulary"],
                            "path": str(root / manifest["vocabulary"]["path"])}
    subset["balanced_subset"] = {"source": str(root), "task": task, "per_class": per_class,
                                 "classes": len(np.unique(label[chosen]))}
    save_json(out / MANIFEST, subset)
    return out


def finetune_task(config: Config, tasks: Sequence[TaskHead]) -> str:
    """The multiclass task the fine-tuning subset is balanced on."""
    wanted = config.train.productnet.finetune.task
    multiclass = [task.name for task in tasks if task.kind == "multiclass"]
    if wanted is None and multiclass:
        return multiclass[0]
    if wanted not in multiclass:
        raise TrainingError(f"train.productnet.finetune.task {wanted!r} must name a multiclass "
                            f"task being trained (multiclass tasks: {multiclass})")
    return wanted


def finetune(config: Config, launch: Launch, main: LoopSpec, vectors: Path, out: Path
             ) -> tuple[Path, dict[str, float]]:
    """Products-10K's last epochs: the balanced subset, the accuracy loss, the main run's
    best weights to start from; the loop (and its checkpoints, resume and early stopping)
    is the same. Returns the fine-tuning run folder and its best epoch's metrics."""
    settings = config.train.productnet.finetune
    shard_dir = Path(main.shard_dir)
    manifest = load_manifest(shard_dir)
    task = finetune_task(config, task_heads(manifest, config.train.tasks))
    subset = balanced_subset(shard_dir, out / "finetune_shards", task, settings.per_class,
                             main.seed, config.shard.row_group_rows)
    log.info("fine-tuning on %d balanced rows of %r (at most %d a class)",
             load_manifest(subset)["splits"]["train"], task, settings.per_class)
    start = Path(main.run_dir) / BEST
    with open(start, "rb") as handle:  # a new main run means new starting weights
        start_hash = hashlib.file_digest(handle, "sha256").hexdigest()
    spec = replace(main, shard_dir=str(subset), run_dir=str(out / "finetune"),
                   epochs=settings.epochs, lr=settings.lr, fingerprint=_digest(
                       [main.fingerprint, start_hash, settings.model_dump(mode="json")]))
    factory = partial(model_factory(config, vectors), init_from=str(start))
    _, metrics = train_and_log(launch, spec, factory, config.train.resume, prefix="finetune.",
                               title="ProductNet, balanced-subset fine-tuning",
                               objective=AccuracyObjective)
    return Path(spec.run_dir), metrics


# ---------------------------------------------------------------------------------------
# Product groups: one MRNet each, then the group sparse autoencoder
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def embed_split(model: MRNet, shard_dir: Path, split: str, device: torch.device,
                batch_size: int, limit: int) -> Tensor:
    """Embeddings [rows, d] of the first `limit` rows of one split (shard order is random,
    so they are a random sample), on the CPU."""
    model = model.to(device).eval()
    parts, rows = [], 0
    for batch in make_loader(shard_dir, split, batch_size, shuffle=False):
        if rows >= limit:
            break
        ids, lengths = batch["title_ids"][:limit - rows], batch["title_len"][:limit - rows]
        parts.append(model.encode(ids.to(device), lengths).float().cpu())
        rows += len(ids)
    model.cpu()
    return torch.cat(parts)


def train_group_autoencoder(train: tuple[Tensor, Tensor], validation: tuple[Tensor, Tensor],
                            groups: int, settings: GroupAutoencoderConfig, seed: int,
                            device: torch.device
                            ) -> tuple[GroupSparseAutoencoder, list[dict[str, float]]]:
    """Fit the sparse autoencoder on (embedding, group index) rows in one process: it is a
    two-layer network over precomputed embeddings, small next to the group MRNets."""
    torch.manual_seed(seed)
    dim = train[0].shape[1]
    model = GroupSparseAutoencoder(groups, dim, rho=settings.rho, beta=settings.beta).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    order = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        sums = {"val_loss": 0.0, "val_reconstruction": 0.0, "val_sparsity": 0.0}
        rows = len(validation[0])
        for start in range(0, rows, settings.batch_size):
            x = validation[0][start:start + settings.batch_size].to(device)
            g = validation[1][start:start + settings.batch_size].to(device)
            total, parts = model.loss(x, g)
            share = len(x) / rows
            sums["val_loss"] += total.item() * share
            sums["val_reconstruction"] += parts["reconstruction"].item() * share
            sums["val_sparsity"] += parts["sparsity"].item() * share
        return sums

    history = [{"epoch": 0, **evaluate()}]
    for epoch in range(1, settings.epochs + 1):
        permutation = torch.randperm(len(train[0]), generator=order)
        losses = []
        for start in range(0, len(permutation), settings.batch_size):
            rows = permutation[start:start + settings.batch_size]
            total, _ = model.loss(train[0][rows].to(device), train[1][rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            losses.append(total.item())
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), **evaluate()})
    return model.cpu().eval(), history


def run_per_group(config: Config, launch: Launch, sets: Mapping[str, Path], vectors: Path,
                  out: Path) -> StageResult:
    """One MRNet per product group, the group autoencoder over their embeddings, and the
    composite (group, title) -> group-agnostic embedding model, registered."""
    settings = config.train
    names = sorted(sets)
    metrics: dict[str, float] = {}
    models: list[MRNet] = []
    for group in names:
        run_dir = out / f"group={group}"
        spec = loop_spec(config, sets[group], run_dir, vectors, launch)
        log.info("training the MRNet of product group %r", group)
        _, best = train_and_log(launch, spec, model_factory(config, vectors), settings.resume,
                                prefix=f"{group}.", title=f"MRNet, group {group}")
        metrics.update(best)
        models.append(load_trained(config, sets[group], run_dir, vectors))
    device = resolve_device(settings.device, 0)

    def rows(split: str) -> tuple[Tensor, Tensor]:
        embeddings = [embed_split(model, sets[group], split, device, settings.batch_size,
                                  settings.group_autoencoder.max_rows_per_group)
                      for group, model in zip(names, models, strict=True)]
        index = [torch.full((len(e),), i, dtype=torch.int64) for i, e in enumerate(embeddings)]
        return torch.cat(embeddings), torch.cat(index)

    autoencoder, history = train_group_autoencoder(
        rows("train"), rows("validation"), len(names), settings.group_autoencoder,
        train_seed(config), device)
    save_torch(out / "autoencoder.pt", {"model": autoencoder.state_dict(), "groups": names,
                                        "history": history})
    log_history(history, "autoencoder.", "group sparse autoencoder")
    metrics.update({f"autoencoder.final_{key}": value for key, value in history[-1].items()
                    if key != "epoch"})
    manifests = {group: load_manifest(sets[group]) for group in names}
    extra = export_files(sets[names[0]], out / "export", manifests)
    ids = example_ids(sets[names[0]])
    example = np.concatenate([np.zeros((len(ids), 1), dtype=np.int64), ids], axis=1)
    name = settings.registered_model_name or f"prodvec-mrnet-pg-{config.catalog.name}"
    model_uri, version = log_and_register(
        GroupEncoder(names, models, autoencoder), example, name, extra,
        {"catalog": config.catalog.name, "groups": names, "config_hash": config.digest(),
         "input": "int64 [B, 1 + L]: group index (metadata groups), then title ids",
         "output": f"group-agnostic embedding [B, {2 * settings.embedding_size}]"})
    train_rows = sum(manifest["splits"]["train"] for manifest in manifests.values())
    validation_rows = sum(manifest["splits"]["validation"] for manifest in manifests.values())
    return StageResult(
        rows={"train": train_rows, "validation": validation_rows, "groups": len(names)},
        outputs={"run_dir": str(out), "autoencoder": str(out / "autoencoder.pt"),
                 "model_uri": model_uri, "registered_model": f"models:/{name}/{version}"},
        metrics=metrics)


# ---------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------


def run(spark: SparkSession, config: Config) -> StageResult:
    """Train (per group or not), log to the stage's MLflow run, register the model."""
    settings = config.train
    shard_root = config.stage_dir("shard")
    if not (shard_root / MANIFEST).is_file():
        raise TrainingError(f"no shards at {shard_root}: run `prodvec shard` first")
    sets = shard_sets(shard_root)
    grouped = None not in sets
    if settings.per_group and not grouped:
        raise TrainingError(f"train.per_group needs per-group shards, and {shard_root} holds "
                            "one shard set: set shard.per_group: true and rerun `prodvec shard`")
    if grouped and not settings.per_group:
        raise TrainingError(f"the shards at {shard_root} are per product group: set "
                            "train.per_group: true (one MRNet per group)")
    vocabularies = {load_manifest(path)["vocabulary"]["sha256"] for path in sets.values()}
    if len(vocabularies) > 1:
        raise TrainingError(f"the shard sets under {shard_root} were built with different "
                            "vocabularies: rerun `prodvec shard`")
    launch = plan_launch(spark, settings)
    out = config.stage_dir("train")
    out.mkdir(parents=True, exist_ok=True)
    vectors = word_vectors(config, next(iter(sets.values())), out)
    mlflow.log_params({"launch.mode": launch.mode, "launch.processes": launch.processes,
                       "launch.use_gpu": launch.use_gpu, "launch.threads": launch.threads})
    if grouped:
        return run_per_group(config, launch, {str(g): path for g, path in sets.items()},
                             vectors, out)

    shard_dir, run_dir = sets[None], out / "model"
    spec = loop_spec(config, shard_dir, run_dir, vectors, launch)
    productnet = settings.model == "productnet"
    result, metrics = train_and_log(launch, spec, model_factory(config, vectors),
                                    settings.resume, prefix="",
                                    title="ProductNet" if productnet else "MRNet")
    if productnet and settings.productnet.finetune.epochs:
        run_dir, tuned = finetune(config, launch, spec, vectors, out)
        metrics.update(tuned)
    model = load_trained(config, shard_dir, run_dir, vectors)
    mlflow.log_params({"model.parameters": sum(p.numel() for p in model.parameters()),
                       "model.vocab_size": model.words.num_embeddings,
                       "model.word_dim": model.words.embedding_dim,
                       "model.tasks": ",".join(task.name for task in model.tasks)})
    manifest = load_manifest(shard_dir)
    extra = export_files(shard_dir, out / "export", {"all": manifest})
    name = settings.registered_model_name or f"prodvec-{settings.model}-{config.catalog.name}"
    if isinstance(model, ProductNet):
        served, example = ProductNetEncoder(model), example_fields(shard_dir, model)
        described = (f"int64 [B, {served.width}]: ids of fields {list(model.fields)} side by "
                     "side, then image missing flag + float32 feature bits "
                     "(models.encoders.pack_fields)")
    else:
        served, example = TitleEncoder(model), example_ids(shard_dir)
        described = "int64 title ids [B, L] (tokenizer.json)"
    model_uri, version = log_and_register(
        served, example, name, extra,
        {"catalog": config.catalog.name, "config_hash": config.digest(),
         "best_epoch": result["best_epoch"], "embedding_size": settings.embedding_size,
         "model": settings.model, "input": described,
         "output": f"product embedding [B, {settings.embedding_size}]"})
    return StageResult(
        rows={"train": manifest["splits"]["train"],
              "validation": manifest["splits"]["validation"]},
        outputs={"run_dir": str(run_dir), "checkpoint": str(run_dir / BEST),
                 "model_uri": model_uri, "registered_model": f"models:/{name}/{version}"},
        metrics=metrics)
