"""mrnet: MRNet-Product2Vec (MRNet section 3.1), a BiLSTM over the title's word2vec vectors with
one head per task; served as `TitleEncoder` (title ids in, embedding out)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from torch import nn

from models.encoders import TitleEncoder
from models.mrnet import MRNet, TaskHead
from pipelines.core.config import Config
from pipelines.data.tokenizer import Vocabulary, tokenize_arrow
from pipelines.model_types.contract import (
    InputLayout,
    ModelType,
    Served,
    validation_batch,
)
from pipelines.model_types.registry import register
from pipelines.training.inputs import load_vectors
from pipelines.training.loop import ModelFactory, load_checkpoint

__all__ = ["MRNetType", "build_mrnet"]


def build_mrnet(
    manifest: Mapping[str, Any],
    tasks: Sequence[TaskHead],
    *,
    vectors: str,
    embedding_size: int,
    freeze_embeddings: bool,
    init_from: str | None = None,
) -> MRNet:
    """The network the training processes build: MRNet over the word2vec vectors."""
    pretrained = load_vectors(manifest, vectors)
    model = MRNet(
        pretrained.shape[0],
        pretrained.shape[1],
        tasks,
        embedding_size=embedding_size,
        pretrained=pretrained,
        freeze_embeddings=freeze_embeddings,
    )
    if init_from is not None:
        model.load_state_dict(load_checkpoint(Path(init_from))["model"])
    return model


class MRNetType(ModelType):
    name = "mrnet"
    registry_prefix = "mrnet"
    encoder = TitleEncoder

    def factory(self, config: Config, vectors: Path) -> ModelFactory:
        return partial(
            build_mrnet,
            vectors=str(vectors),
            embedding_size=config.train.embedding_size,
            freeze_embeddings=config.train.freeze_embeddings,
        )

    def serve(self, model: nn.Module, shard_dir: Path) -> Served:
        assert isinstance(model, MRNet)
        return Served(
            TitleEncoder(model),
            validation_batch(shard_dir)["title_ids"].numpy(),
            "int64 title ids [B, L] (tokenizer.json)",
        )

    def inputs(
        self, layout: InputLayout, batch: pa.RecordBatch, vocabulary: Vocabulary
    ) -> np.ndarray:
        return vocabulary.encode(tokenize_arrow(batch.column("title")), layout.max_len).astype(
            np.int64
        )

    def heads(self, module: nn.Module) -> nn.Module | None:
        return module.mrnet if isinstance(module, TitleEncoder) else None


register(MRNetType())
