"""Serving a registered model: resolving its URI to one registry version, downloading it once,
learning what it takes (its model type and input layout, `ModelSpec`), and loading it once per
process; then any batch of clean-catalog rows becomes its embeddings (`embed_batch`). The
embed stage runs this in every Spark task; the evaluate stage and the CLI in the driver."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import torch
from mlflow import MlflowClient
from pyspark import SparkFiles
from torch import nn

from pipelines.core.config import Config
from pipelines.core.devices import infer
from pipelines.core.errors import EmbedError
from pipelines.data.tokenizer import VOCABULARY_FILE, Vocabulary
from pipelines.model_types.contract import InputLayout, ModelType
from pipelines.model_types.registry import model_type, model_type_names, model_type_of

__all__ = [
    "SHIPPED",
    "ModelSpec",
    "cached_model",
    "default_model_uri",
    "embed_batch",
    "folder_digest",
    "input_columns",
    "pin",
    "prepare_model",
    "served_type",
]

log = logging.getLogger(__name__)

SHIPPED = "sparkfiles:"  # a model folder reference resolved by SparkFiles.get on executors


@dataclass(frozen=True)
class ModelSpec:
    """Everything a worker needs to embed, small enough to ship in every task's closure."""

    uri: str  # the pinned URI (models:/name/version) or what the user gave
    name: str
    version: str
    folder: str  # local model folder, or SHIPPED + its name
    model_type: str  # pipelines.model_types: how rows become the model's input
    layout: InputLayout
    dimension: int
    batch_size: int
    gpu_batch_size: int


def default_model_uri(config: Config) -> str:
    """`embed.model_uri`, else the train stage's registered model at alias `candidate`."""
    if config.embed.model_uri:
        return config.embed.model_uri
    return f"models:/{model_type(config.train.model).registered_name(config)}@candidate"


def folder_digest(folder: Path) -> str:
    """sha256 of a model folder's files (relative paths and bytes), 16 hex digits: what
    identifies a model given as a folder, so retraining into the same folder is a new model."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def pin(uri: str) -> tuple[str, str, str]:
    """(pinned URI, model name, version): `models:/n@alias` and `models:/n/v` become
    `models:/n/<version>`; a local model folder is its own name, version `sha256-<content
    digest>`; any other URI (runs:/, a logged model's models:/m-...) is immutable and its own
    name, version '0'."""
    ref = uri[len("models:/") :]
    local = Path(uri.removeprefix("file://"))
    if "://" not in uri.removeprefix("file://") and local.is_dir():
        return uri, uri, f"sha256-{folder_digest(local)}"
    if not uri.startswith("models:/") or not ("@" in ref or "/" in ref):
        return uri, uri, "0"
    client = MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias).version
        else:
            name, version = ref.rsplit("/", 1)
            client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as err:
        raise EmbedError(f"cannot resolve {uri} in {mlflow.get_tracking_uri()}: {err}") from err
    return f"models:/{name}/{version}", name, str(version)


def served_type(module: nn.Module) -> ModelType:
    """The model type whose served form `module` is (the one dispatch point)."""
    found = model_type_of(module)
    if found is None:
        raise EmbedError(
            f"the embed stage does not know the input of {type(module).__name__}: "
            "it is no model type's served form "
            f"(model types: {', '.join(model_type_names())})"
        )
    return found


def prepare_model(
    uri: str, cache: Path, *, batch_size: int = 1024, gpu_batch_size: int = 8192
) -> ModelSpec:
    """Pin, download once into `cache/<name>/<version>`, load once to learn input and width."""
    pinned, name, version = pin(uri)
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)  # models are code: owner only
    registered = pinned.startswith("models:/") and version != "0"
    folder = cache / _slug(name) / version if registered else None
    if folder is None or not (folder / "MLmodel").is_file():
        target = cache / "download"
        target.mkdir(parents=True, exist_ok=True)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=str(target)))
        if folder is None:
            folder = local
        else:
            folder.parent.mkdir(parents=True, exist_ok=True)
            os.replace(local, folder)
    module = mlflow.pytorch.load_model(str(folder), map_location="cpu")
    served = served_type(module)
    tokenizer = json.loads((folder / "extra_files" / "tokenizer.json").read_text())
    layout = served.input_layout(module, tokenizer)
    with torch.inference_mode():
        dimension = int(module(torch.from_numpy(served.example_input(layout))).shape[1])
    log.info(
        "embed: model %s (%s) in %s: %s input, %d-d output",
        pinned,
        uri,
        folder,
        served.name,
        dimension,
    )
    return ModelSpec(
        pinned,
        name,
        version,
        str(folder),
        served.name,
        layout,
        dimension,
        batch_size,
        gpu_batch_size,
    )


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


_MODELS: dict[tuple[str, str], tuple[nn.Module, Vocabulary]] = {}


def cached_model(spec: ModelSpec, device: torch.device) -> tuple[nn.Module, Vocabulary, bool]:
    """The worker's model and vocabulary, loaded on first use; True when this call loaded."""
    key = (spec.folder, str(device))
    if key in _MODELS:
        return *_MODELS[key], False
    folder = (
        SparkFiles.get(spec.folder[len(SHIPPED) :])
        if spec.folder.startswith(SHIPPED)
        else spec.folder
    )
    module = mlflow.pytorch.load_model(folder, map_location=device).to(device).eval()
    vocabulary = Vocabulary.load(Path(folder) / "extra_files" / VOCABULARY_FILE)
    _MODELS[key] = (module, vocabulary)
    return module, vocabulary, True


def input_columns(spec: ModelSpec) -> list[str]:
    """The clean catalog columns the model reads."""
    return model_type(spec.model_type).input_columns(spec.layout)


def embed_batch(spec: ModelSpec, batch: pa.RecordBatch, device: torch.device,
                batch_size: int) -> np.ndarray:  # fmt: skip
    """float32 [rows, d] embeddings of one Arrow batch of clean-catalog rows (the columns
    `input_columns` names), with the process's copy of the model."""
    module, vocabulary, _ = cached_model(spec, device)
    inputs = model_type(spec.model_type).inputs(spec.layout, batch, vocabulary)
    return infer(module, inputs, batch_size, device)
