"""multiclass: one class per product, the `top_n` most frequent train values plus "other"
(MRNet's colour, size, subcategory...); softmax cross-entropy, accuracy, macro-F1, top-k."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F_torch
from pyspark.sql import Column
from pyspark.sql import functions as F
from torch import Tensor

from models.mrnet import TaskHead
from pipelines.data.shards import BatchField
from pipelines.tasks.contract import (
    RANK,
    FittedTask,
    TaskKind,
    add_confusion,
    confusion_metrics,
    label_index,
    register,
)

if TYPE_CHECKING:
    from pipelines.tasks.contract import TaskSpec

__all__ = ["OTHER", "Multiclass"]

OTHER = "other"  # the class of every value outside the top N


class Multiclass(TaskKind):
    name = "multiclass"
    options = ("top_n",)
    stratifies = True
    probes = True
    exclusive_classes = True
    min_outputs = 2

    def check(self, spec: TaskSpec) -> None:
        super().check(spec)
        if spec.top_n is None:
            raise ValueError(f"task '{spec.name}': multiclass needs top_n")

    def stratum(self, spec: TaskSpec, raw: Column) -> Column:
        return raw

    def probe_label(self, spec: TaskSpec, raw: Column) -> Column:
        return raw

    def probe_values(self, spec: TaskSpec, labels: np.ndarray) -> np.ndarray:
        if spec.top_n is None:
            return labels
        top = pd.Series(labels).value_counts().index[: spec.top_n]
        return np.where(np.isin(labels, top), labels, OTHER)

    def counted_values(self, spec: TaskSpec, raw: Column) -> Column:
        return F.array(F.struct(F.lit(spec.name).alias("task"), raw.alias("value")))

    def keep_counted(self, spec: TaskSpec) -> Column:
        return (F.col("task") == spec.name) & (F.col(RANK) <= F.lit(spec.top_n))

    def finish_fit(self, fitted: FittedTask) -> None:
        fitted.labels.append(OTHER)
        fitted.counts.append(fitted.train_labelled - sum(fitted.counts))

    def num_outputs(self, fitted: FittedTask | Mapping[str, Any]) -> int:
        labels = fitted.labels if isinstance(fitted, FittedTask) else fitted["labels"]
        return len(labels)

    def shard_columns(self, fitted: FittedTask, raw: Column) -> list[Column]:
        other = len(fitted.labels) - 1
        index = F.coalesce(F.try_element_at(label_index(fitted.labels[:-1]), raw), F.lit(other))
        return [F.when(raw.isNotNull(), index).cast("int").alias(fitted.spec.name)]

    def batch_fields(self, entry: Mapping[str, Any]) -> list[BatchField]:
        name = entry["name"]
        return [BatchField(name, "label", name, np.dtype(np.int64), mask=True)]

    def fill_unlabelled(self, target: Tensor, mask: Tensor) -> Tensor:
        return torch.where(mask, target, 0)

    def row_loss(self, output: Tensor, target: Tensor, head: TaskHead) -> Tensor:
        return F_torch.cross_entropy(output, target, reduction="none")

    def prior_loss(self, head: TaskHead) -> float:
        return math.log(head.num_outputs)

    def targets(self, head: TaskHead, target: Tensor) -> Tensor:
        return F_torch.one_hot(target, head.num_outputs).double()

    def prior_loss_from_moments(
        self, head: TaskHead, n: int, total: Tensor, squares: Tensor
    ) -> float:
        mean = total / n
        return -torch.xlogy(mean, mean).sum().item()

    def metric_width(self, head: TaskHead, top_k: tuple[int, ...]) -> int:
        return head.num_outputs**2 + len(top_k)

    def update_metrics(
        self, stats: Tensor, output: Tensor, target: Tensor, head: TaskHead, top_k: tuple[int, ...]
    ) -> None:
        classes = head.num_outputs
        add_confusion(stats, target, output.argmax(dim=1), classes)
        if top_k:
            ranked = output.topk(min(max(top_k), classes), dim=1).indices
            hits = ranked == target.long().unsqueeze(1)
            stats[classes**2 :] += torch.stack(
                [hits[:, :k].any(dim=1).sum() for k in top_k]
            ).double()

    def metrics(
        self, stats: Tensor, n: float, head: TaskHead, top_k: tuple[int, ...]
    ) -> dict[str, float]:
        classes = head.num_outputs
        metrics = confusion_metrics(stats, classes, n)
        for k, hits in zip(top_k, stats[classes**2 :].tolist(), strict=True):
            if 1 < k < classes:  # top-1 is the accuracy; with k >= classes every row is a hit
                metrics[f"top{k}_accuracy"] = hits / n
        return metrics


register(Multiclass())
