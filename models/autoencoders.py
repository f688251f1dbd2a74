"""The two autoencoders of MRNet-Product2Vec that work on embeddings rather than titles.

- `GroupSparseAutoencoder` (section 3.2): product-group (PG) specific embeddings -> one
  PG-agnostic embedding of twice the size.
- `CrossLocaleAutoencoder` (section 5): a multimodal autoencoder (Ngiam et al.) over paired
  embeddings from two locales, which projects one locale's embedding into the other's space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CrossLocaleAutoencoder", "GroupSparseAutoencoder"]


class GroupSparseAutoencoder(nn.Module):
    """A sparse autoencoder over the G*d zero-padded PG embedding with a 2d hidden layer.

    The input places group g's d-dim embedding in slot g of a G*d zero vector; the sigmoid
    hidden layer (2d units) is the PG-agnostic embedding. The sparsity penalty is the KL
    divergence between a target mean activation `rho` and each hidden unit's mean activation
    over the batch, as in Ng's sparse autoencoder notes, which the paper cites ([7]). KL, not
    L1: it sets how often each unit fires, so no unit is left dead or always on, whereas L1 on
    sigmoid activations only pushes all of them towards 0 without controlling per-unit usage.
    Weight decay, the notes' third term, is left to the optimiser (AdamW's weight_decay).
    """

    def __init__(self, groups: int, dim: int, rho: float = 0.05, beta: float = 3.0) -> None:
        super().__init__()
        if groups < 1 or dim < 1 or not 0 < rho < 1:
            raise ValueError(f"need groups >= 1, dim >= 1 and 0 < rho < 1: {groups}, {dim}, {rho}")
        self.groups = groups
        self.dim = dim
        self.rho = rho
        self.beta = beta
        self.encoder = nn.Linear(groups * dim, 2 * dim)
        self.decoder = nn.Linear(2 * dim, groups * dim)

    def place(self, embeddings: Tensor, group_ids: Tensor) -> Tensor:
        """[B, d] embeddings of groups `group_ids` [B] -> [B, G*d], zero outside each slot."""
        slots = F.one_hot(group_ids.long(), self.groups).to(embeddings.dtype)  # [B, G]
        return (slots[:, :, None] * embeddings[:, None, :]).flatten(1)

    def forward(self, placed: Tensor) -> tuple[Tensor, Tensor]:
        """Placed input [B, G*d] -> (hidden [B, 2d] in (0, 1), reconstruction [B, G*d])."""
        hidden = torch.sigmoid(self.encoder(placed))
        return hidden, self.decoder(hidden)

    def encode(self, embeddings: Tensor, group_ids: Tensor) -> Tensor:
        """The PG-agnostic embedding [B, 2d]."""
        return self.forward(self.place(embeddings, group_ids))[0]

    def loss(self, embeddings: Tensor, group_ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Ng's objective, in float32: mean over rows of 1/2 ||x_hat - x||^2 plus beta times
        the summed KL(rho || rho_hat_j); returns the total and both terms, detached.

        rho_hat is measured over the batch, so batches should hold a few hundred rows.
        """
        placed = self.place(embeddings, group_ids)
        hidden, reconstruction = self.forward(placed)
        squared_error = 0.5 * (reconstruction.float() - placed.float()).square().sum(dim=1).mean()
        eps = 1e-6
        rho_hat = hidden.float().mean(dim=0).clamp(eps, 1 - eps)
        rho = torch.full_like(rho_hat, self.rho)
        sparsity = (
            torch.xlogy(rho, rho / rho_hat) + torch.xlogy(1 - rho, (1 - rho) / (1 - rho_hat))
        ).sum()
        total = squared_error + self.beta * sparsity
        return total, {"reconstruction": squared_error.detach(), "sparsity": sparsity.detach()}


class CrossLocaleAutoencoder(nn.Module):
    """Section 5: input [x_a, x_b] (2d), a d-dim hidden layer, output [y_a, y_b] (2d).

    Trained on the three pairings of `training_pairs`, the hidden layer learns to represent a
    product from either locale alone, so a zero in one half is filled in from the other: that
    is what projects one locale's embedding into the other's space.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, not {dim}")
        self.dim = dim
        self.encoder = nn.Linear(2 * dim, dim)
        self.decoder = nn.Linear(dim, 2 * dim)

    @staticmethod
    def training_pairs(x_a: Tensor, x_b: Tensor) -> tuple[Tensor, Tensor]:
        """The three pairings of section 5 for P paired rows, as (inputs, targets) [3P, 2d]:
        [a, 0] -> [0, b], [0, b] -> [a, 0], [a, b] -> [a, b]. Shuffle before batching."""
        zeros = torch.zeros_like(x_a)
        a0 = torch.cat((x_a, zeros), dim=1)
        zb = torch.cat((zeros, x_b), dim=1)
        ab = torch.cat((x_a, x_b), dim=1)
        return torch.cat((a0, zb, ab)), torch.cat((zb, a0, ab))

    def forward(self, x: Tensor) -> Tensor:
        """[B, 2d] -> [B, 2d] through the tanh hidden layer."""
        return self.decoder(torch.tanh(self.encoder(x)))

    def loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Mean squared error (float32) on a batch of `training_pairs` rows."""
        return F.mse_loss(self.forward(inputs).float(), targets.float())

    def project_a_to_b(self, x_a: Tensor) -> Tensor:
        """Locale a's embeddings [B, d] -> their estimate in locale b's space [B, d]."""
        return self.forward(torch.cat((x_a, torch.zeros_like(x_a)), dim=1))[:, self.dim :]

    def project_b_to_a(self, x_b: Tensor) -> Tensor:
        """Locale b's embeddings [B, d] -> their estimate in locale a's space [B, d]."""
        return self.forward(torch.cat((torch.zeros_like(x_b), x_b), dim=1))[:, : self.dim]
