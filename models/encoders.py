"""The served forms of the trained networks: one int64 tensor in, the embedding out.

These are what the train stage registers in MLflow and what the embed stage's Python workers
unpickle, so they live apart from the training stack: a worker imports torch and the models,
never the launcher, the plotting or Spark."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from models.autoencoders import GroupSparseAutoencoder
from models.mrnet import PAD_ID, MRNet


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

    def __init__(self, groups: Sequence[str], encoders: Sequence[MRNet],
                 autoencoder: GroupSparseAutoencoder) -> None:
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
                embedding[rows] = encoder.encode(title_ids[rows], lengths[rows])
        return self.autoencoder.encode(embedding, group)
