"""multilabel: every node of the category path ("a", "a>b", "a>b>c") as its own label (the
Visual Meta post's hierarchical categories); weighted binary cross-entropy with `pos_weight`
per node, micro- and macro-F1."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F_torch
from pyspark.sql import Column
from pyspark.sql import functions as F
from torch import Tensor

from models.mrnet import TaskHead
from pipelines.data.shards import BatchField
from pipelines.tasks.contract import (
    COUNT,
    FittedTask,
    TaskKind,
    best_constant_bce,
    clip_weight,
    f1_scores,
    label_index,
    register,
)

if TYPE_CHECKING:
    from pipelines.tasks.contract import TaskSpec

__all__ = ["NODE_SEPARATOR", "Multilabel"]

NODE_SEPARATOR = ">"  # category node names: "a", "a>b", "a>b>c"


class Multilabel(TaskKind):
    name = "multilabel"
    options = ("max_depth", "min_count", "max_pos_weight")
    stratifies = True

    def check(self, spec: TaskSpec) -> None:
        if spec.source != "category_path":
            raise ValueError(
                f"task '{spec.name}': multilabel tasks read source 'category_path' (the whole path)"
            )

    def raw(self, spec: TaskSpec) -> Column:
        """Every node on the category path; null when there is no path."""
        path = F.col("category_path")
        if spec.max_depth is not None:
            path = F.slice(path, 1, spec.max_depth)
        nodes = F.transform(
            F.sequence(F.lit(1), F.size(path)),
            lambda depth: F.array_join(F.slice(path, 1, depth), NODE_SEPARATOR),
        )
        return F.when(F.size(path) > 0, nodes)

    def stratum(self, spec: TaskSpec, raw: Column) -> Column:
        return F.element_at(raw, -1)  # the deepest node

    def counted_values(self, spec: TaskSpec, raw: Column) -> Column:
        tag = F.lit(spec.name).alias("task")
        return F.coalesce(
            F.transform(raw, lambda node: F.struct(tag, node.alias("value"))), F.array()
        )

    def keep_counted(self, spec: TaskSpec) -> Column:
        return (F.col("task") == spec.name) & (F.col(COUNT) >= spec.min_count)

    def finish_fit(self, fitted: FittedTask) -> None:
        pairs = sorted(zip(fitted.labels, fitted.counts, strict=True))  # a parent first
        fitted.labels, fitted.counts = [p[0] for p in pairs], [p[1] for p in pairs]
        fitted.pos_weight = [
            clip_weight(fitted.train_labelled - c, c, fitted.spec.max_pos_weight)
            for c in fitted.counts
        ]

    def num_outputs(self, fitted: FittedTask | Mapping[str, Any]) -> int:
        labels = fitted.labels if isinstance(fitted, FittedTask) else fitted["labels"]
        return len(labels)

    def shard_columns(self, fitted: FittedTask, raw: Column) -> list[Column]:
        index = label_index(fitted.labels)
        found = F.filter(
            F.transform(raw, lambda node: F.try_element_at(index, node)), lambda i: i.isNotNull()
        )
        return [F.when(F.size(found) > 0, F.array_sort(found)).alias(fitted.spec.name)]

    def batch_fields(self, entry: Mapping[str, Any]) -> list[BatchField]:
        name = entry["name"]
        return [
            BatchField(
                name, "sparse", name, np.dtype(np.float32), int(entry["num_outputs"]), mask=True
            )
        ]

    def head(self, entry: Mapping[str, Any]) -> TaskHead:
        head = super().head(entry)
        weights = entry.get("pos_weight")
        if weights is None:
            return head
        if isinstance(weights, Mapping):  # {label: weight}, ordered by the entry's labels
            weights = [weights[label] for label in entry["labels"]]
        return TaskHead(head.name, head.kind, head.num_outputs, tuple(float(w) for w in weights))

    def row_loss(self, output: Tensor, target: Tensor, head: TaskHead) -> Tensor:
        return F_torch.binary_cross_entropy_with_logits(
            output, target, pos_weight=self._weights(head, output.device), reduction="none"
        ).mean(dim=1)

    def prior_loss(self, head: TaskHead) -> float:
        w = self._weights(head).double()
        return best_constant_bce(1 / (1 + w), w).mean().item()  # p = 1/(1+w): q = 1/2

    def prior_loss_from_moments(
        self, head: TaskHead, n: int, total: Tensor, squares: Tensor
    ) -> float:
        return best_constant_bce(total / n, self._weights(head).double()).mean().item()

    def metric_width(self, head: TaskHead, top_k: tuple[int, ...]) -> int:
        return 3 * head.num_outputs

    def update_metrics(
        self, stats: Tensor, output: Tensor, target: Tensor, head: TaskHead, top_k: tuple[int, ...]
    ) -> None:
        predicted, actual, k = output > 0, target > 0.5, head.num_outputs
        stats[:k] += (predicted & actual).sum(dim=0).double()
        stats[k : 2 * k] += (predicted & ~actual).sum(dim=0).double()
        stats[2 * k :] += (~predicted & actual).sum(dim=0).double()

    def metrics(
        self, stats: Tensor, n: float, head: TaskHead, top_k: tuple[int, ...]
    ) -> dict[str, float]:
        tp, fp, fn = stats.reshape(3, head.num_outputs)
        per_label = f1_scores(tp, fp, fn)
        return {
            "micro_f1": (2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp_min(1)).item(),
            "macro_f1": per_label.mean().item() if len(per_label) else 0.0,
        }

    @staticmethod
    def _weights(head: TaskHead, device: torch.device | None = None) -> Tensor:
        if head.pos_weight is None:
            return torch.ones(head.num_outputs, device=device)
        return torch.tensor(head.pos_weight, device=device)


register(Multilabel())
