"""Torch inside a Spark task: the device rule and the chunked forward pass every inference
stage (embed, image_features) shares, so a GPU Spark assigned is the GPU the model uses and
a CPU task does not oversubscribe its core; and `torch_threads` for torch work in the driver."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from pyspark import TaskContext
from torch import nn

__all__ = ["infer", "task_device", "task_inference", "torch_threads"]


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count for the block, the driver's own restored after. Small
    models want 1: on a busy machine a second thread spins more than it works (the
    cross-locale autoencoder's epoch took 24 s on 2 threads and 1 s on one, both cores busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def task_device() -> torch.device:
    """The GPU Spark assigned to this task (spark.task.resource.gpu.amount), else the CPU."""
    context = TaskContext.get()
    gpus = context.resources().get("gpu") if context is not None else None
    if gpus is not None and gpus.addresses and torch.cuda.is_available():
        return torch.device(f"cuda:{gpus.addresses[0]}")
    return torch.device("cpu")


def task_inference(cpu_batch_size: int, gpu_batch_size: int) -> tuple[torch.device, int]:
    """(this task's device, its forward-pass batch size); one torch thread on a CPU task,
    since Spark already runs one task per core."""
    device = task_device()
    if device.type == "cpu":
        torch.set_num_threads(1)
        return device, cpu_batch_size
    return device, gpu_batch_size


def infer(
    module: nn.Module, inputs: np.ndarray, batch_size: int, device: torch.device
) -> np.ndarray:
    """float32 [rows, d] in `batch_size` chunks, flattened after the row dimension; no
    autograd state is kept."""
    parts = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            chunk = torch.from_numpy(inputs[start : start + batch_size]).to(device)
            parts.append(module(chunk).flatten(1).float().cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
