"""ProductNet's master model (Xu et al., WWW'19, section 2.2): one encoder per catalog field,
fused by concatenation and two fully connected layers; a softmax over the leaf categories on
top, and the last hidden layer is the product embedding.

Field encoders, as the paper chose them by running each field alone:
- title: attention-LSTM (a BiLSTM whose states are pooled by learned attention weights);
- description, bullets: DPCNN (deep pyramid CNN: region embedding, then blocks that halve the
  sequence by pooling and add two pre-activation convolutions through a shortcut);
- brand (and keyword fields): fastText, the mean of word and hashed word-bigram vectors;
- image: a precomputed feature vector (the paper's 1536-d Inception-v4 mixed_7d output)
  through one layer, zeros and a missing flag when a product has no image.

Every field may be missing for a product: its token ids are all padding (the shard stage
writes empty fields that way). Its encoder output is zeroed and a per-field missing flag is
concatenated beside the outputs, so the fusion layers can tell "absent" from "says nothing".
Lengths come from the ids themselves (padding only ever follows the last token), so the
trained model and its served form (models.encoders.ProductNetEncoder) read exactly the same
thing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.mrnet import EMBEDDING, PAD_ID, TaskHead, check_task_names, word_embeddings

__all__ = ["BIGRAM_PRIME", "DPCNN", "FIELD_ENCODERS", "AttentionLSTM", "BagOfWords", "ProductNet"]

# Which encoder reads which text field (the paper's choice per field).
FIELD_ENCODERS = {
    "title": "attention_lstm",
    "description": "dpcnn",
    "bullets": "dpcnn",
    "brand": "bag",
    "keywords": "bag",
}
BIGRAM_PRIME = 1_000_003  # bigram hash: (a * prime + b) mod buckets, no overflow in int64


class AttentionLSTM(nn.Module):
    """BiLSTM over the word vectors, pooled by attention: score_t = v . tanh(W h_t), weights =
    softmax over the real tokens only, output = sum_t weight_t h_t [B, size]."""

    def __init__(self, word_dim: int, size: int) -> None:
        super().__init__()
        if size < 2 or size % 2:
            raise ValueError(f"the attention-LSTM size must be even (two directions), not {size}")
        self.lstm = nn.LSTM(word_dim, size // 2, batch_first=True, bidirectional=True)
        self.score = nn.Sequential(nn.Linear(size, size), nn.Tanh(), nn.Linear(size, 1, bias=False))

    def forward(self, vectors: Tensor, lengths: Tensor) -> Tensor:
        positions = vectors.shape[1]
        packed = pack_padded_sequence(
            vectors,
            lengths.clamp_min(1).to("cpu", torch.int64),
            batch_first=True,
            enforce_sorted=False,
        )
        states, _ = pad_packed_sequence(
            self.lstm(packed)[0], batch_first=True, total_length=positions
        )
        scores = self.score(states).squeeze(-1).float()
        real = (
            torch.arange(positions, device=vectors.device)[None, :] < lengths.clamp_min(1)[:, None]
        )
        weights = torch.softmax(scores.masked_fill(~real, -math.inf), dim=1)
        return (weights.unsqueeze(-1).to(states.dtype) * states).sum(dim=1)


class _PyramidBlock(nn.Module):
    """DPCNN's repeated block: max-pool with stride 2 (halves the positions), then two
    pre-activation 3-convolutions added through an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = nn.MaxPool1d(3, stride=2, padding=1)
        self.convs = _two_convs(channels)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x)
        return pooled + self.convs(pooled)


def _two_convs(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, padding=1),
    )


class DPCNN(nn.Module):
    """Deep pyramid CNN (Johnson & Zhang, 2017) over a field of `max_len` ids: as many
    pyramid blocks as halve `max_len` to about 2 positions, then a max over positions."""

    def __init__(self, word_dim: int, channels: int, max_len: int) -> None:
        super().__init__()
        self.region = nn.Conv1d(word_dim, channels, 3, padding=1)
        self.convs = _two_convs(channels)
        depth = max(0, int(math.log2(max(max_len, 1))) - 1)
        self.blocks = nn.Sequential(*(_PyramidBlock(channels) for _ in range(depth)))

    def forward(self, vectors: Tensor, real: Tensor) -> Tensor:
        x = self.region(vectors.masked_fill(~real.unsqueeze(-1), 0.0).transpose(1, 2))
        x = self.blocks(x + self.convs(x))
        return x.max(dim=2).values


class BagOfWords(nn.Module):
    """fastText: the mean of the field's word vectors and its hashed word-bigram vectors,
    then one linear layer. Bigram bucket 0 is padding (pairs that include padding)."""

    def __init__(self, word_dim: int, size: int, buckets: int) -> None:
        super().__init__()
        if buckets < 1:
            raise ValueError(f"bigram buckets must be >= 1, not {buckets}")
        self.buckets = buckets
        self.bigrams = nn.Embedding(buckets + 1, word_dim, padding_idx=0)
        self.project = nn.Linear(word_dim, size)

    def bigram_ids(self, ids: Tensor) -> Tensor:
        """[B, L-1] bucket of each pair of neighbouring real tokens, 0 where a pair has padding."""
        pairs = (ids[:, :-1] != PAD_ID) & (ids[:, 1:] != PAD_ID)
        hashed = (ids[:, :-1] * BIGRAM_PRIME + ids[:, 1:]) % self.buckets + 1
        return torch.where(pairs, hashed, 0)

    def forward(self, vectors: Tensor, ids: Tensor) -> Tensor:
        real = (ids != PAD_ID).unsqueeze(-1)
        bigrams = self.bigram_ids(ids)
        total = (vectors * real).sum(dim=1) + self.bigrams(bigrams).sum(dim=1)
        count = real.sum(dim=(1, 2)) + (bigrams != 0).sum(dim=1)
        return self.project(total / count.clamp_min(1).unsqueeze(-1))


class ProductNet(nn.Module):
    """Fields (and image features) -> product embedding [B, embedding_size] -> one head per
    task (the paper: one multiclass head, the leaf categories). Word vectors are shared by
    the text fields; `fields` maps each text field to its id count (the shards' max_len)."""

    def __init__(
        self,
        vocab_size: int,
        word_dim: int,
        fields: Mapping[str, int],
        tasks: Sequence[TaskHead],
        *,
        embedding_size: int = 128,
        field_size: int = 128,
        hidden_size: int = 512,
        bigram_buckets: int = 100_000,
        image_dim: int | None = None,
        image_size: int = 256,
        dropout: float = 0.1,
        pretrained: np.ndarray | Tensor | None = None,
        freeze_embeddings: bool = False,
        subwords: nn.Module | None = None,
    ) -> None:
        super().__init__()
        unknown = sorted(set(fields) - set(FIELD_ENCODERS))
        if not fields or unknown:
            raise ValueError(f"fields must be some of {sorted(FIELD_ENCODERS)}, got {list(fields)}")
        check_task_names(tasks)
        self.tasks = tuple(tasks)
        self.fields = tuple((name, int(length)) for name, length in fields.items())
        self.image_dim = image_dim
        self.embedding_size = embedding_size
        self.words = word_embeddings(vocab_size, word_dim, pretrained, freeze_embeddings)
        encoders: dict[str, nn.Module] = {}
        for name, length in self.fields:
            kind = FIELD_ENCODERS[name]
            if kind == "attention_lstm":
                encoders[name] = AttentionLSTM(word_dim, field_size)
            elif kind == "dpcnn":
                encoders[name] = DPCNN(word_dim, field_size, length)
            else:
                encoders[name] = BagOfWords(word_dim, field_size, bigram_buckets)
        self.encoders = nn.ModuleDict(encoders)
        fused = len(self.fields) * (field_size + 1)  # each field's output and missing flag
        # The title's subword bag (models.bag.SubwordBag, dim field_size), when given: rare
        # words and model numbers reach the fusion through their character n-grams.
        self.subwords = subwords
        if subwords is not None:
            fused += field_size
        if image_dim is not None:
            self.image = nn.Sequential(nn.Linear(image_dim, image_size), nn.ReLU())
            fused += image_size + 1
        # tanh on the embedding layer: bounded, and never the all-zero vector a dead ReLU
        # layer can give (cosine search needs a direction).
        self.fusion = nn.Sequential(
            nn.Linear(fused, hidden_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, embedding_size),
            nn.Tanh(),
        )
        self.heads = nn.ModuleDict(
            {task.name: nn.Linear(embedding_size, task.num_outputs) for task in tasks}
        )
        self._scalar = {task.name for task in tasks if task.scalar}

    def encode_field(self, name: str, ids: Tensor) -> Tensor:
        """One field's output [B, field_size], zero for products without the field."""
        ids = ids.long()
        real = ids != PAD_ID
        lengths = real.sum(dim=1)
        vectors = self.words(ids)
        encoder = self.encoders[name]
        if isinstance(encoder, AttentionLSTM):
            output = encoder(vectors, lengths)
        elif isinstance(encoder, DPCNN):
            output = encoder(vectors, real)
        else:
            output = encoder(vectors, ids)
        return output * (lengths > 0).unsqueeze(-1).to(output.dtype)

    def encode(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The product embedding [B, embedding_size] from `<field>_ids` of every field and,
        for an image model, `image_features` [B, D] and `image_missing` [B]."""
        parts, flags = [], []
        for name, _ in self.fields:
            ids = batch[f"{name}_ids"]
            parts.append(self.encode_field(name, ids))
            flags.append((ids == PAD_ID).all(dim=1))
        if self.subwords is not None:
            parts.append(self.subwords(batch).to(parts[0].dtype))
        if self.image_dim is not None:
            missing = batch["image_missing"].to(torch.bool)
            features = batch["image_features"].float().masked_fill(missing.unsqueeze(-1), 0.0)
            parts.append(self.image(features))
            flags.append(missing)
        dtype = parts[0].dtype
        fused = torch.cat([*parts, torch.stack(flags, dim=1).to(dtype)], dim=1)
        return self.fusion(fused)

    def forward(
        self, batch: Mapping[str, Tensor], tasks: Iterable[str] | None = None
    ) -> dict[str, Tensor]:
        """The embedding and the outputs of the named tasks' heads (all by default), as
        pipelines.training.loop expects: multiclass logits [B, C] (the softmax lives in the
        loss), the embedding under `EMBEDDING`."""
        embedding = self.encode(batch)
        outputs = {EMBEDDING: embedding}
        for name in self.heads.keys() if tasks is None else tasks:
            output = self.heads[name](embedding)
            outputs[name] = output.squeeze(-1) if name in self._scalar else output
        return outputs
