"""Model types (`train.model`): what train, embed and evaluate need to know about each kind of
model (`contract`), one module per type in `kinds/`, found by `registry`.

Where to add a model type: a new module in `pipelines/model_types/kinds/` (see the README's
development section). This package's face imports nothing, so the configuration can list
the types (`kinds.names`) without loading the training stack.
"""
