"""Where a Spark task runs its torch model: the one device rule every inference stage
(embed, image_features) follows, so a GPU Spark assigned is the GPU the model uses."""

from __future__ import annotations

import torch
from pyspark import TaskContext


def task_device() -> torch.device:
    """The GPU Spark assigned to this task (spark.task.resource.gpu.amount), else the CPU."""
    context = TaskContext.get()
    gpus = context.resources().get("gpu") if context is not None else None
    if gpus is not None and gpus.addresses and torch.cuda.is_available():
        return torch.device(f"cuda:{gpus.addresses[0]}")
    return torch.device("cpu")
