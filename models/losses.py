"""MRNet's multi-task objective (section 3.1): masked per-task losses, normalised so that no
task dominates, summed (joint optimisation) or taken one task at a time (alternating).

Normalisation: each task's loss is divided by the loss of the best *constant* predictor for
that task, the one that ignores the title and predicts the label prior. A normalised loss of 1
means "learned nothing beyond the prior" and 0 means "perfect", whatever the task's kind, number
of classes or units, so an equal step in any task's normalised loss is an equal share of what
that task can still learn. The divisors:

- multiclass: entropy of the class prior (log C before calibration: a uniform prior);
- binary: entropy of the positive rate (log 2 before calibration);
- regression: variance of the target (1 before calibration: the targets are standardised);
- multilabel: the smallest weighted BCE a constant achieves, per node, averaged over nodes
  (from pos_weight = negatives/positives before calibration, which puts that constant at 1/2);
- decoding: total variance of the TF-IDF vector (1 before calibration: an L2-normalised row
  against a zero prediction).

`LossNormaliser.calibrate` replaces the defaults by the same quantities measured on training
batches. The divisors are fixed numbers, not running averages of the losses: a running average
would depend on the initialisation (a fresh 5000-wide decoding head starts far from its real
scale) and, once a task is nearly solved, would keep magnifying it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.mrnet import TaskHead


def task_loss(output: Tensor, target: Tensor, mask: Tensor, task: TaskHead) -> Tensor:
    """One task's raw loss in float32, averaged over the labelled rows only.

    Unlabelled rows' targets are replaced before the loss sees them, so whatever the loader
    put there (an out-of-range class, NaN) changes nothing, and a batch without a labelled row
    gives exactly 0 (with zero gradients) rather than NaN. No data-dependent indexing, so no
    host/device synchronisation on a GPU.
    """
    output = output.float()  # under autocast the heads may be half precision
    mask = mask.to(torch.bool)
    if task.kind == "multiclass":
        per_row = F.cross_entropy(output, torch.where(mask, target, 0), reduction="none")
    else:
        target = target.float()
        row_mask = mask if target.dim() == 1 else mask[:, None]
        target = torch.where(row_mask, target, 0.0)
        if task.kind == "binary":
            per_row = F.binary_cross_entropy_with_logits(output, target, reduction="none")
        elif task.kind == "regression":
            per_row = (output - target).square()
        elif task.kind == "multilabel":
            pos_weight = None
            if task.pos_weight is not None:
                pos_weight = torch.tensor(task.pos_weight, device=output.device)
            per_row = F.binary_cross_entropy_with_logits(
                output, target, pos_weight=pos_weight, reduction="none"
            ).mean(dim=1)
        else:  # decoding: squared distance to the TF-IDF vector
            per_row = (output - target).square().sum(dim=1)
    per_row = torch.where(mask, per_row, 0.0)
    return per_row.sum() / mask.sum().clamp_min(1)


def _pos_weight(task: TaskHead) -> Tensor:
    if task.pos_weight is None:
        return torch.ones(task.num_outputs, dtype=torch.float64)
    return torch.tensor(task.pos_weight, dtype=torch.float64)


def _bce_of_best_constant(p: Tensor, w: Tensor) -> Tensor:
    """Per unit, min over q of -(w p log q + (1 - p) log(1 - q)): reached at q = wp/(wp + 1 - p)."""
    q = w * p / (w * p + 1 - p)
    return -(w * torch.xlogy(p, q) + torch.xlogy(1 - p, 1 - q))


def default_baseline(task: TaskHead) -> float:
    """The constant predictor's loss before any data is seen (see the module docstring)."""
    if task.kind == "multiclass":
        return math.log(task.num_outputs)
    if task.kind in ("binary", "multilabel"):
        w = _pos_weight(task)
        return _bce_of_best_constant(1 / (1 + w), w).mean().item()  # p = 1/(1+w): q = 1/2
    return 1.0


def _target_matrix(task: TaskHead, target: Tensor, mask: Tensor) -> Tensor:
    """The labelled rows' targets as float64 [n, num_outputs] (one-hot for multiclass)."""
    target = target.detach()[mask.to(torch.bool)].cpu()
    if task.kind == "multiclass":
        return F.one_hot(target, task.num_outputs).double()
    return target.double().reshape(len(target), task.num_outputs)


def _baseline_from_moments(task: TaskHead, n: int, s: Tensor, ss: Tensor) -> float:
    """The constant predictor's loss from the labelled rows' count, sum and sum of squares."""
    mean = s / n
    if task.kind == "multiclass":
        return -torch.xlogy(mean, mean).sum().item()
    if task.kind in ("binary", "multilabel"):
        return _bce_of_best_constant(mean, _pos_weight(task)).mean().item()
    return (ss / n - mean.square()).clamp_min(0).sum().item()  # regression, decoding


class LossNormaliser(nn.Module):
    """Per-task divisors (a buffer, so they travel with checkpoints) that put every task's
    loss on the scale "1 = the label prior's loss"; see the module docstring."""

    baseline: Tensor

    def __init__(self, tasks: Sequence[TaskHead], min_baseline: float = 1e-3) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.min_baseline = min_baseline  # a task constant in the data must not divide by ~0
        self._index = {task.name: i for i, task in enumerate(self.tasks)}
        defaults = [max(default_baseline(task), min_baseline) for task in self.tasks]
        self.register_buffer("baseline", torch.tensor(defaults, dtype=torch.float32))

    def baselines(self) -> dict[str, float]:
        """The divisors by task name, e.g. to log next to the losses."""
        return dict(zip(self._index, self.baseline.tolist(), strict=True))

    def normalise(self, name: str, loss: Tensor) -> Tensor:
        """`loss` divided by the task's baseline."""
        return loss / self.baseline[self._index[name]]

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Mapping[str, Tensor]]) -> dict[str, int]:
        """Measure every task's constant-predictor loss on the labelled rows of `batches`.

        Returns the labelled rows seen per task; a task with none keeps its default. Under DDP,
        calibrate on the same batches on every rank, or broadcast `baseline` from rank 0, so all
        ranks optimise the same objective.
        """
        n = dict.fromkeys(self._index, 0)
        s = {task.name: torch.zeros(task.num_outputs, dtype=torch.float64) for task in self.tasks}
        ss = {task.name: torch.zeros(task.num_outputs, dtype=torch.float64) for task in self.tasks}
        for batch in batches:
            for task in self.tasks:
                y = _target_matrix(task, batch[task.name], batch[f"{task.name}_mask"])
                n[task.name] += len(y)
                s[task.name] += y.sum(dim=0)
                ss[task.name] += y.square().sum(dim=0)
        for task in self.tasks:
            if n[task.name]:
                value = _baseline_from_moments(task, n[task.name], s[task.name], ss[task.name])
                self.baseline[self._index[task.name]] = max(value, self.min_baseline)
        return n


def multitask_loss(
    outputs: Mapping[str, Tensor],
    batch: Mapping[str, Tensor],
    tasks: Sequence[TaskHead],
    normaliser: LossNormaliser,
    task: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Equation 3: the sum of the normalised task losses (joint), or with `task` set only that
    task's (alternating), so only its head and the shared encoder get gradients.

    Returns the total (float32) and the normalised per-task losses, detached, for logging.
    """
    selected = [t for t in tasks if task is None or t.name == task]
    if not selected:
        raise KeyError(f"unknown task {task!r}")
    per_task = {
        t.name: normaliser.normalise(
            t.name, task_loss(outputs[t.name], batch[t.name], batch[f"{t.name}_mask"], t)
        )
        for t in selected
    }
    total = torch.stack(list(per_task.values())).sum()
    return total, {name: loss.detach() for name, loss in per_task.items()}


def sample_task(generator: torch.Generator, tasks: Sequence[TaskHead]) -> str:
    """Alternating optimisation's task for this step, uniform over `tasks` (section 3.1).

    Seed the (CPU) generator identically on every DDP rank so all ranks train the same task.
    """
    return tasks[int(torch.randint(len(tasks), (1,), generator=generator))].name
