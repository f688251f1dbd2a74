"""The served forms of the trained networks: one int64 tensor in, the embedding out.

These are what the train stage registers in MLflow and what the embed stage's Python workers
unpickle, so they live apart from the training stack: a worker imports torch and the models,
never the launcher, the plotting or Spark."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from models.autoencoders import GroupSparseAutoencoder
from models.mrnet import PAD_ID, MRNet
from models.productnet import ProductNet

__all__ = ["GroupEncoder", "ProductNetEncoder", "TitleEncoder", "pack_fields", "title_lengths"]


def title_lengths(title_ids: Tensor) -> Tensor:
    """Token counts of 0-padded id rows (padding only ever follows the last token)."""
    return (title_ids != PAD_ID).sum(dim=1).clamp_min(1)


class TitleEncoder(nn.Module):
    """The registered model: title ids [B, L] (the tokenizer's ids, 0-padded at the end) ->
    product embedding [B, d]. One tensor in and one out, which is what MLflow's pytorch
    flavour serves; the task heads stay inside for whoever loads the module itself."""

    def __init__(self, mrnet: MRNet) -> None:
        super().__init__()
        self.mrnet = mrnet

    def forward(self, title_ids: Tensor) -> Tensor:
        title_ids = title_ids.long()
        return self.mrnet.encode(title_ids, title_lengths(title_ids))


class GroupEncoder(nn.Module):
    """The registered per-group model: [B, 1 + L] int64 rows of (group index, title ids) ->
    the group-agnostic embedding [B, 2d]: the row's group MRNet embeds the title, the sparse
    autoencoder maps it to the shared space. `groups[i]` names group index i."""

    def __init__(
        self, groups: Sequence[str], encoders: Sequence[MRNet], autoencoder: GroupSparseAutoencoder
    ) -> None:
        super().__init__()
        self.groups = list(groups)
        self.encoders = nn.ModuleList(encoders)
        self.autoencoder = autoencoder

    def forward(self, inputs: Tensor) -> Tensor:
        inputs = inputs.long()
        group, title_ids = inputs[:, 0], inputs[:, 1:]
        if len(inputs) and not (0 <= int(group.min()) and int(group.max()) < len(self.groups)):
            raise ValueError(f"group indices must be in [0, {len(self.groups)})")
        lengths = title_lengths(title_ids)
        embedding = torch.zeros(len(inputs), self.autoencoder.dim, device=inputs.device)
        for index, encoder in enumerate(self.encoders):
            rows = (group == index).nonzero().squeeze(1)
            if len(rows):
                embedding[rows] = cast(MRNet, encoder).encode(title_ids[rows], lengths[rows])
        return self.autoencoder.encode(embedding, group)


class ProductNetEncoder(nn.Module):
    """The registered master model: one int64 tensor [B, W] in, the embedding [B, d] out.

    Packing (`pack_fields` builds it, `layout` describes it): the fields' ids side by side in
    `fields` order, each 0-padded to its max_len; then, for an image model, one column with
    the missing flag (0/1) and `image_dim` columns holding the float32 image features' bit
    patterns (`np.float32 -> view int32 -> int64`), so the features cross MLflow's one-tensor
    pytorch flavour exactly, with no second input and no rounding."""

    def __init__(self, productnet: ProductNet) -> None:
        super().__init__()
        self.productnet = productnet
        self.fields = productnet.fields
        self.image_dim = productnet.image_dim

    @property
    def width(self) -> int:
        """Columns of the packed input."""
        image = 0 if self.image_dim is None else 1 + self.image_dim
        return sum(length for _, length in self.fields) + image

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
        if self.image_dim is not None:
            batch["image_missing"] = inputs[:, start] != 0
            bits = inputs[:, start + 1 :].to(torch.int32)
            batch["image_features"] = bits.view(torch.float32)
        return batch

    def forward(self, inputs: Tensor) -> Tensor:
        return self.productnet.encode(self.unpack(inputs.long()))


def pack_fields(
    field_ids: Sequence[np.ndarray],
    image_features: np.ndarray | None = None,
    image_missing: np.ndarray | None = None,
) -> np.ndarray:
    """ProductNetEncoder's input from each field's ids [B, max_len] (in the model's `fields`
    order) and, for an image model, features float32 [B, D] and the missing flags [B]."""
    parts = [ids.astype(np.int64, copy=False) for ids in field_ids]
    if image_features is not None:
        if image_missing is None:
            raise ValueError("image features need their missing flags")
        bits = np.ascontiguousarray(image_features, dtype=np.float32).view(np.int32)
        parts += [image_missing.astype(np.int64)[:, None], bits.astype(np.int64)]
    return np.concatenate(parts, axis=1)
