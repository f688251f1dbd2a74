"""regression: a number per product (MRNet's weight, price, views), optionally log1p, then
standardised with train-split statistics; squared error, RMSE in standardised units."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from pyspark.sql import Column, Row
from pyspark.sql import functions as F
from torch import Tensor

from models.mrnet import TaskHead
from pipelines.data.shards import BatchField
from pipelines.tasks.contract import FittedTask, TaskKind, register, source_value

if TYPE_CHECKING:
    from pipelines.tasks.contract import TaskSpec

__all__ = ["Regression"]


class Regression(TaskKind):
    name = "regression"
    options = ("log",)
    scalar = True

    def raw(self, spec: TaskSpec) -> Column:
        number = source_value(spec).try_cast("double")
        return F.when(F.abs(number) < F.lit(math.inf), number)  # not NaN, not infinite

    def value(self, spec: TaskSpec, raw: Column) -> Column:
        """What is standardised: log1p when asked (a negative value then has no label)."""
        return F.when(raw >= 0, F.log1p(raw)) if spec.log else raw

    def train_aggregates(self, spec: TaskSpec, raw: Column) -> list[Column]:
        value = self.value(spec, raw)
        return [
            F.mean(value).alias(f"{spec.name}__mean"),
            F.stddev_samp(value).alias(f"{spec.name}__std"),
            F.count(value).alias(f"{spec.name}__n"),
        ]

    def read_aggregates(self, fitted: FittedTask, row: Row) -> None:
        super().read_aggregates(fitted, row)
        std = row[f"{fitted.spec.name}__std"]
        fitted.stats = {
            "mean": float(row[f"{fitted.spec.name}__mean"] or 0.0),
            "std": float(std) if std else 1.0,
            "log": fitted.spec.log,
        }

    def shard_columns(self, fitted: FittedTask, raw: Column) -> list[Column]:
        stats = fitted.stats or {"mean": 0.0, "std": 1.0}
        value = (self.value(fitted.spec, raw) - F.lit(stats["mean"])) / F.lit(stats["std"])
        return [value.cast("float").alias(fitted.spec.name)]

    def batch_fields(self, entry: Mapping[str, Any]) -> list[BatchField]:
        name = entry["name"]
        return [BatchField(name, "label", name, np.dtype(np.float32), mask=True)]

    def row_loss(self, output: Tensor, target: Tensor, head: TaskHead) -> Tensor:
        return (output - target).square()

    def metric_width(self, head: TaskHead, top_k: tuple[int, ...]) -> int:
        return 1

    def update_metrics(
        self, stats: Tensor, output: Tensor, target: Tensor, head: TaskHead, top_k: tuple[int, ...]
    ) -> None:
        stats[0] += (output - target).double().square().sum()

    def metrics(
        self, stats: Tensor, n: float, head: TaskHead, top_k: tuple[int, ...]
    ) -> dict[str, float]:
        return {"rmse": math.sqrt(stats[0].item() / n)}


register(Regression())
