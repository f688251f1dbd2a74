"""What a training task is: its configuration (`TaskSpec`), the contract its kind fulfils
(`TaskKind`: everything one kind of label owns, from its options to its validation metrics),
and the registry of kinds.

A task (one `shard.tasks` entry, a `TaskSpec`) names a kind. Its `TaskKind` object is the one
place that knows, for that kind:
- configuration: the `TaskSpec` options only it reads and its own rules (`check`);
- the shard stage (Spark): the raw label per product (`raw`), what it learns from the train
  split (`train_aggregates`, `counted_values`, `finish_fit`, filling a `FittedTask`) and the
  shard columns it writes (`shard_columns`);
- the loader: how those columns become batch arrays (`batch_fields`);
- the model: the head's size (`head`), the per-row loss, the label prior's loss that
  normalises it (MRNet section 3.1), and the validation metrics.

The shard stage fits every task of a run in two Spark passes over the train split, whatever
their kinds: one aggregation per product group (`train_aggregates`), and one count of
(task, value) items per group (`counted_values`, of which `keep_counted` selects the values
the kind keeps). Kinds contribute columns to those passes instead of running their own.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pyspark.sql import Column, Row
from pyspark.sql import functions as F
from torch import Tensor

from models.mrnet import TaskHead
from pipelines.data.shards import BatchField

__all__ = [
    "COUNT",
    "RANK",
    "FittedTask",
    "TaskKind",
    "TaskSpec",
    "add_confusion",
    "best_constant_bce",
    "clip_weight",
    "confusion_metrics",
    "f1_scores",
    "kind_names",
    "kind_of",
    "label_index",
    "register",
    "source_value",
]

COUNT = "count"  # the count column of the counted-values pass
RANK = "_rank"  # a value's rank within its (group, task) by count, then value


# A clean-catalog column, one attribute, one category level (0-based) or the whole path.
_TASK_SOURCE = r"^([a-z_]+|attributes\.[A-Za-z0-9_]+|category_path(\[[0-9]+\])?)$"


class TaskSpec(BaseModel):
    """One training task of the multi-task models, derived from the clean catalog by the
    shard stage. Its kind (`pipelines.tasks`) owns the options it takes and their rules; the
    shipped kinds cover MRNet's tasks and Visual Meta's hierarchical labels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    kind: str
    source: str = Field(pattern=_TASK_SOURCE)
    top_n: int | None = Field(None, ge=1)  # multiclass: top-N train values, the rest "other"
    positive: list[str] | None = None  # binary: values meaning 1 (case-insensitive)
    threshold: float | None = None  # binary on a number: value >= threshold means 1
    log: bool = False  # regression: log1p before standardising
    max_depth: int | None = Field(None, ge=1)  # multilabel: path levels used (None: all)
    min_count: int = Field(1, ge=1)  # multilabel: train products a node needs to be a label
    max_pos_weight: float = Field(100.0, gt=0)  # binary, multilabel: clip of negatives/positives
    vocab_size: int = Field(5000, ge=1)  # decoding: top terms by train document frequency

    @model_validator(mode="after")
    def _kind_rules(self) -> TaskSpec:
        kind = kind_of(self.kind)
        # Compared with the defaults, not with the keys given, so a dumped config reloads.
        options = {key for name in kind_names() for key in kind_of(name).options}
        foreign = {
            key
            for key in options - set(kind.options)
            if getattr(self, key) != TaskSpec.model_fields[key].default
        }
        if foreign:
            raise ValueError(f"task '{self.name}' ({self.kind}) does not take {sorted(foreign)}")
        kind.check(self)
        return self


@dataclass
class FittedTask:
    """What one task learned from one product group's train split: its manifest entry."""

    spec: TaskSpec
    labels: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # train products per label
    stats: dict[str, float | bool] | None = None  # regression: mean, std, log
    pos_weight: list[float] | None = None  # binary (one value), multilabel (one per node)
    idf: list[float] | None = None  # decoding, one per term
    train_labelled: int = 0


def source_value(spec: TaskSpec) -> Column:
    """The task's source per product: a clean-catalog column, one attribute, or one category
    level (`category_path[<level>]`, 0-based)."""
    if spec.source.startswith("attributes."):
        return F.try_element_at(F.col("attributes"), F.lit(spec.source.split(".", 1)[1]))
    if spec.source.startswith("category_path["):
        level = int(spec.source[len("category_path[") : -1])
        return F.try_element_at(F.col("category_path"), F.lit(level + 1))
    return F.col(spec.source)


def label_index(labels: list[str]) -> Column:
    """A literal map label -> index: two array literals (one Py4J call each, however many
    labels), which Spark folds into one map constant."""
    if not labels:
        return F.create_map().cast("map<string,int>")
    keys = F.lit(np.array(labels, dtype=np.str_))
    return F.map_from_arrays(keys, F.lit(np.arange(len(labels), dtype=np.int32)))


def clip_weight(negatives: float, positives: float, limit: float) -> float:
    """negatives / positives (BCE pos_weight), clipped to [1 / limit, limit]."""
    ratio = negatives / positives if positives else limit
    return float(min(max(ratio, 1.0 / limit), limit))


def best_constant_bce(p: Tensor, w: Tensor) -> Tensor:
    """Per unit, min over q of -(w p log q + (1 - p) log(1 - q)): reached at q = wp/(wp + 1 - p)."""
    q = w * p / (w * p + 1 - p)
    return -(w * torch.xlogy(p, q) + torch.xlogy(1 - p, 1 - q))


def f1_scores(tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
    """Per-class F1 of the classes that occur in the labels or the predictions; a class in
    neither has no defined F1 and is left out, as scikit-learn does for absent labels."""
    present = (tp + fp + fn) > 0
    return (2 * tp / (2 * tp + fp + fn).clamp_min(1))[present]


class TaskKind:
    """One kind of task. Subclass it in `pipelines/tasks/kinds/<name>.py` and `register` an
    instance there; the registry finds the module by itself."""

    name: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()  # TaskSpec fields only this kind reads
    stratifies: ClassVar[bool] = False  # may be shard.split.stratify_by
    probes: ClassVar[bool] = False  # may be an evaluate probe (one class per product)
    exclusive_classes: ClassVar[bool] = False  # softmax over classes (the accuracy loss applies)
    scalar: ClassVar[bool] = False  # one output per product, [B] rather than [B, 1]
    min_outputs: ClassVar[int] = 1

    # ---- configuration -------------------------------------------------------------------

    def check(self, spec: TaskSpec) -> None:
        """Kind-specific rules beyond which options it takes; raise ValueError."""
        if spec.source == "category_path":
            raise ValueError(
                f"task '{spec.name}': source 'category_path' (the whole path) is "
                "for multilabel tasks"
            )

    # ---- the shard stage (Spark) ---------------------------------------------------------

    def raw(self, spec: TaskSpec) -> Column:
        """The raw label per product; null (or an empty array) when it has none. Default: the
        source as a trimmed, non-empty string."""
        text = F.trim(source_value(spec).cast("string"))
        return F.when(text != "", text)

    def stratum(self, spec: TaskSpec, raw: Column) -> Column:
        """The split stratum of a product (stratifying kinds only)."""
        raise NotImplementedError(f"{self.name} tasks do not stratify a split")

    def probe_label(self, spec: TaskSpec, raw: Column) -> Column:
        """The label a probe classifies, as a string (probe kinds only)."""
        raise NotImplementedError(f"{self.name} tasks cannot be probes")

    def probe_values(self, spec: TaskSpec, labels: np.ndarray) -> np.ndarray:
        """Probe labels as the trained task would see them (e.g. rare classes merged)."""
        return labels

    def train_aggregates(self, spec: TaskSpec, raw: Column) -> list[Column]:
        """Aggregates over one group's train rows, aliased `<task>__<what>`; the default
        counts labelled products."""
        return [F.count(raw).alias(f"{spec.name}__n")]

    def read_aggregates(self, fitted: FittedTask, row: Row) -> None:
        fitted.train_labelled = row[f"{fitted.spec.name}__n"]

    def counted_values(self, spec: TaskSpec, raw: Column) -> Column | None:
        """array<struct<task, value>> of the values whose train counts this kind keeps (the
        value null for none), or None when it counts nothing."""
        return None

    def keep_counted(self, spec: TaskSpec) -> Column:
        """Which counted (group, task, value, count, _rank) rows the kind keeps."""
        raise NotImplementedError

    def finish_fit(self, fitted: FittedTask) -> None:
        """Complete the fit once both passes are in (kept values arrive by rank)."""

    def num_outputs(self, fitted: FittedTask | Mapping[str, Any]) -> int:
        return 1

    def shard_columns(self, fitted: FittedTask, raw: Column) -> list[Column]:
        """The task's shard column(s), null meaning "no label" (the loader's mask)."""
        raise NotImplementedError

    def column_names(self, name: str) -> list[str]:
        """The shard column names; the first is null exactly when a product has no label."""
        return [name]

    # ---- the loader ----------------------------------------------------------------------

    def batch_fields(self, entry: Mapping[str, Any]) -> list[BatchField]:
        """How the task's shard columns become batch arrays (`entry`: its manifest entry)."""
        raise NotImplementedError

    # ---- the model: head, loss, metrics (torch) ------------------------------------------

    def head(self, entry: Mapping[str, Any]) -> TaskHead:
        """The head the model grows for this task, from its manifest entry."""
        outputs = int(entry["num_outputs"])
        if outputs < self.min_outputs:
            raise ValueError(f"task {entry['name']!r}: too few outputs ({outputs}) for {self.name}")
        return TaskHead(
            name=str(entry["name"]), kind=self.name, num_outputs=outputs, scalar=self.scalar
        )

    def fill_unlabelled(self, target: Tensor, mask: Tensor) -> Tensor:
        """Targets with unlabelled rows replaced by a harmless value, so whatever the loader
        put there (an out-of-range class, NaN) changes nothing."""
        target = target.float()
        return torch.where(mask if target.dim() == 1 else mask[:, None], target, 0.0)

    def row_loss(self, output: Tensor, target: Tensor, head: TaskHead) -> Tensor:
        """Per-row loss [B] (float32 output, filled targets)."""
        raise NotImplementedError

    def prior_loss(self, head: TaskHead) -> float:
        """The label prior's loss before any data is seen (the loss normaliser's default)."""
        return 1.0

    def targets(self, head: TaskHead, target: Tensor) -> Tensor:
        """Labelled rows' targets as float64 [n, num_outputs], for measuring the prior."""
        return target.double().reshape(len(target), head.num_outputs)

    def prior_loss_from_moments(
        self, head: TaskHead, n: int, total: Tensor, squares: Tensor
    ) -> float:
        """The constant predictor's loss from the labelled rows' count, sum and sum of
        squares of `targets`. Default: the targets' total variance (squared error)."""
        mean = total / n
        return (squares / n - mean.square()).clamp_min(0).sum().item()

    def metric_width(self, head: TaskHead, top_k: tuple[int, ...]) -> int:
        """Summable statistics per task (besides the loss sum and the labelled count)."""
        return 0

    def update_metrics(
        self, stats: Tensor, output: Tensor, target: Tensor, head: TaskHead, top_k: tuple[int, ...]
    ) -> None:
        """Add one batch's labelled rows to `stats` (float64, summed over ranks later)."""

    def metrics(
        self, stats: Tensor, n: float, head: TaskHead, top_k: tuple[int, ...]
    ) -> dict[str, float]:
        """Validation metrics from the summed statistics of `n` labelled rows."""
        return {}


def confusion_metrics(stats: Tensor, classes: int, n: float) -> dict[str, float]:
    """Accuracy and macro-F1 from a flattened classes x classes confusion matrix."""
    confusion = stats[: classes * classes].reshape(classes, classes)
    tp = confusion.diagonal()
    return {
        "accuracy": (tp.sum() / n).item(),
        "macro_f1": f1_scores(tp, confusion.sum(0) - tp, confusion.sum(1) - tp).mean().item(),
    }


def add_confusion(stats: Tensor, target: Tensor, predicted: Tensor, classes: int) -> None:
    cells = target.long() * classes + predicted
    stats[: classes * classes] += torch.bincount(cells, minlength=classes**2).double()


# ---- the registry --------------------------------------------------------------------------
# A kind is the module of the same name in `pipelines/tasks/kinds/`, imported the first time
# the kind is asked for, which registers its `TaskKind` here. Every lookup goes through
# `kind_of`, so an unknown kind is refused here and nowhere else.

_KINDS: dict[str, TaskKind] = {}
_KINDS_PACKAGE = "pipelines.tasks.kinds"


def register(kind: TaskKind) -> TaskKind:
    """Called by a kind's module when imported; the module must carry the kind's name."""
    module = type(kind).__module__.rsplit(".", 1)[-1]
    if kind.name != module:
        raise RuntimeError(
            f"task kind {kind.name!r} is defined in module {module!r}: a kind "
            "lives in the module of its name"
        )
    _KINDS[kind.name] = kind
    return kind


def kind_names() -> tuple[str, ...]:
    """Every kind, by the module names in `pipelines/tasks/kinds/` (nothing is imported)."""
    package = importlib.import_module(_KINDS_PACKAGE)
    return tuple(sorted(module.name for module in pkgutil.iter_modules(package.__path__)))


def kind_of(name: str) -> TaskKind:
    """The kind called `name`; a ValueError naming the known kinds otherwise."""
    if name not in _KINDS:
        if name not in kind_names():
            raise ValueError(f"unknown task kind {name!r}; kinds are {', '.join(kind_names())}")
        importlib.import_module(f"{_KINDS_PACKAGE}.{name}")
    return _KINDS[name]
