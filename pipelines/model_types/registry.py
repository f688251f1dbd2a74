"""The model-type registry: `train.model` value -> `ModelType`. A type is the module of the same
name in `pipelines/model_types/kinds/`, imported the first time it is asked for; naming the
known types needs no import at all, so the configuration can check `train.model` cheaply."""

from __future__ import annotations

import importlib

from torch import nn

from pipelines.model_types import kinds
from pipelines.model_types.contract import ModelType

__all__ = ["model_type", "model_type_names", "model_type_of", "register"]

_TYPES: dict[str, ModelType] = {}


def register(model: ModelType) -> ModelType:
    """Called by a type's module when imported; the module must carry the type's name."""
    module = type(model).__module__.rsplit(".", 1)[-1]
    if model.name != module:
        raise RuntimeError(
            f"model type {model.name!r} is defined in module {module!r}: a "
            "model type lives in the module of its name"
        )
    _TYPES[model.name] = model
    return model


def model_type_names() -> tuple[str, ...]:
    """Every model type, by the module names in `pipelines/model_types/kinds/`."""
    return kinds.names()


def model_type(name: str) -> ModelType:
    """The model type called `name`; a ValueError naming the known ones otherwise."""
    if name not in _TYPES:
        if name not in model_type_names():
            raise ValueError(
                f"unknown model type {name!r}; model types are {', '.join(model_type_names())}"
            )
        importlib.import_module(f"{kinds.__name__}.{name}")
    return _TYPES[name]


def model_type_of(module: nn.Module) -> ModelType | None:
    """The type whose served form `module` is (by its class), None for a foreign module."""
    for name in model_type_names():
        candidate = model_type(name)
        if type(module) is candidate.encoder:
            return candidate
    return None
