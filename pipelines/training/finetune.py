"""Products-10K's fine-tuning recipe after normal training: a class-balanced subset of the train
split and the accuracy loss, starting from the best epoch's weights, through the same loop."""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.mrnet import TaskHead
from pipelines.core.config import Config
from pipelines.core.errors import TrainingError
from pipelines.data.shards import MANIFEST, describe_files, load_manifest
from pipelines.tasks import kind_of, task_heads
from pipelines.training.inputs import digest
from pipelines.training.launch import Launch
from pipelines.training.loop import (
    BEST,
    LoopSpec,
    ModelFactory,
    save_json,
)
from pipelines.training.objectives import AccuracyObjective
from pipelines.training.reporting import train_and_log

__all__ = ["balanced_subset", "finetune", "finetune_task"]

log = logging.getLogger(__name__)


def balanced_subset(
    shard_dir: Path, out: Path, task: str, per_class: int, seed: int, row_group_rows: int
) -> Path:
    """A shard set whose train split holds at most `per_class` labelled rows of each class
    of `task` (all of a smaller class), sampled by seed, in random order; its validation and
    test entries point at `shard_dir`'s own files (absolute paths), so only the subset is
    written. Reads the label column of every train file, then each file's chosen rows."""
    manifest = load_manifest(shard_dir)
    entries = manifest["files"]["train"]
    labels = [
        pq.read_table(shard_dir / entry["path"], columns=[task]).column(task) for entry in entries
    ]
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
    subset["files"] = {
        split: describe_files(out / "train")
        if split == "train"
        else [{**entry, "path": str(root / entry["path"])} for entry in files]
        for split, files in manifest["files"].items()
    }
    subset["vocabulary"] = {
        **manifest["vocabulary"],
        "path": str(root / manifest["vocabulary"]["path"]),
    }
    if manifest.get("subwords"):
        subset["subwords"] = {
            **manifest["subwords"],
            "terms": str(root / manifest["subwords"]["terms"]),
        }
    subset["balanced_subset"] = {
        "source": str(root),
        "task": task,
        "per_class": per_class,
        "classes": len(np.unique(label[chosen])),
    }
    save_json(out / MANIFEST, subset)
    return out


def finetune_task(config: Config, tasks: Sequence[TaskHead]) -> str:
    """The task with exclusive classes (multiclass) the fine-tuning subset is balanced on."""
    wanted = config.train.finetune.task
    classed = [task.name for task in tasks if kind_of(task.kind).exclusive_classes]
    if wanted is None and classed:
        return classed[0]
    if wanted not in classed:
        raise TrainingError(
            f"train.finetune.task {wanted!r} must name a trained task with "
            f"exclusive classes (those tasks: {classed})"
        )
    return wanted


def finetune(
    config: Config, launch: Launch, main: LoopSpec, factory: ModelFactory, out: Path
) -> tuple[Path, dict[str, float]]:
    """Products-10K's last epochs: the balanced subset, the accuracy loss, the main run's
    best weights to start from; the loop (and its checkpoints, resume and early stopping)
    is the same; `factory` builds the model (it takes `init_from`). Returns the fine-tuning
    run folder and its best epoch's metrics."""
    settings = config.train.finetune
    shard_dir = Path(main.shard_dir)
    manifest = load_manifest(shard_dir)
    task = finetune_task(config, task_heads(manifest, config.train.tasks))
    subset = balanced_subset(
        shard_dir,
        out / "finetune_shards",
        task,
        settings.per_class,
        main.seed,
        config.shard.row_group_rows,
    )
    log.info(
        "fine-tuning on %d balanced rows of %r (at most %d a class)",
        load_manifest(subset)["splits"]["train"],
        task,
        settings.per_class,
    )
    start = Path(main.run_dir) / BEST
    with open(start, "rb") as handle:  # a new main run means new starting weights
        start_hash = hashlib.file_digest(handle, "sha256").hexdigest()
    spec = replace(
        main,
        shard_dir=str(subset),
        run_dir=str(out / "finetune"),
        epochs=settings.epochs,
        lr=settings.lr,
        fingerprint=digest([main.fingerprint, start_hash, settings.model_dump(mode="json")]),
    )
    _, metrics = train_and_log(
        launch,
        spec,
        partial(factory, init_from=str(start)),
        config.train.resume,
        prefix="finetune.",
        title="balanced-subset fine-tuning",
        objective=AccuracyObjective,
    )
    return Path(spec.run_dir), metrics
