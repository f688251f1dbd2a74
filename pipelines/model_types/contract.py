"""The model-type contract: everything the train, embed and evaluate stages need to know about
one kind of model (`train.model`), so none of them branches on the model.

A model type says:
- training: how its network is built for the training loop (`build`, a picklable function
  of the manifest and the task heads), what it adds to a checkpoint's fingerprint, and the
  whole train-stage flow (`train`; the default trains one network on one shard set, then
  fine-tunes it with Products-10K's recipe when `train.finetune.epochs` > 0);
- publishing: its served form (`serve`: one int64 tensor in, the embedding out) and its name
  in the MLflow registry (`registered_name`);
- embedding: how a loaded served module describes its input (`input_layout`) and how a batch
  of clean-catalog rows becomes that input (`inputs`, reading `input_columns`);
- evaluating: the module whose heads the evaluate stage reports on (`heads`).

Adding a model type = one module in `pipelines/model_types/kinds/` named after it, which
defines a `ModelType` subclass and registers an instance.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import mlflow
import numpy as np
import pyarrow as pa
from pyspark.sql import Column
from torch import nn

from models.mrnet import TaskHead
from pipelines.core.config import Config
from pipelines.core.errors import TrainingError
from pipelines.core.outputs import StageResult
from pipelines.data.shards import load_manifest
from pipelines.data.tokenizer import Vocabulary
from pipelines.tasks import task_heads
from pipelines.training.finetune import finetune
from pipelines.training.inputs import loop_spec
from pipelines.training.launch import Launch
from pipelines.training.loader import Batch, make_loader
from pipelines.training.loop import BEST, ModelFactory, load_checkpoint
from pipelines.training.publish import export_files, log_and_register
from pipelines.training.reporting import train_and_log

__all__ = [
    "InputLayout",
    "ModelType",
    "Served",
    "TrainingRun",
    "validation_batch",
]

log = logging.getLogger(__name__)


def validation_batch(shard_dir: Path, rows: int = 4) -> Batch:
    """The first validation rows of a shard set, for a served model's example input."""
    return next(iter(make_loader(shard_dir, "validation", rows, shuffle=False)))


@dataclass(frozen=True)
class TrainingRun:
    """What the train stage hands a model type: the resolved config, how processes start,
    the shard sets (group -> folder; the key None when shards are not per group), the
    word2vec vectors aligned to their vocabulary, and the stage's output folder."""

    config: Config
    launch: Launch
    shard_sets: Mapping[str | None, Path]
    vectors: Path
    out: Path


@dataclass(frozen=True)
class Served:
    """A model's registered form: the module, an example input, and what the input is."""

    module: nn.Module
    example: np.ndarray
    input: str


@dataclass(frozen=True)
class InputLayout:
    """What a served module takes, learnt once on the driver, small enough to ship to every
    Spark task: the title's (or each field's) id count, and the type's own details."""

    max_len: int
    groups: tuple[str, ...] = ()  # per-group models: the name of each group index
    fields: tuple[tuple[str, int], ...] = ()  # multi-field models: (clean column, ids)
    image_dim: int | None = None  # models with an image branch
    extra: Mapping[str, Any] = field(default_factory=dict)


class ModelType:
    """One `train.model` value. Subclasses set the class attributes and `build`/`serve`."""

    name: ClassVar[str]
    registry_prefix: ClassVar[str]  # registered as prodvec-<prefix>-<catalog>
    encoder: ClassVar[type[nn.Module]]  # the served module's class
    per_group: ClassVar[bool] = False  # trains on per-group shard sets (shard.per_group)
    unembeddable: ClassVar[str] = "not_embeddable"  # reason for rows `embeddable` excludes

    # ---- training ------------------------------------------------------------------------

    def settings(self, config: Config) -> dict[str, Any]:
        """The type's settings that shape training (part of the checkpoint fingerprint)."""
        return {}

    def fingerprint_part(self, config: Config) -> dict[str, Any]:
        return {"model": self.name, **self.settings(config)}

    def factory(self, config: Config, vectors: Path) -> ModelFactory:
        """A picklable (shard set folder, heads, init_from=None) -> network, for the training
        processes; `init_from` a checkpoint whose weights the network starts from."""
        raise NotImplementedError

    def load_trained(
        self, config: Config, shard_dir: Path, run_dir: Path, vectors: Path
    ) -> nn.Module:
        """The best epoch's network of a run, on the CPU, in eval mode."""
        heads = task_heads(load_manifest(shard_dir), config.train.tasks)
        model = self.factory(config, vectors)(shard_dir, heads)
        model.load_state_dict(load_checkpoint(run_dir / BEST)["model"])
        return model.eval()

    def train(self, run: TrainingRun) -> StageResult:
        """The train stage for this type. Default: one network on the one shard set, the
        optional fine-tuning, then the served form logged and registered."""
        config, settings = run.config, run.config.train
        if None not in run.shard_sets:
            raise TrainingError(
                f"the shards at {run.config.outputs.shards} are per product "
                f"group; train.model '{self.name}' trains on one shard set"
            )
        shard_dir, run_dir = run.shard_sets[None], run.out / "model"
        spec = loop_spec(
            config, shard_dir, run_dir, run.vectors, run.launch, self.fingerprint_part(config)
        )
        factory = self.factory(config, run.vectors)
        result, metrics = train_and_log(
            run.launch, spec, factory, settings.resume, prefix="", title=self.name
        )
        if settings.finetune.epochs:
            run_dir, tuned = finetune(config, run.launch, spec, factory, run.out)
            metrics.update(tuned)
        model = self.load_trained(config, shard_dir, run_dir, run.vectors)
        heads: Sequence[TaskHead] = getattr(model, "tasks", ())
        mlflow.log_params(
            {
                "model.parameters": sum(p.numel() for p in model.parameters()),
                "model.tasks": ",".join(task.name for task in heads),
            }
        )
        manifest = load_manifest(shard_dir)
        extra = export_files(shard_dir, run.out / "export", {"all": manifest})
        served = self.serve(model, shard_dir)
        name = self.registered_name(config)
        model_uri, version = log_and_register(
            served.module,
            served.example,
            name,
            extra,
            {
                "catalog": config.catalog.name,
                "config_hash": config.digest(),
                "best_epoch": result["best_epoch"],
                "embedding_size": settings.embedding_size,
                "model": self.name,
                "input": served.input,
                "output": f"product embedding [B, {settings.embedding_size}]",
            },
        )
        return StageResult(
            rows={
                "train": manifest["splits"]["train"],
                "validation": manifest["splits"]["validation"],
            },
            outputs={
                "run_dir": str(run_dir),
                "checkpoint": str(run_dir / BEST),
                "model_uri": model_uri,
                "registered_model": f"models:/{name}/{version}",
            },
            metrics=metrics,
        )

    # ---- publishing ----------------------------------------------------------------------

    def serve(self, model: nn.Module, shard_dir: Path) -> Served:
        """The registered form of a trained network, with an example input from the shards."""
        raise NotImplementedError

    def registered_name(self, config: Config) -> str:
        return (
            config.train.registered_model_name
            or f"prodvec-{self.registry_prefix}-{config.catalog.name}"
        )

    # ---- embedding -----------------------------------------------------------------------

    def input_layout(self, module: nn.Module, tokenizer: Mapping[str, Any]) -> InputLayout:
        """What the loaded served module takes (`tokenizer`: its tokenizer.json)."""
        return InputLayout(max_len=int(tokenizer["max_len"]))

    def input_columns(self, layout: InputLayout) -> list[str]:
        """The clean-catalog columns `inputs` reads."""
        return ["title"]

    def inputs(
        self, layout: InputLayout, batch: pa.RecordBatch, vocabulary: Vocabulary
    ) -> np.ndarray:
        """The int64 array the served module's forward takes, for one Arrow batch."""
        raise NotImplementedError

    def example_input(self, layout: InputLayout) -> np.ndarray:
        """One input row with a single real title token (the driver measures the output
        width with it)."""
        example = np.zeros((1, layout.max_len), dtype=np.int64)
        example[0, 0] = 2
        return example

    def embeddable(self, layout: InputLayout) -> Column | None:
        """A condition on clean-catalog columns for the rows this model can embed (None:
        every row); the embed stage counts the others under `unembeddable`."""
        return None

    def served_by_fallback(self, layout: InputLayout) -> Column | None:
        """A condition for the rows this model embeds with a stand-in (per-group models: a
        product of a group without its own MRNet); the embed stage counts them as
        `fallback`. None: no row is."""
        return None

    # ---- evaluating ----------------------------------------------------------------------

    def heads(self, module: nn.Module) -> nn.Module | None:
        """The network whose `forward(batch, tasks)` gives the task heads' outputs (and
        whose `tasks` lists them), or None when the served form has no single head set."""
        return None
