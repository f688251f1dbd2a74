"""What a training run starts from: the word2vec vectors aligned to the shards' vocabulary,
the loop's settings (`LoopSpec`) and the fingerprint that decides whether a checkpoint may
be resumed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.core.config import Config
from pipelines.core.errors import TrainingError
from pipelines.core.outputs import check_corpus
from pipelines.data.shards import load_manifest
from pipelines.data.tokenizer import Vocabulary
from pipelines.training.contrastive import ContrastiveSpec
from pipelines.training.launch import Launch
from pipelines.training.loop import (
    LoopSpec,
    atomic_write,
)

__all__ = [
    "VECTORS",
    "digest",
    "fingerprint",
    "load_vectors",
    "loop_spec",
    "train_seed",
    "word_vectors",
]

log = logging.getLogger(__name__)

VECTORS = "word_vectors.npy"


def load_vectors(manifest: Mapping[str, Any], vectors: str) -> np.ndarray:
    """The word2vec rows by vocabulary id, checked against the shards' vocabulary."""
    pretrained = np.load(vectors)
    if pretrained.shape[0] != manifest["vocabulary"]["size"]:
        raise TrainingError(
            f"{vectors} has {pretrained.shape[0]} rows, the shards' vocabulary "
            f"{manifest['vocabulary']['size']} ids: rerun the train stage"
        )
    return pretrained


def word_vectors(config: Config, shard_dir: Path, out: Path) -> Path:
    """The corpus stage's word2vec vectors as rows by the shards' vocabulary ids (padding and
    OOV rows zero), saved once so that every process loads the same matrix."""
    from gensim.models import KeyedVectors

    check_corpus(config.outputs)
    source = config.outputs.word2vec
    manifest = load_manifest(shard_dir)
    vocabulary = Vocabulary.load(shard_dir / manifest["vocabulary"]["path"])
    matrix = vocabulary.embedding_matrix(KeyedVectors.load(str(source), mmap="r"))
    target = out / VECTORS
    atomic_write(target, lambda handle: np.save(handle, matrix))
    return target


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(
    config: Config, manifest: Mapping[str, Any], vectors: Path, model: Mapping[str, Any]
) -> str:
    """What a checkpoint belongs to: the settings that shape the training trajectory or pick
    its kept epoch, the shard files and the initial vectors. Epochs, patience and the process
    count are left out, so a run can be resumed with more epochs or on fewer GPUs. `model`:
    the model type's name and settings."""
    shaping = config.train.model_dump(
        mode="json",
        include={
            "batch_size",
            "lr",
            "weight_decay",
            "grad_clip",
            "embedding_size",
            "freeze_embeddings",
            "optimisation",
            "tasks",
            "max_steps_per_epoch",
            "calibration_batches",
            "mixed_precision",
            "contrastive",
            "select_by",
        },
    )
    with open(vectors, "rb") as handle:
        vectors_hash = hashlib.file_digest(handle, "sha256").hexdigest()
    return digest(
        [
            shaping,
            dict(model),
            train_seed(config),
            manifest["config_hash"],
            manifest["files"],
            vectors_hash,
        ]
    )


def train_seed(config: Config) -> int:
    return config.seed if config.train.seed is None else config.train.seed


def contrastive_spec(config: Config) -> ContrastiveSpec | None:
    """`train.contrastive` for the training processes; None when its weight is 0."""
    settings = config.train.contrastive
    if not settings.weight:
        return None
    seed = train_seed(config) if settings.seed is None else settings.seed
    return ContrastiveSpec(settings.weight, settings.temperature, settings.subword_dropout,
                           settings.word_dropout, seed)  # fmt: skip


def loop_spec(
    config: Config,
    shard_dir: Path,
    run_dir: Path,
    vectors: Path,
    launch: Launch,
    model: Mapping[str, Any],
) -> LoopSpec:
    """The loop's settings for one shard set (`model`: the model type's fingerprint part)."""
    settings = config.train
    manifest = load_manifest(shard_dir)
    if not manifest["splits"]["validation"]:
        raise TrainingError(
            f"{shard_dir} has no validation rows: training needs them for "
            "metrics and early stopping (raise shard.split.validation, or "
            "shard.min_group_rows for per-group shards)"
        )
    return LoopSpec(
        shard_dir=str(shard_dir),
        run_dir=str(run_dir),
        fingerprint=fingerprint(config, manifest, vectors, model),
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        seed=train_seed(config),
        tasks=tuple(settings.tasks),
        optimisation=settings.optimisation,
        weight_decay=settings.weight_decay,
        grad_clip=settings.grad_clip,
        select_by=settings.select_by,
        patience=settings.patience,
        min_delta=settings.min_delta,
        max_steps_per_epoch=settings.max_steps_per_epoch,
        checkpoint_every_steps=settings.checkpoint_every_steps,
        calibration_batches=settings.calibration_batches,
        device=settings.device,
        mixed_precision=settings.mixed_precision,
        threads=launch.threads,
        loader_workers=settings.loader_workers,
        top_k=tuple(config.evaluate.top_k),
        contrastive=contrastive_spec(config),
        progress=launch.mode != "cluster" and sys.stderr.isatty(),
        driver_pid=os.getpid() if launch.mode == "local" else None,
    )
