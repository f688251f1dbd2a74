"""productnet: ProductNet's multimodal master model (ProductNet section 2.2), one encoder per
text field plus an image branch, fused by two fully connected layers; served as
`ProductNetEncoder` (every field's ids and the image features packed into one int64 tensor)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from torch import nn

from models.encoders import ProductNetEncoder, pack_fields
from models.mrnet import TaskHead
from models.productnet import ProductNet
from pipelines.core.config import Config
from pipelines.data.catalog import TEXT_LISTS
from pipelines.data.shards import load_manifest
from pipelines.data.tokenizer import Vocabulary, tokenize_arrow
from pipelines.model_types.contract import (
    InputLayout,
    ModelType,
    Served,
    validation_batch,
)
from pipelines.model_types.kinds.mrnet import subword_scheme, title_encoder
from pipelines.model_types.registry import register
from pipelines.training.inputs import load_vectors
from pipelines.training.loop import ModelFactory, load_checkpoint

__all__ = ["ProductNetType", "build_productnet"]


def build_productnet(
    shard_dir: Path,
    tasks: Sequence[TaskHead],
    *,
    encoder: Literal["bag", "bilstm"],
    vectors: str,
    embedding_size: int,
    freeze_embeddings: bool,
    sizes: Mapping[str, Any],
    init_from: str | None = None,
) -> ProductNet:
    """The master model the training processes build: every text field of the shards (and
    their image features), the word2vec vectors shared by the fields, and with `encoder:
    bag` the title's subword bag beside the title's attention-LSTM."""
    manifest = load_manifest(shard_dir)
    pretrained = load_vectors(manifest, vectors)
    subwords = None
    if encoder == "bag" and manifest.get("subwords"):
        subwords = title_encoder(shard_dir, "bag", vectors, sizes["field_size"],
                                 freeze_embeddings)  # fmt: skip
    image = manifest.get("image_features")
    model = ProductNet(
        pretrained.shape[0],
        pretrained.shape[1],
        manifest["max_len"],
        tasks,
        embedding_size=embedding_size,
        image_dim=image["dim"] if image else None,
        pretrained=pretrained,
        freeze_embeddings=freeze_embeddings,
        subwords=subwords,
        **sizes,
    )
    if init_from is not None:
        model.load_state_dict(load_checkpoint(Path(init_from))["model"])
    return model


class ProductNetType(ModelType):
    name = "productnet"
    registry_prefix = "productnet"
    encoder = ProductNetEncoder

    def settings(self, config: Config) -> dict[str, Any]:
        return {"productnet": config.train.productnet.model_dump(mode="json"),
                "encoder": config.train.encoder}  # fmt: skip

    def factory(self, config: Config, vectors: Path) -> ModelFactory:
        return partial(build_productnet, encoder=config.train.encoder, vectors=str(vectors),
                       embedding_size=config.train.embedding_size,
                       freeze_embeddings=config.train.freeze_embeddings,
                       sizes=config.train.productnet.model_dump())  # fmt: skip

    def serve(self, model: nn.Module, shard_dir: Path) -> Served:
        assert isinstance(model, ProductNet)
        manifest = load_manifest(shard_dir)
        width = manifest["subwords"]["width"] if model.subwords is not None else 0
        batch = validation_batch(shard_dir)
        imaged = model.image_dim is not None
        example = pack_fields(
            [batch[f"{name}_ids"].numpy() for name, _ in model.fields],
            batch["image_features"].numpy() if imaged else None,
            batch["image_missing"].numpy() if imaged else None,
            subword_ids=batch["title_subwords"].numpy() if width else None,
        )
        served = ProductNetEncoder(model, width)
        return Served(served, example,
                      f"int64 [B, {served.width}]: ids of fields {list(model.fields)} side by "
                      f"side, then {width} title subword ids, then image missing flag + "
                      "float32 feature bits (models.encoders.pack_fields)")  # fmt: skip

    def input_layout(self, module: nn.Module, tokenizer: Mapping[str, Any]) -> InputLayout:
        assert isinstance(module, ProductNetEncoder)
        return InputLayout(max_len=int(tokenizer["max_len"]), fields=tuple(module.fields),
                           image_dim=module.image_dim,
                           extra={"subwords": tokenizer.get("subwords")}
                           if module.subword_width else {})  # fmt: skip

    def input_columns(self, layout: InputLayout) -> list[str]:
        columns = [name for name, _ in layout.fields]
        if layout.extra and "title" not in columns:
            columns.append("title")
        return columns + (["image_features"] if layout.image_dim is not None else [])

    def inputs(self, layout: InputLayout, batch: pa.RecordBatch,
               vocabulary: Vocabulary) -> np.ndarray:  # fmt: skip
        """Each field tokenised as the shard stage does (bullets joined by spaces; a null
        field is all padding, i.e. missing), the title's subword ids for a model with the
        subword bag, then the image features (a null or wrong-length vector is a missing
        image, as in the shards)."""
        ids = []
        for name, length in layout.fields:
            text = batch.column(name)
            if name in TEXT_LISTS:
                text = pc.binary_join(text, " ")
            ids.append(vocabulary.encode(tokenize_arrow(text), length))
        scheme = subword_scheme(layout.extra) if layout.extra else None
        subwords = scheme.encode(tokenize_arrow(batch.column("title"))) if scheme else None
        if layout.image_dim is None:
            return pack_fields(ids, subword_ids=subwords)
        dim = layout.image_dim
        features = batch.column("image_features")
        missing = pc.fill_null(pc.not_equal(pc.list_value_length(features), dim), True).to_numpy(
            zero_copy_only=False
        )
        image = np.zeros((batch.num_rows, dim), dtype=np.float32)
        if not missing.all():
            present = features.filter(pa.array(~missing))
            image[~missing] = (pc.list_flatten(present).to_numpy(zero_copy_only=False)
                               .astype(np.float32).reshape(-1, dim))  # fmt: skip
        return pack_fields(ids, image, missing, subword_ids=subwords)

    def example_input(self, layout: InputLayout) -> np.ndarray:
        """One real title token; every other field and the image missing."""
        lengths = [length for _, length in layout.fields]
        scheme = subword_scheme(layout.extra) if layout.extra else None
        image = 0 if layout.image_dim is None else 1 + layout.image_dim
        example = np.zeros((1, sum(lengths) + (scheme.width if scheme else 0) + image),
                           dtype=np.int64)  # fmt: skip
        starts = np.cumsum([0, *lengths])
        example[0, starts[[name for name, _ in layout.fields].index("title")]] = 2
        if layout.image_dim is not None:
            example[0, -layout.image_dim - 1] = 1
        return example

    def heads(self, module: nn.Module) -> nn.Module | None:
        return module.productnet if isinstance(module, ProductNetEncoder) else None


register(ProductNetType())
