"""mrnet: MRNet-Product2Vec (MRNet section 3.1), one head per task on a title encoder: the
subword bag (`train.encoder: bag`, the default) or the paper's BiLSTM over word2vec vectors
(`bilstm`); served as `TitleEncoder` (title word ids and subword ids in, embedding out)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from torch import nn

from models.bag import SubwordBag
from models.encoders import TitleEncoder, pack_title
from models.mrnet import BiLSTMTitles, MRNet, TaskHead
from pipelines.core.config import Config
from pipelines.core.errors import TrainingError
from pipelines.data.shards import load_manifest, title_terms
from pipelines.data.subwords import Subwords
from pipelines.data.tokenizer import Vocabulary, tokenize_arrow
from pipelines.model_types.contract import InputLayout, ModelType, Served, validation_batch
from pipelines.model_types.registry import register
from pipelines.training.inputs import load_vectors
from pipelines.training.loop import ModelFactory, load_checkpoint

__all__ = ["MRNetType", "build_mrnet", "title_encoder"]


def title_encoder(shard_dir: Path, encoder: Literal["bag", "bilstm"], vectors: str, dim: int,
                  freeze_embeddings: bool) -> nn.Module:  # fmt: skip
    """The title encoder over a shard set: the subword bag, its weights starting at the
    title terms' IDF, or the BiLSTM over the word2vec vectors."""
    manifest = load_manifest(shard_dir)
    if encoder == "bilstm":
        pretrained = load_vectors(manifest, vectors)
        return BiLSTMTitles(pretrained.shape[0], pretrained.shape[1], dim, pretrained,
                            freeze_embeddings)  # fmt: skip
    if not manifest.get("subwords"):
        raise TrainingError(
            f"train.encoder 'bag' reads subword ids, and {shard_dir} has none: "
            "set shard.subwords.enabled: true (or train.encoder: bilstm)"
        )
    terms = title_terms(shard_dir, manifest)
    return SubwordBag(manifest["vocabulary"]["size"], terms.subword_ids, dim,
                      word_idf=terms.idf(terms.word_df), subword_idf=np.concatenate(
                          [[1.0], terms.idf(terms.subword_df)]))  # fmt: skip


def build_mrnet(shard_dir: Path, tasks: Sequence[TaskHead], *, encoder: Literal["bag", "bilstm"],
                vectors: str, embedding_size: int, freeze_embeddings: bool,
                init_from: str | None = None) -> MRNet:  # fmt: skip
    """The network the training processes build: MRNet on the configured title encoder."""
    model = MRNet(title_encoder(shard_dir, encoder, vectors, embedding_size, freeze_embeddings),
                  tasks)  # fmt: skip
    if init_from is not None:
        model.load_state_dict(load_checkpoint(Path(init_from))["model"])
    return model


def subword_scheme(manifest: Mapping[str, Any]) -> Subwords | None:
    """The shard set's subword scheme, None when it has no subword ids."""
    entry = manifest.get("subwords")
    if not entry:
        return None
    return Subwords(entry["buckets"], entry["n_min"], entry["n_max"], entry["per_word"],
                    entry["max_tokens"], entry["width"])  # fmt: skip


class MRNetType(ModelType):
    name = "mrnet"
    registry_prefix = "mrnet"
    encoder: ClassVar[type[nn.Module]] = TitleEncoder

    def settings(self, config: Config) -> dict[str, Any]:
        return {"encoder": config.train.encoder}

    def factory(self, config: Config, vectors: Path) -> ModelFactory:
        return partial(build_mrnet, encoder=config.train.encoder, vectors=str(vectors),
                       embedding_size=config.train.embedding_size,
                       freeze_embeddings=config.train.freeze_embeddings)  # fmt: skip

    def serve(self, model: nn.Module, shard_dir: Path) -> Served:
        assert isinstance(model, MRNet)
        manifest = load_manifest(shard_dir)
        max_len = manifest["max_len"]["title"]
        reads_subwords = isinstance(model.encoder, SubwordBag)
        width = manifest["subwords"]["width"] if reads_subwords else 0
        batch = validation_batch(shard_dir)
        example = pack_title(batch["title_ids"].numpy(),
                             batch["title_subwords"].numpy() if width else None)  # fmt: skip
        described = f"int64 [B, {max_len} title ids" + (
            f" + {width} subword ids] (tokenizer.json)" if width else "] (tokenizer.json)"
        )
        return Served(TitleEncoder(model, max_len, width), example, described)

    def input_layout(self, module: nn.Module, tokenizer: Mapping[str, Any]) -> InputLayout:
        assert isinstance(module, TitleEncoder)
        return InputLayout(max_len=module.max_len, extra={"subwords": tokenizer.get("subwords")}
                           if module.subword_width else {})  # fmt: skip

    def inputs(self, layout: InputLayout, batch: pa.RecordBatch,
               vocabulary: Vocabulary) -> np.ndarray:  # fmt: skip
        tokens = tokenize_arrow(batch.column("title"))
        scheme = subword_scheme(layout.extra) if layout.extra else None
        subwords = scheme.encode(tokens) if scheme else None
        return pack_title(vocabulary.encode(tokens, layout.max_len), subwords)

    def example_input(self, layout: InputLayout) -> np.ndarray:
        scheme = subword_scheme(layout.extra) if layout.extra else None
        example = np.zeros((1, layout.max_len + (scheme.width if scheme else 0)), dtype=np.int64)
        example[0, 0] = 2  # one real title token (its subwords may all be padding: fine)
        return example

    def heads(self, module: nn.Module) -> nn.Module | None:
        return module.mrnet if isinstance(module, TitleEncoder) else None


register(MRNetType())
