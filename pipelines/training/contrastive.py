"""The contrastive objective (`train.contrastive`): two augmented views of every product of a
batch, each view's embedding must pick out its twin among the batch (in-batch negatives),
symmetric InfoNCE at a temperature. With it the embedding becomes a similarity space: the
same product written two ways lands close, other products apart, which is what nearest-
neighbour search needs (README, "Finding the same product").

Views are made on the batch tensors, seeded, identically on every DDP rank's own rows:
- subword dropout: each subword id of the title zeroed with `subword_dropout` (a character-
  noise stand-in: a misspelt or reformatted token keeps most of its n-grams);
- word dropout: each word id zeroed with `word_dropout` (its subwords stay).
On the WDC matching pairs, subword dropout alone at 0.1 beat token dropout, span deletion and
their mixes (README); word dropout is what a BiLSTM, which reads no subwords, can use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ContrastiveSpec", "info_nce", "join_views", "view"]


@dataclass(frozen=True)
class ContrastiveSpec:
    """What the training processes need of `train.contrastive` (picklable)."""

    weight: float
    temperature: float
    subword_dropout: float
    word_dropout: float
    seed: int


def _dropped(ids: Tensor, rate: float, generator: torch.Generator) -> Tensor:
    if rate <= 0:
        return ids
    keep = torch.rand(ids.shape, generator=generator) >= rate
    return torch.where(keep.to(ids.device), ids, 0)


def view(batch: Mapping[str, Tensor], spec: ContrastiveSpec,
         generator: torch.Generator) -> dict[str, Tensor]:  # fmt: skip
    """One augmented view of a batch: the same rows and labels, noisier text."""
    out = dict(batch)
    if "title_subwords" in batch:
        out["title_subwords"] = _dropped(batch["title_subwords"], spec.subword_dropout, generator)
    out["title_ids"] = _dropped(batch["title_ids"], spec.word_dropout, generator)
    return out


def join_views(first: Mapping[str, Tensor], second: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Both views as one batch (first rows, then second), so the model runs once a step."""
    return {key: torch.cat((first[key], second[key])) for key in first}


def info_nce(first: Tensor, second: Tensor, temperature: float, real: Tensor) -> Tensor:
    """Symmetric in-batch InfoNCE over the real rows (padding rows take no part): row i of
    each view must pick row i of the other among all real rows. A batch without two real rows
    gives 0, still tied to the graph (DDP needs every rank's backward to touch the same
    parameters)."""
    first = F.normalize(first[real].float(), dim=1)
    second = F.normalize(second[real].float(), dim=1)
    if len(first) < 2:
        return (first.sum() + second.sum()) * 0.0
    logits = first @ second.T / temperature
    target = torch.arange(len(first), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
