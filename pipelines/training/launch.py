"""How training processes start, decided on the driver: in the driver itself (debugging),
through TorchDistributor in local mode on one machine, or in cluster mode with one process
per GPU slot; slots are checked before anything launches, so a barrier stage never waits
for slots that do not exist. Rank 0's files, not TorchDistributor's return value, say
how training ended."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pyspark.sql import SparkSession

from pipelines.core.config import TrainConfig
from pipelines.core.devices import torch_threads
from pipelines.core.errors import TrainingError
from pipelines.training.loop import (
    BEST,
    HISTORY,
    LAST,
    PROGRESS,
    RESULT,
    LoopSpec,
    ModelFactory,
    train_process,
)
from pipelines.training.objectives import MultitaskObjective, ObjectiveFactory

__all__ = ["Launch", "is_local_master", "local_cores", "plan_launch", "progress_bar", "train_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launch:
    """How the training processes start, decided on the driver before anything runs."""

    mode: Literal["driver", "local", "cluster"]
    processes: int
    use_gpu: bool  # TorchDistributor's use_gpu: Spark assigns the processes' GPUs
    threads: int  # torch intra-op threads per process


def local_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def is_local_master(spark: SparkSession) -> bool:
    """Spark local mode, by TorchDistributor's own rule."""
    master = spark.sparkContext.master or ""
    return master == "local" or master.startswith("local[")


def _cluster_slots(spark: SparkSession, use_gpu: bool) -> tuple[int, str]:
    """Training processes a cluster can run at once, and how that number was found."""
    conf = spark.sparkContext.getConf()
    task_cpus = int(conf.get("spark.task.cpus", "1") or 1)
    executors = int(
        conf.get("spark.executor.instances", None)
        or conf.get("spark.dynamicAllocation.maxExecutors", "0")
        or 0
    )
    task_slots = spark.sparkContext.defaultParallelism // task_cpus
    if not use_gpu:
        return task_slots, "task slots (default parallelism / spark.task.cpus)"
    task_gpus = int(float(conf.get("spark.task.resource.gpu.amount", "1") or 1))
    executor_gpus = int(float(conf.get("spark.executor.resource.gpu.amount", "0") or 0))
    if executors:
        per_executor = max(executor_gpus // task_gpus, 1) * task_gpus
        return executors * per_executor, (
            f"GPU slots ({executors} executors x {per_executor} GPUs)"
        )
    return task_slots * task_gpus, "GPU slots (task slots x spark.task.resource.gpu.amount)"


def plan_launch(spark: SparkSession, settings: TrainConfig) -> Launch:
    """Choose driver / local / cluster launch and check the slots before launching."""
    cores, wanted = local_cores(), settings.num_processes
    if not settings.distributed or wanted == 1:
        if settings.device == "cuda" and not torch.cuda.is_available():
            raise TrainingError("train.device is 'cuda' but the driver sees no GPU")
        return Launch("driver", 1, False, settings.threads_per_process or cores)
    if is_local_master(spark):
        if settings.device == "cuda" and not torch.cuda.is_available():
            raise TrainingError("train.device is 'cuda' but this machine shows no GPU")
        cuda = settings.device != "cpu" and torch.cuda.is_available()
        slots, what = (
            (torch.cuda.device_count(), "GPUs on this machine")
            if cuda
            else (cores, "CPU cores on this machine")
        )
        # TorchDistributor's use_gpu needs GPUs given to the Spark driver as resources;
        # without them each process still takes GPU LOCAL_RANK itself.
        use_gpu = cuda and "gpu" in spark.sparkContext.resources
        threads = settings.threads_per_process or max(1, cores // wanted)
    else:
        conf = spark.sparkContext.getConf()
        task_gpus = float(conf.get("spark.task.resource.gpu.amount", "0") or 0)
        use_gpu = settings.device != "cpu" and task_gpus >= 1
        if settings.device == "cuda" and not use_gpu:
            raise TrainingError(
                "train.device is 'cuda' but spark.task.resource.gpu.amount is "
                "not set: the cluster gives the training tasks no GPU"
            )
        slots, what = _cluster_slots(spark, use_gpu)
        threads = settings.threads_per_process or int(conf.get("spark.task.cpus", "1") or 1)
    if wanted > slots:
        raise TrainingError(
            f"train.num_processes={wanted} but there are only {slots} {what}: "
            "lower train.num_processes"
        )
    mode: Literal["local", "cluster"] = "local" if is_local_master(spark) else "cluster"
    return Launch(mode, wanted, use_gpu, threads)


@contextmanager
def progress_bar(run_dir: Path, enabled: bool) -> Iterator[None]:
    """Draw rank 0's `progress.json` as a bar on the driver's terminal while training runs:
    TorchDistributor pipes the processes' output, so they cannot draw one themselves."""
    if not enabled:
        yield
        return
    from tqdm import tqdm

    done = threading.Event()

    def draw() -> None:
        bar = None
        while not done.wait(0.5):
            try:
                state = json.loads((run_dir / PROGRESS).read_text())
            except (OSError, ValueError):
                continue
            bar = bar or tqdm(file=sys.stderr, unit="step", leave=False, dynamic_ncols=True)
            bar.total, bar.n = state["steps"], state["step"]
            bar.set_description(f"epoch {state['epoch']}/{state['epochs']}")
        if bar is not None:
            bar.close()

    thread = threading.Thread(target=draw, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def train_model(
    launch: Launch,
    spec: LoopSpec,
    factory: ModelFactory,
    resume: bool = True,
    objective: ObjectiveFactory = MultitaskObjective,
) -> dict[str, Any]:
    """Run the loop as planned and return rank 0's result (from `result.json`); without
    `resume`, an earlier run's checkpoints are removed first."""
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stale = [RESULT, PROGRESS] if resume else [RESULT, PROGRESS, LAST, BEST, HISTORY]
    for name in stale:
        (run_dir / name).unlink(missing_ok=True)
    with progress_bar(run_dir, spec.progress):
        if launch.mode == "driver":
            with torch_threads(spec.threads):
                train_process(spec, factory, objective)
        else:
            from pyspark.ml.torch.distributor import TorchDistributor

            log.info(
                "launching %d training processes (%s mode, use_gpu=%s, %d threads each)",
                launch.processes,
                launch.mode,
                launch.use_gpu,
                launch.threads,
            )
            TorchDistributor(
                num_processes=launch.processes,
                local_mode=launch.mode == "local",
                use_gpu=launch.use_gpu,
            ).run(train_process, spec, factory, objective)
    result_file = run_dir / RESULT
    if not result_file.is_file():
        raise TrainingError(f"training ended without writing {result_file}")
    return json.loads(result_file.read_text())
