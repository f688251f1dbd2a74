"""One module per model type, named after its `train.model` value; each registers its
`ModelType` when imported (see `pipelines.model_types.registry`)."""

import pkgutil


def names() -> tuple[str, ...]:
    """Every model type, by the module names of this package (nothing is imported, so the
    configuration can check `train.model` without loading the training stack)."""
    return tuple(sorted(module.name for module in pkgutil.iter_modules(__path__)))
