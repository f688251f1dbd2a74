"""mrnet_per_group: MRNet section 3.2, one MRNet per product group (on per-group shard sets),
then a sparse autoencoder mapping the zero-padded group embeddings to one group-agnostic
space; served as `GroupEncoder` ((group index, title ids) in, the shared embedding out)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from pyspark.sql import functions as F
from torch import Tensor, nn

from models.autoencoders import GroupSparseAutoencoder
from models.encoders import GroupEncoder, TitleEncoder
from models.mrnet import MRNet
from pipelines.core.config import GroupAutoencoderConfig
from pipelines.core.errors import EmbedError, TrainingError
from pipelines.core.outputs import StageResult
from pipelines.data.shards import load_manifest
from pipelines.data.tokenizer import Vocabulary
from pipelines.model_types.contract import (
    InputLayout,
    TrainingRun,
)
from pipelines.model_types.kinds.mrnet import MRNetType
from pipelines.model_types.registry import register
from pipelines.training.inputs import loop_spec, train_seed
from pipelines.training.loader import make_loader
from pipelines.training.loop import resolve_device, save_torch
from pipelines.training.publish import export_files, log_and_register
from pipelines.training.reporting import log_history, train_and_log

__all__ = ["MRNetPerGroup", "embed_split", "train_group_autoencoder"]

log = logging.getLogger(__name__)


@torch.no_grad()
def embed_split(
    model: MRNet, shard_dir: Path, split: str, device: torch.device, batch_size: int, limit: int
) -> Tensor:
    """Embeddings [rows, d] of the first `limit` rows of one split (shard order is random,
    so they are a random sample), on the CPU."""
    model = model.to(device).eval()
    parts, rows = [], 0
    for batch in make_loader(shard_dir, split, batch_size, shuffle=False):
        if rows >= limit:
            break
        take = {key: value[: limit - rows].to(device) for key, value in batch.items()}
        parts.append(model.encode(take).float().cpu())
        rows += len(take["title_ids"])
    model.cpu()
    return torch.cat(parts)


def train_group_autoencoder(
    train: tuple[Tensor, Tensor],
    validation: tuple[Tensor, Tensor],
    groups: int,
    settings: GroupAutoencoderConfig,
    seed: int,
    device: torch.device,
) -> tuple[GroupSparseAutoencoder, list[dict[str, float]]]:
    """Fit the sparse autoencoder on (embedding, group index) rows in one process: it is a
    two-layer network over precomputed embeddings, small next to the group MRNets."""
    torch.manual_seed(seed)
    dim = train[0].shape[1]
    model = GroupSparseAutoencoder(groups, dim, rho=settings.rho, beta=settings.beta).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    order = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        sums = {"val_loss": 0.0, "val_reconstruction": 0.0, "val_sparsity": 0.0}
        rows = len(validation[0])
        for start in range(0, rows, settings.batch_size):
            x = validation[0][start : start + settings.batch_size].to(device)
            g = validation[1][start : start + settings.batch_size].to(device)
            total, parts = model.loss(x, g)
            share = len(x) / rows
            sums["val_loss"] += total.item() * share
            sums["val_reconstruction"] += parts["reconstruction"].item() * share
            sums["val_sparsity"] += parts["sparsity"].item() * share
        return sums

    history = [{"epoch": 0, **evaluate()}]
    for epoch in range(1, settings.epochs + 1):
        permutation = torch.randperm(len(train[0]), generator=order)
        losses = []
        for start in range(0, len(permutation), settings.batch_size):
            rows = permutation[start : start + settings.batch_size]
            total, _ = model.loss(train[0][rows].to(device), train[1][rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            losses.append(total.item())
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), **evaluate()})
    return model.cpu().eval(), history


class MRNetPerGroup(MRNetType):
    name = "mrnet_per_group"
    registry_prefix = "mrnet-pg"
    encoder = GroupEncoder
    per_group = True
    unembeddable = "unknown_group"  # a product group the model has no MRNet for

    def train(self, run: TrainingRun) -> StageResult:
        """One MRNet per product group, the group autoencoder over their embeddings, and the
        composite (group, title) -> group-agnostic embedding model, registered."""
        config, settings, out = run.config, run.config.train, run.out
        if None in run.shard_sets:
            raise TrainingError(
                f"train.model '{self.name}' needs per-group shards, and "
                f"{config.outputs.shards} holds one shard set: set "
                "shard.per_group: true and rerun `prodvec shard`"
            )
        sets = {str(group): path for group, path in run.shard_sets.items()}
        names = sorted(sets)
        metrics: dict[str, float] = {}
        models: list[MRNet] = []
        for group in names:
            run_dir = out / f"group={group}"
            spec = loop_spec(
                config, sets[group], run_dir, run.vectors, run.launch, self.fingerprint_part(config)
            )
            log.info("training the MRNet of product group %r", group)
            _, best = train_and_log(
                run.launch,
                spec,
                self.factory(config, run.vectors),
                settings.resume,
                prefix=f"{group}.",
                title=f"MRNet, group {group}",
            )
            metrics.update(best)
            models.append(cast(MRNet, self.load_trained(config, sets[group], run_dir, run.vectors)))
        device = resolve_device(settings.device, 0)

        def rows(split: str) -> tuple[Tensor, Tensor]:
            embeddings = [
                embed_split(
                    model,
                    sets[group],
                    split,
                    device,
                    settings.batch_size,
                    settings.group_autoencoder.max_rows_per_group,
                )
                for group, model in zip(names, models, strict=True)
            ]
            index = [torch.full((len(e),), i, dtype=torch.int64) for i, e in enumerate(embeddings)]
            return torch.cat(embeddings), torch.cat(index)

        autoencoder, history = train_group_autoencoder(
            rows("train"),
            rows("validation"),
            len(names),
            settings.group_autoencoder,
            train_seed(config),
            device,
        )
        save_torch(
            out / "autoencoder.pt",
            {"model": autoencoder.state_dict(), "groups": names, "history": history},
        )
        log_history(history, "autoencoder.", "group sparse autoencoder")
        metrics.update(
            {
                f"autoencoder.final_{key}": value
                for key, value in history[-1].items()
                if key != "epoch"
            }
        )
        manifests = {group: load_manifest(sets[group]) for group in names}
        largest = max(names, key=lambda group: manifests[group]["splits"]["train"])
        extra = export_files(sets[names[0]], out / "export", manifests)
        served = MRNetType.serve(self, models[0], sets[names[0]])
        title = cast(TitleEncoder, served.module)
        example = np.concatenate(
            [np.zeros((len(served.example), 1), dtype=np.int64), served.example], axis=1
        )
        name = self.registered_name(config)
        model_uri, version = log_and_register(
            GroupEncoder(
                names, models, autoencoder, title.max_len, title.subword_width, fallback=largest
            ),
            example,
            name,
            extra,
            {
                "catalog": config.catalog.name,
                "groups": names,
                "fallback_group": largest,
                "config_hash": config.digest(),
                "input": f"int64 [B, 1 + ...]: group index (metadata groups), then {served.input}",
                "output": f"group-agnostic embedding [B, {2 * settings.embedding_size}]",
            },
        )
        train_rows = sum(manifest["splits"]["train"] for manifest in manifests.values())
        validation_rows = sum(manifest["splits"]["validation"] for manifest in manifests.values())
        return StageResult(
            rows={"train": train_rows, "validation": validation_rows, "groups": len(names)},
            outputs={
                "run_dir": str(out),
                "autoencoder": str(out / "autoencoder.pt"),
                "model_uri": model_uri,
                "registered_model": f"models:/{name}/{version}",
            },
            metrics=metrics,
        )

    def input_layout(self, module: nn.Module, tokenizer: Mapping[str, Any]) -> InputLayout:
        assert isinstance(module, GroupEncoder)
        extra: dict[str, Any] = (
            {"subwords": tokenizer.get("subwords")} if module.subword_width else {}
        )
        fallback = getattr(module, "fallback", None)  # models registered before 2026-12-07: none
        if fallback is not None:
            extra["fallback"] = fallback
        return InputLayout(max_len=module.max_len, groups=tuple(module.groups), extra=extra)

    def input_columns(self, layout: InputLayout) -> list[str]:
        return ["title", "product_group"]

    def inputs(
        self, layout: InputLayout, batch: pa.RecordBatch, vocabulary: Vocabulary
    ) -> np.ndarray:
        """(group index, title) rows; a group the model has no encoder for gets the fallback
        group's index, or, for a model without one, is an error."""
        title = super().inputs(layout, batch, vocabulary)
        names = batch.column("product_group").to_numpy(zero_copy_only=False)
        group = pd.Index(layout.groups).get_indexer(names)
        if "fallback" in layout.extra:
            group[group < 0] = layout.groups.index(layout.extra["fallback"])
        elif (group < 0).any():
            raise EmbedError(
                f"product groups {sorted(set(names[group < 0]))} are not in the "
                f"model's groups {list(layout.groups)}"
            )
        return np.concatenate([group[:, None].astype(np.int64), title], axis=1)

    def example_input(self, layout: InputLayout) -> np.ndarray:
        title = super().example_input(layout)  # group 0 in front
        return np.concatenate([np.zeros((1, 1), dtype=np.int64), title], axis=1)

    def embeddable(self, layout: InputLayout) -> F.Column | None:
        return (
            None if "fallback" in layout.extra else F.col("product_group").isin(list(layout.groups))
        )

    def served_by_fallback(self, layout: InputLayout) -> F.Column | None:
        return (
            ~F.col("product_group").isin(list(layout.groups))
            if "fallback" in layout.extra
            else None
        )


register(MRNetPerGroup())
