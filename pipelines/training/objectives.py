"""Training objectives. MRNet's multi-task objective (section 3.1): masked per-task losses, normalised so that no
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

The per-kind parts (each task's loss, its prior loss, how to measure it) belong to the task
kinds (`pipelines.tasks`); `AccuracyObjective` is Products-10K's fine-tuning loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from models.mrnet import TaskHead
from pipelines.tasks import kind_of, task_loss

__all__ = [
    "AccuracyObjective",
    "LossNormaliser",
    "MultitaskObjective",
    "ObjectiveFactory",
    "accuracy_loss",
    "multitask_loss",
    "sample_task",
]

# tasks -> the objective, a module (its state is checkpointed) like MultitaskObjective.
ObjectiveFactory = Callable[[Sequence[TaskHead]], "MultitaskObjective"]


class LossNormaliser(nn.Module):
    """Per-task divisors (a buffer, so they travel with checkpoints) that put every task's
    loss on the scale "1 = the label prior's loss"; see the module docstring."""

    baseline: Tensor

    def __init__(self, tasks: Sequence[TaskHead], min_baseline: float = 1e-3) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.min_baseline = min_baseline  # a task constant in the data must not divide by ~0
        self._index = {task.name: i for i, task in enumerate(self.tasks)}
        defaults = [max(kind_of(task.kind).prior_loss(task), min_baseline) for task in self.tasks]
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
                mask = batch[f"{task.name}_mask"].to(torch.bool)
                y = kind_of(task.kind).targets(task, batch[task.name].detach()[mask].cpu())
                n[task.name] += len(y)
                s[task.name] += y.sum(dim=0)
                ss[task.name] += y.square().sum(dim=0)
        for task in self.tasks:
            if n[task.name]:
                value = kind_of(task.kind).prior_loss_from_moments(
                    task, n[task.name], s[task.name], ss[task.name]
                )
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
    Without any task (a catalog with no labels, trained on the contrastive objective alone)
    the total is 0.
    """
    if not tasks:
        return torch.zeros(()), {}
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


class MultitaskObjective(nn.Module):
    """MRNet's objective as a module, so the normaliser's divisors travel
    with the checkpoint and move to the device with `.to()`. What the loop needs of any
    objective: `tasks`, `calibrate(batches)` (before the first step) and
    `forward(outputs, batch, task=None) -> (total, per-task losses)`."""

    def __init__(self, tasks: Sequence[TaskHead]) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.normaliser = LossNormaliser(self.tasks)

    def calibrate(self, batches: Iterable[Mapping[str, Tensor]]) -> None:
        self.normaliser.calibrate(batches)

    def forward(
        self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor], task: str | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return multitask_loss(outputs, batch, self.tasks, self.normaliser, task=task)


def accuracy_loss(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Products-10K's accuracy loss over the labelled rows: 1 - mean(softmax probability of
    the true class), a smooth stand-in for 1 - accuracy; 0 for a batch with no label."""
    mask = mask.to(torch.bool)
    probabilities = torch.softmax(logits.float(), dim=1)
    true = probabilities.gather(1, torch.where(mask, target, 0).unsqueeze(1)).squeeze(1)
    return torch.where(mask, 1.0 - true, 0.0).sum() / mask.sum().clamp_min(1)


class AccuracyObjective(MultitaskObjective):
    """The fine-tuning objective of the Products-10K recipe: the accuracy loss for the
    tasks with exclusive classes (multiclass), MRNet's normalised losses for any others,
    summed."""

    def forward(
        self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor], task: str | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        selected = [t for t in self.tasks if task is None or t.name == task]
        if not selected:
            raise KeyError(f"unknown task {task!r}")
        per_task = {
            t.name: accuracy_loss(outputs[t.name], batch[t.name], batch[f"{t.name}_mask"])
            for t in selected
            if kind_of(t.kind).exclusive_classes
        }
        losses, logged = list(per_task.values()), {n: v.detach() for n, v in per_task.items()}
        others = [t for t in selected if not kind_of(t.kind).exclusive_classes]
        if others:
            rest, rest_logged = multitask_loss(outputs, batch, others, self.normaliser)
            losses.append(rest)
            logged.update(rest_logged)
        return torch.stack(losses).sum(), logged
