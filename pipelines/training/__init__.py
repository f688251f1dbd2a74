"""Data-parallel training: the shard loader, the per-process loop every DDP rank runs, the
objectives, how processes launch from Spark, the run's inputs and reporting, the Products-10K
fine-tuning recipe, and publishing a model to the MLflow registry."""
