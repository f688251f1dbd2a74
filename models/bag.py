"""The subword bag: a product title as an IDF-weighted bag of word and subword vectors.

emb(title) = L2-normalise( sum over the title's distinct ids of a_id * (1 + ln tf_id) * E[id] )

over its word ids and its hashed character n-gram ids (`pipelines.data.subwords`): each id
counted once per title with the sublinear term frequency, weighted by a per-id scalar a_id
that starts at the id's smoothed IDF over the catalog and is learned, like TF-IDF's term
weighting but in a dense, trainable space. Rare words and model numbers carry signal through
their n-grams. It is the shape that made contrastive training beat TF-IDF at finding the same
product (README, "Finding the same product"), and it runs ~10x faster than the BiLSTM.

Subword ids are hash buckets + 1; the table holds rows only for the ids the catalog uses
(`known_subwords`, sorted), and an id outside them (a bucket no training title had) counts
as absent, so the model stays small however many buckets the hash has.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SubwordBag", "distinct_counts"]


def distinct_counts(ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For int64 rows of ids (0 = padding): (row, id, count) of each distinct non-zero id of
    each row, rows ascending. Vectorised: sort each row, mark where a run starts, count runs."""
    ordered, _ = ids.sort(dim=1)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    starts &= ordered > 0
    run = starts.cumsum(dim=1)  # 1-based run number of each position (0: leading padding)
    counts = torch.zeros(ids.shape[0], ids.shape[1] + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(1, run, (ordered > 0).long())
    rows, columns = starts.nonzero(as_tuple=True)
    return rows, ordered[rows, columns], counts[rows, run[rows, columns]]


class SubwordBag(nn.Module):
    """The title encoder [B, dim] (L2-normalised) from `title_ids` and `title_subwords`."""

    def __init__(
        self,
        vocab_size: int,
        known_subwords: np.ndarray | Tensor,
        dim: int,
        word_idf: np.ndarray | Tensor | None = None,
        subword_idf: np.ndarray | Tensor | None = None,
    ) -> None:
        super().__init__()
        known = torch.as_tensor(known_subwords, dtype=torch.int64)
        if known.dim() != 1 or (len(known) > 1 and not bool((known[1:] > known[:-1]).all())):
            raise ValueError("known_subwords must be sorted, distinct subword ids")
        self.dim = dim
        self.known_subwords: Tensor
        self.register_buffer("known_subwords", known)
        # id -> table row as one gather (a binary search per id was the forward's top cost);
        # ids above the largest known one clamp onto the last entry, 0. Derived: not saved.
        row_of = torch.zeros(int(known.max()) + 2 if len(known) else 1, dtype=torch.int64)
        row_of[known] = torch.arange(1, len(known) + 1)
        self.row_of: Tensor
        self.register_buffer("row_of", row_of, persistent=False)
        # Row 0 of both tables: padding (words) or an id outside the known ones (subwords).
        self.words = nn.EmbeddingBag(vocab_size, dim, mode="sum", padding_idx=0)
        self.subwords = nn.EmbeddingBag(len(known) + 1, dim, mode="sum", padding_idx=0)
        self.word_weight = nn.Embedding(vocab_size, 1)
        self.subword_weight = nn.Embedding(len(known) + 1, 1)
        with torch.no_grad():
            for table in (self.words, self.subwords):
                nn.init.normal_(table.weight, std=dim**-0.5)
                table.weight[0].zero_()
            self.word_weight.weight.copy_(self._initial(word_idf, vocab_size))
            self.subword_weight.weight.copy_(self._initial(subword_idf, len(known) + 1))

    @staticmethod
    def _initial(idf: np.ndarray | Tensor | None, rows: int) -> Tensor:
        if idf is None:
            return torch.ones(rows, 1)
        weights = torch.as_tensor(idf, dtype=torch.float32).reshape(-1, 1)
        if len(weights) != rows:
            raise ValueError(f"{len(weights)} IDF values for {rows} rows")
        return weights

    def subword_rows(self, subword_ids: Tensor) -> Tensor:
        """Table rows of subword ids: 1 + their index among the known ids, 0 when unknown."""
        return self.row_of[subword_ids.clamp(0, len(self.row_of) - 1)]

    @staticmethod
    def _used(ids: Tensor) -> Tensor:
        """The columns up to the batch's last non-zero id: fixed-width id rows are mostly
        padding (a title uses ~40-350 of 384 subword slots), and every step below scales with
        the width."""
        filled = (ids != 0).any(dim=0).nonzero()
        return ids[:, : int(filled.max()) + 1] if len(filled) else ids[:, :1]

    def _bag(self, ids: Tensor, table: nn.EmbeddingBag, weight: nn.Embedding) -> Tensor:
        rows, distinct, counts = distinct_counts(ids)
        offsets = torch.zeros(ids.shape[0], dtype=torch.int64, device=ids.device)
        offsets[1:] = torch.bincount(rows, minlength=ids.shape[0]).cumsum(0)[:-1]
        scale = weight(distinct).squeeze(1) * (1 + torch.log(counts.float()))
        return table(distinct, offsets, per_sample_weights=scale)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        summed = self._bag(self._used(batch["title_ids"]), self.words, self.word_weight)
        subword_rows = self.subword_rows(self._used(batch["title_subwords"]))
        summed = summed + self._bag(subword_rows, self.subwords, self.subword_weight)
        return F.normalize(summed, dim=1)
