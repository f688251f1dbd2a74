"""MRNet-Product2Vec (Biswas et al., section 3.1): a bidirectional LSTM reads the title's word
vectors; the product embedding is its final forward and backward states concatenated, and one
linear head per task (equation 4, o_n = W_n h_T + b_n) predicts that task's labels from it.

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

__all__ = ["PAD_ID", "MRNet", "TaskHead", "check_task_names", "word_embeddings"]

PAD_ID = 0  # the data contract: row 0 of the vocabulary is padding, row 1 out-of-vocabulary
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
    """Task names key the heads (an nn.ModuleDict): present, unique, and no Module attribute."""
    names = [task.name for task in tasks]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"task names must be present and unique: {names}")
    reserved = [name for name in names if hasattr(nn.ModuleDict(), name)]
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


class MRNet(nn.Module):
    """Word vectors -> BiLSTM -> product embedding [B, embedding_size] -> one head per task.

    Outputs per kind: multiclass logits [B, C]; binary logit [B]; regression value [B];
    multilabel logits [B, K]; decoding TF-IDF reconstruction [B, V].
    """

    def __init__(
        self,
        vocab_size: int,
        word_dim: int,
        tasks: Sequence[TaskHead],
        embedding_size: int = 128,
        pretrained: np.ndarray | Tensor | None = None,
        freeze_embeddings: bool = False,
    ) -> None:
        super().__init__()
        if embedding_size < 2 or embedding_size % 2:
            raise ValueError(
                f"embedding_size must be even (two LSTM directions), not {embedding_size}"
            )
        check_task_names(tasks)
        self.tasks = tuple(tasks)
        self.embedding_size = embedding_size
        self.words = word_embeddings(vocab_size, word_dim, pretrained, freeze_embeddings)
        self.lstm = nn.LSTM(word_dim, embedding_size // 2, batch_first=True, bidirectional=True)
        self.heads = nn.ModuleDict(
            {task.name: nn.Linear(embedding_size, task.num_outputs) for task in tasks}
        )
        self._scalar = {task.name for task in tasks if task.scalar}

    def encode(self, title_ids: Tensor, title_len: Tensor) -> Tensor:
        """The product embedding [B, embedding_size]: [h_T forward, h_T backward].

        Packing by `title_len` makes both directions stop at the last real token, so padding
        (and whatever ids sit in it) never reaches the states.
        """
        packed = pack_padded_sequence(
            self.words(title_ids),
            title_len.to("cpu", torch.int64),  # pack wants lengths on the CPU
            batch_first=True,
            enforce_sorted=False,
        )
        _, (h_n, _) = self.lstm(packed)  # [2, B, H], already back in the batch's order
        return torch.cat((h_n[0], h_n[1]), dim=1)

    def forward(
        self, batch: Mapping[str, Tensor], tasks: Iterable[str] | None = None
    ) -> dict[str, Tensor]:
        """Outputs of the named tasks' heads (all by default).

        Alternating optimisation passes the one sampled task so the other heads do no work.
        """
        embedding = self.encode(batch["title_ids"], batch["title_len"])
        names = self.heads.keys() if tasks is None else tasks
        outputs = {}
        for name in names:
            output = self.heads[name](embedding)
            outputs[name] = output.squeeze(-1) if name in self._scalar else output
        return outputs
