"""The served forms of the trained networks: one int64 tensor in, the L2-normalised embedding
out (cosine similarity is then an inner product, what every index and report uses).

These are what the train stage registers in MLflow and what the embed stage's Python workers
unpickle, so they live apart from the training stack: a worker imports torch and the models,
never the launcher, the plotting or Spark."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.autoencoders import GroupSparseAutoencoder
from models.mrnet import PAD_ID, MRNet
from models.productnet import ProductNet

__all__ = [
    "GroupEncoder",
    "ProductNetEncoder",
    "TitleEncoder",
    "pack_fields",
    "pack_title",
    "title_batch",
    "title_lengths",
]


def title_lengths(title_ids: Tensor) -> Tensor:
    """Token counts of 0-padded id rows (padding only ever follows the last token)."""
    return (title_ids != PAD_ID).sum(dim=1).clamp_min(1)


def title_batch(inputs: Tensor, max_len: int) -> dict[str, Tensor]:
    """The title part of a packed input: `max_len` word ids, then (when there are more
    columns) the title's subword ids, as the batch keys the title encoders read."""
    title_ids = inputs[:, :max_len]
    batch = {"title_ids": title_ids, "title_len": title_lengths(title_ids)}
    if inputs.shape[1] > max_len:
        batch["title_subwords"] = inputs[:, max_len:]
    return batch


def pack_title(title_ids: np.ndarray, subword_ids: np.ndarray | None = None) -> np.ndarray:
    """TitleEncoder's input: word ids [B, max_len], then the subword ids [B, width] when the
    model reads them (`pipelines.data.subwords`)."""
    parts = [title_ids] if subword_ids is None else [title_ids, subword_ids]
    return np.concatenate([part.astype(np.int64, copy=False) for part in parts], axis=1)


class TitleEncoder(nn.Module):
    """The registered model: int64 [B, max_len + subword_width] (`pack_title`: the tokenizer's
    word ids, 0-padded at the end, then the title's subword ids) -> the L2-normalised product
    embedding [B, d]. One tensor in and one out, which is what MLflow's pytorch flavour serves;
    the task heads stay inside for whoever loads the module itself."""

    def __init__(self, mrnet: MRNet, max_len: int, subword_width: int = 0) -> None:
        super().__init__()
        self.mrnet = mrnet
        self.max_len = max_len
        self.subword_width = subword_width

    def forward(self, inputs: Tensor) -> Tensor:
        inputs = inputs.long()
        if inputs.shape[1] != self.max_len + self.subword_width:
            raise ValueError(
                f"title input has {inputs.shape[1]} columns, expected "
                f"{self.max_len} word ids + {self.subword_width} subword ids"
            )
        return F.normalize(self.mrnet.encode(title_batch(inputs, self.max_len)), dim=1)


class GroupEncoder(nn.Module):
    """The registered per-group model: int64 [B, 1 + max_len + subword_width] rows of (group
    index, then the title as `pack_title` lays it out) -> the L2-normalised group-agnostic
    embedding [B, 2d]: the row's group MRNet embeds the title, the sparse autoencoder maps it
    to the shared space. `groups[i]` names group index i. `fallback` names the group whose
    MRNet serves products of a group without one (groups under `shard.min_group_rows`, groups
    new since training); None: such products are not embedded."""

    def __init__(self, groups: Sequence[str], encoders: Sequence[MRNet],
                 autoencoder: GroupSparseAutoencoder, max_len: int,
                 subword_width: int = 0, fallback: str | None = None) -> None:  # fmt: skip
        super().__init__()
        if fallback is not None and fallback not in groups:
            raise ValueError(f"fallback group {fallback!r} is not one of {list(groups)}")
        self.groups = list(groups)
        self.fallback = fallback
        self.encoders = nn.ModuleList(encoders)
        self.autoencoder = autoencoder
        self.max_len = max_len
        self.subword_width = subword_width

    def forward(self, inputs: Tensor) -> Tensor:
        inputs = inputs.long()
        group, title = inputs[:, 0], title_batch(inputs[:, 1:], self.max_len)
        if len(inputs) and not (0 <= int(group.min()) and int(group.max()) < len(self.groups)):
            raise ValueError(f"group indices must be in [0, {len(self.groups)})")
        embedding = torch.zeros(len(inputs), self.autoencoder.dim, device=inputs.device)
        for index, encoder in enumerate(self.encoders):
            rows = (group == index).nonzero().squeeze(1)
            if len(rows):
                part = {key: value[rows] for key, value in title.items()}
                embedding[rows] = cast(MRNet, encoder).encode(part)
        return F.normalize(self.autoencoder.encode(embedding, group), dim=1)


class ProductNetEncoder(nn.Module):
    """The registered master model: one int64 tensor [B, W] in, the embedding [B, d] out.

    Packing (`pack_fields` builds it, `layout` describes it): the fields' ids side by side in
    `fields` order, each 0-padded to its max_len; then, for a model with the title's subword
    bag, the title's `subword_width` subword ids; then, for an image model, one column with
    the missing flag (0/1) and `image_dim` columns holding the float32 image features' bit
    patterns (`np.float32 -> view int32 -> int64`), so the features cross MLflow's one-tensor
    pytorch flavour exactly, with no second input and no rounding."""

    def __init__(self, productnet: ProductNet, subword_width: int = 0) -> None:
        super().__init__()
        self.productnet = productnet
        self.fields = productnet.fields
        self.image_dim = productnet.image_dim
        self.subword_width = subword_width if productnet.subwords is not None else 0

    @property
    def width(self) -> int:
        """Columns of the packed input."""
        image = 0 if self.image_dim is None else 1 + self.image_dim
        return sum(length for _, length in self.fields) + self.subword_width + image

    def unpack(self, inputs: Tensor) -> dict[str, Tensor]:
        if inputs.shape[1] != self.width:
            raise ValueError(
                f"packed ProductNet input has {inputs.shape[1]} columns, expected "
                f"{self.width} (fields {list(self.fields)}, image {self.image_dim})"
            )
        batch, start = {}, 0
        for name, length in self.fields:
            batch[f"{name}_ids"] = inputs[:, start : start + length]
            start += length
        if self.subword_width:
            batch["title_subwords"] = inputs[:, start : start + self.subword_width]
            start += self.subword_width
        if self.image_dim is not None:
            batch["image_missing"] = inputs[:, start] != 0
            bits = inputs[:, start + 1 :].to(torch.int32)
            batch["image_features"] = bits.view(torch.float32)
        return batch

    def forward(self, inputs: Tensor) -> Tensor:
        return F.normalize(self.productnet.encode(self.unpack(inputs.long())), dim=1)


def pack_fields(
    field_ids: Sequence[np.ndarray],
    image_features: np.ndarray | None = None,
    image_missing: np.ndarray | None = None,
    subword_ids: np.ndarray | None = None,
) -> np.ndarray:
    """ProductNetEncoder's input from each field's ids [B, max_len] (in the model's `fields`
    order), the title's subword ids [B, width] for a model with the subword bag and, for an
    image model, features float32 [B, D] and the missing flags [B]."""
    parts = [ids.astype(np.int64, copy=False) for ids in field_ids]
    if subword_ids is not None:
        parts.append(subword_ids.astype(np.int64, copy=False))
    if image_features is not None:
        if image_missing is None:
            raise ValueError("image features need their missing flags")
        bits = np.ascontiguousarray(image_features, dtype=np.float32).view(np.int32)
        parts += [image_missing.astype(np.int64)[:, None], bits.astype(np.int64)]
    return np.concatenate(parts, axis=1)
