"""prodvec: batch product embeddings on Apache Spark.

Packages by role, data flowing one way through the stages:
- `stages`: one module per Spark job (clean -> image_features -> corpus -> shard -> train ->
  embed -> index -> evaluate) and the registry that runs them;
- `core`: configuration, errors, Spark and MLflow plumbing, output locations;
- `data`: text normalisation, the tokenizer, the clean-catalog and shard-set contracts, the
  synthetic catalog;
- `tasks`: the task-kind registry (labels, losses, metrics per kind);
- `model_types`: the model-type registry (what train, embed and evaluate need per model);
- `training`: the data-parallel training machinery (loader, loop, launch, publishing);
- `table`: the versioned embedding table and its faiss indexes;
- `analysis`: retrieval metrics, probes, pictures, drift, annotation helpers.
PyTorch model definitions live apart, in the top-level `models` package.
"""
