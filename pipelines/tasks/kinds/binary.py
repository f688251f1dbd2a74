"""binary: a yes/no flag per product, from listed `positive` values or a numeric `threshold`
(MRNet's binary attributes); logistic loss, accuracy, macro-F1."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F_torch
from pyspark.sql import Column, Row
from pyspark.sql import functions as F
from torch import Tensor

from models.mrnet import TaskHead
from pipelines.data.shards import BatchField
from pipelines.tasks.contract import (
    FittedTask,
    TaskKind,
    add_confusion,
    best_constant_bce,
    clip_weight,
    confusion_metrics,
    register,
    source_value,
)

if TYPE_CHECKING:
    from pipelines.tasks.contract import TaskSpec

__all__ = ["Binary"]


class Binary(TaskKind):
    name = "binary"
    options = ("positive", "threshold", "max_pos_weight")
    stratifies = True
    probes = True
    scalar = True

    def check(self, spec: TaskSpec) -> None:
        super().check(spec)
        if (spec.positive is None) == (spec.threshold is None):
            raise ValueError(f"task '{spec.name}': binary needs exactly one of positive, threshold")
        if spec.positive is not None and not spec.positive:
            raise ValueError(f"task '{spec.name}': positive must list at least one value")

    def raw(self, spec: TaskSpec) -> Column:
        if spec.threshold is None:
            return super().raw(spec)
        number = source_value(spec).try_cast("double")
        return F.when(F.abs(number) < F.lit(math.inf), number)  # not NaN, not infinite

    def label(self, spec: TaskSpec, raw: Column) -> Column:
        """1/0 as a boolean; null stays null (masked)."""
        if spec.threshold is not None:
            return raw >= F.lit(spec.threshold)
        return F.lower(raw).isin([value.lower() for value in spec.positive or []])

    def stratum(self, spec: TaskSpec, raw: Column) -> Column:
        return self.label(spec, raw).cast("string")

    def probe_label(self, spec: TaskSpec, raw: Column) -> Column:
        return self.label(spec, raw).cast("string")

    def train_aggregates(self, spec: TaskSpec, raw: Column) -> list[Column]:
        return [
            F.count_if(self.label(spec, raw)).alias(f"{spec.name}__pos"),
            *super().train_aggregates(spec, raw),
        ]

    def read_aggregates(self, fitted: FittedTask, row: Row) -> None:
        super().read_aggregates(fitted, row)
        positives = row[f"{fitted.spec.name}__pos"]
        fitted.labels, fitted.counts = ["true"], [positives]
        fitted.pos_weight = [
            clip_weight(fitted.train_labelled - positives, positives, fitted.spec.max_pos_weight)
        ]

    def shard_columns(self, fitted: FittedTask, raw: Column) -> list[Column]:
        return [self.label(fitted.spec, raw).alias(fitted.spec.name)]

    def batch_fields(self, entry: Mapping[str, Any]) -> list[BatchField]:
        name = entry["name"]
        return [BatchField(name, "label", name, np.dtype(np.float32), mask=True)]

    def row_loss(self, output: Tensor, target: Tensor, head: TaskHead) -> Tensor:
        return F_torch.binary_cross_entropy_with_logits(output, target, reduction="none")

    def prior_loss(self, head: TaskHead) -> float:
        return math.log(2.0)  # before data: a rate of 1/2

    def prior_loss_from_moments(
        self, head: TaskHead, n: int, total: Tensor, squares: Tensor
    ) -> float:
        return best_constant_bce(total / n, torch.ones(1, dtype=torch.float64)).mean().item()

    def metric_width(self, head: TaskHead, top_k: tuple[int, ...]) -> int:
        return 4

    def update_metrics(
        self, stats: Tensor, output: Tensor, target: Tensor, head: TaskHead, top_k: tuple[int, ...]
    ) -> None:
        add_confusion(stats, target, (output > 0).long(), 2)

    def metrics(
        self, stats: Tensor, n: float, head: TaskHead, top_k: tuple[int, ...]
    ) -> dict[str, float]:
        return confusion_metrics(stats, 2, n)


register(Binary())
