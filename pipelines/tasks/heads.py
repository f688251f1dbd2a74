"""Tasks as the training loop and the head reports see them: the heads a manifest asks for, the
masked loss of one head, and its validation metrics, each dispatched to the task's kind."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from models.mrnet import TaskHead
from pipelines.core.errors import TrainingError
from pipelines.tasks.contract import kind_of

__all__ = ["TaskMetrics", "task_heads", "task_loss"]


def task_heads(manifest: Mapping[str, Any], names: Sequence[str] = ()) -> list[TaskHead]:
    """The manifest's tasks (or the named ones, in manifest order) as model heads."""
    entries = {entry["name"]: entry for entry in manifest["tasks"]}
    unknown = sorted(set(names) - set(entries))
    if unknown:
        raise TrainingError(
            f"train.tasks names {unknown}, which the shards do not have "
            f"(they have {sorted(entries)})"
        )
    return [
        kind_of(entry["kind"]).head(entry)
        for name, entry in entries.items()
        if not names or name in names
    ]


def task_loss(output: Tensor, target: Tensor, mask: Tensor, head: TaskHead) -> Tensor:
    """One task's loss in float32, averaged over the labelled rows only.

    Unlabelled rows' targets are replaced before the loss sees them, and a batch without a
    labelled row gives exactly 0 (with zero gradients) rather than NaN. No data-dependent
    indexing, so no host/device synchronisation on a GPU.
    """
    kind = kind_of(head.kind)
    mask = mask.to(torch.bool)
    per_row = kind.row_loss(output.float(), kind.fill_unlabelled(target, mask), head)
    per_row = torch.where(mask, per_row, 0.0)
    return per_row.sum() / mask.sum().clamp_min(1)


class TaskMetrics:
    """Validation statistics of one task, summable over batches and ranks (`stats`, float64:
    loss sum, labelled rows, then the kind's own); `compute` turns them into metrics: the
    normalised loss (1 = the label prior's loss) and the kind's (accuracy, macro-F1 and
    top-k for multiclass, RMSE for regression, micro/macro-F1 for multilabel...)."""

    def __init__(
        self, head: TaskHead, device: torch.device, top_k: Sequence[int] = (1, 3, 5)
    ) -> None:
        self.head = head
        self.kind = kind_of(head.kind)
        self.top_k = tuple(top_k)
        width = self.kind.metric_width(head, self.top_k)
        self.stats = torch.zeros(2 + width, dtype=torch.float64, device=device)

    def update(self, output: Tensor, target: Tensor, mask: Tensor, loss: Tensor) -> None:
        mask = mask.to(torch.bool)
        labelled = mask.sum()
        self.stats[0] += loss.double() * labelled
        self.stats[1] += labelled
        self.kind.update_metrics(
            self.stats[2:], output.float()[mask], target[mask], self.head, self.top_k
        )

    @property
    def labelled(self) -> int:
        return int(self.stats[1].item())

    def compute(self) -> dict[str, float]:
        stats = self.stats.cpu()
        n = stats[1].item()
        if n == 0:
            return {}
        return {
            "loss": stats[0].item() / n,
            **self.kind.metrics(stats[2:], n, self.head, self.top_k),
        }
