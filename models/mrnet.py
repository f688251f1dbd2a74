"""MRNet-Product2Vec (Biswas et al., section 3.1): a title encoder gives the product embedding
(the paper's: a bidirectional LSTM over the title's word vectors, its final forward and backward
states concatenated), and one linear head per task (equation 4, o_n = W_n h_T + b_n) predicts
that task's labels from it.

Losses live with the task kinds (`pipelines.tasks`); this module only maps a batch to
per-task outputs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

__all__ = [
    "EMBEDDING",
    "PAD_ID",
    "BiLSTMTitles",
    "MRNet",
    "TaskHead",
    "check_task_names",
    "word_embeddings",
]

PAD_ID = 0  # the data contract: row 0 of the vocabulary is padding, row 1 out-of-vocabulary
EMBEDDING = "embedding"  # the key of the product embedding among a model's outputs
_NAME = re.compile(r"[a-z0-9_]+")


@dataclass(frozen=True)
class TaskHead:
    """One task's head as the model needs it: a name, the task's kind (which owns the loss and
    metrics, `pipelines.tasks`), the number of outputs, and whether the output is one number
    per product (`scalar`: squeezed to [B]).

    `pos_weight` (multilabel) is negatives/positives per output on the train split, the
    weight of the positive term in the weighted binary cross-entropy.
    """

    name: str
    kind: str
    num_outputs: int
    pos_weight: tuple[float, ...] | None = None
    scalar: bool = False

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"{where}: names are [a-z0-9_]+")
        if self.num_outputs < 1 or (self.scalar and self.num_outputs != 1):
            raise ValueError(
                f"{where}: {self.num_outputs} outputs for a "
                f"{'scalar ' if self.scalar else ''}{self.kind} head"
            )
        if self.pos_weight is None:
            return
        if len(self.pos_weight) != self.num_outputs:
            raise ValueError(
                f"{where}: {len(self.pos_weight)} pos_weight values for {self.num_outputs} outputs"
            )
        if not all(w > 0 and math.isfinite(w) for w in self.pos_weight):
            raise ValueError(f"{where}: pos_weight values must be positive and finite")


def check_task_names(tasks: Sequence[TaskHead]) -> None:
    """Task names key the heads (an nn.ModuleDict) and the outputs: unique, neither a Module
    attribute nor the embedding's key. No task at all is fine: a catalog without labels
    trains the embedding on the contrastive objective alone."""
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique: {names}")
    reserved = [name for name in names if hasattr(nn.ModuleDict(), name) or name == EMBEDDING]
    if reserved:
        raise ValueError(f"task names {reserved} clash with torch.nn.Module attributes")


def word_embeddings(
    vocab_size: int, word_dim: int, pretrained: np.ndarray | Tensor | None, freeze: bool
) -> nn.Embedding:
    """The word-vector table, from the word2vec vectors when given, frozen or fine-tuned."""
    words = nn.Embedding(vocab_size, word_dim, padding_idx=PAD_ID)
    if pretrained is not None:
        vectors = torch.as_tensor(pretrained, dtype=torch.float32)
        if vectors.shape != (vocab_size, word_dim):
            raise ValueError(
                f"pretrained vectors are {tuple(vectors.shape)}, expected {(vocab_size, word_dim)}"
            )
        with torch.no_grad():
            words.weight.copy_(vectors)
    words.weight.requires_grad_(not freeze)
    return words


class BiLSTMTitles(nn.Module):
    """MRNet's title encoder (section 3.1): the title's word vectors (word2vec-initialised)
    through a BiLSTM; the embedding is [h_T forward, h_T backward] [B, dim]."""

    def __init__(
        self,
        vocab_size: int,
        word_dim: int,
        dim: int = 128,
        pretrained: np.ndarray | Tensor | None = None,
        freeze_embeddings: bool = False,
    ) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"the BiLSTM embedding must be even (two directions), not {dim}")
        self.dim = dim
        self.words = word_embeddings(vocab_size, word_dim, pretrained, freeze_embeddings)
        self.lstm = nn.LSTM(word_dim, dim // 2, batch_first=True, bidirectional=True)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Packing by `title_len` makes both directions stop at the last real token, so padding
        (and whatever ids sit in it) never reaches the states."""
        packed = pack_padded_sequence(
            self.words(batch["title_ids"]),
            batch["title_len"].to("cpu", torch.int64),  # pack wants lengths on the CPU
            batch_first=True,
            enforce_sorted=False,
        )
        _, (h_n, _) = self.lstm(packed)  # [2, B, H], already back in the batch's order
        return torch.cat((h_n[0], h_n[1]), dim=1)


class MRNet(nn.Module):
    """A title encoder -> product embedding [B, dim] -> one linear head per task (MRNet's
    multi-task network). The encoder is the paper's BiLSTM (`BiLSTMTitles`) or the subword
    bag (`models.bag.SubwordBag`); anything with `dim` and `forward(batch) -> [B, dim]` fits.

    Outputs per kind: multiclass logits [B, C]; binary logit [B]; regression value [B];
    multilabel logits [B, K]; decoding TF-IDF reconstruction [B, V]; and under `EMBEDDING`
    the embedding itself (the contrastive objective's input).
    """

    def __init__(self, encoder: nn.Module, tasks: Sequence[TaskHead]) -> None:
        super().__init__()
        check_task_names(tasks)
        self.encoder = encoder
        self.tasks = tuple(tasks)
        self.embedding_size: int = encoder.dim  # type: ignore[assignment]  # encoders set it
        self.heads = nn.ModuleDict(
            {task.name: nn.Linear(self.embedding_size, task.num_outputs) for task in tasks}
        )
        self._scalar = {task.name for task in tasks if task.scalar}

    def encode(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The product embedding [B, dim]."""
        return self.encoder(batch)

    def forward(
        self, batch: Mapping[str, Tensor], tasks: Iterable[str] | None = None
    ) -> dict[str, Tensor]:
        """The embedding and the outputs of the named tasks' heads (all by default).

        Alternating optimisation passes the one sampled task so the other heads do no work.
        """
        embedding = self.encode(batch)
        names = self.heads.keys() if tasks is None else tasks
        outputs = {EMBEDDING: embedding}
        for name in names:
            output = self.heads[name](embedding)
            outputs[name] = output.squeeze(-1) if name in self._scalar else output
        return outputs
