"""Publishing a trained model: the files that travel with it (vocabulary, tokenizer description,
label maps), its MLflow logging with a signature, registration and the `candidate` alias."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.models import infer_signature
from torch import nn

from models.mrnet import PAD_ID
from pipelines.data.tokenizer import FIRST_WORD_ID, OOV_ID, SEPARATOR, VOCABULARY_FILE
from pipelines.training.loop import (
    save_json,
)

__all__ = ["CANDIDATE", "export_files", "log_and_register"]

log = logging.getLogger(__name__)

CANDIDATE = "candidate"


def export_files(
    shard_dir: Path, out: Path, manifests: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """What travels with the model: the vocabulary, how text becomes ids, the label maps."""
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(manifests.values()))
    vocabulary = out / VOCABULARY_FILE
    vocabulary.write_bytes((shard_dir / first["vocabulary"]["path"]).read_bytes())
    save_json(
        out / "tokenizer.json",
        {
            "format": "prodvec.tokenizer/1",
            "tokenize": "pipelines.data.tokenizer.tokenize",
            "normalise": "pipelines.data.text.normalize_text (the clean stage)",
            "separator": SEPARATOR,
            "pad_id": PAD_ID,
            "oov_id": OOV_ID,
            "first_word_id": FIRST_WORD_ID,
            "vocabulary": vocabulary.name,
            "max_len": first["max_len"]["title"],
            "fields": first["max_len"],  # ProductNet: every text field's ids (bullets: joined)
            "input": "ids of the first max_len tokens of the normalised title, 0-padded at the end",
            # The title's subword ids (pipelines.data.subwords), when the model reads them.
            "subwords": first.get("subwords"),
        },
    )
    save_json(
        out / "labels.json",
        {
            group: [
                {
                    key: task[key]
                    for key in ("name", "kind", "source", "num_outputs", "labels", "stats")
                }
                for task in manifest["tasks"]
            ]
            for group, manifest in manifests.items()
        },
    )
    return [str(out / name) for name in (VOCABULARY_FILE, "tokenizer.json", "labels.json")]


def log_and_register(
    module: nn.Module,
    example: np.ndarray,
    name: str,
    extra_files: list[str],
    metadata: dict[str, Any],
) -> tuple[str, int]:
    """Log the model with its signature, register it, alias the new version `candidate`.

    Pickled, not MLflow's default `pt2`: torch.export cannot trace the packed LSTM (its
    shapes depend on the title lengths), so loading needs prodvec importable.
    """
    module = module.cpu().eval()
    with torch.no_grad():
        output = module(torch.from_numpy(example)).numpy()
    torch_version = torch.__version__.split("+")[0]
    info = mlflow.pytorch.log_model(
        module,
        name="model",
        signature=infer_signature(example, output),
        input_example=example,
        extra_files=extra_files,
        registered_model_name=name,
        serialization_format="pickle",
        pip_requirements=[
            f"torch=={torch_version}",
            f"mlflow=={mlflow.__version__}",
            f"numpy=={np.__version__}",
            "prodvec",
        ],
        metadata=metadata,
    )
    version = info.registered_model_version
    MlflowClient().set_registered_model_alias(name, CANDIDATE, str(version))
    log.info("registered %s version %s (alias %s)", name, version, CANDIDATE)
    return info.model_uri, int(version)
