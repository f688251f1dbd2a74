"""What a training run reports to MLflow from the driver (the only process that talks to it):
per-epoch metrics, learning curves, the run's result and its best epoch's metrics."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipelines.training.launch import Launch, train_model
from pipelines.training.loop import (
    HISTORY,
    LoopSpec,
    ModelFactory,
)
from pipelines.training.objectives import MultitaskObjective, ObjectiveFactory

__all__ = ["learning_curves", "log_history", "metric_key", "read_history", "train_and_log"]

log = logging.getLogger(__name__)


def read_history(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / HISTORY
    return json.loads(path.read_text()) if path.is_file() else []


def learning_curves(history: Sequence[Mapping[str, float]], title: str) -> Figure:
    """Total losses (train, validation) and each task's validation loss by epoch; epoch 0
    is the untrained model."""
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    total, tasks = figure.subplots(1, 2)
    tasks.set_prop_cycle(color=[colormaps["tab20"](i) for i in range(20)])
    for key in ("train_loss", "val_loss"):
        points = [(row["epoch"], row[key]) for row in history if key in row]
        if points:
            total.plot(*zip(*points, strict=True), marker="o", label=key)
    total.set(xlabel="epoch", ylabel="sum of normalised task losses", title=title)
    total.legend()
    # Per-task validation losses (1 = the label prior's loss), or a model's other parts.
    keys = {key for row in history for key in row if key.startswith("val_") and key != "val_loss"}
    parts = sorted(key for key in keys if key.endswith("_loss")) or sorted(keys)
    for key in parts:
        points = [(row["epoch"], row[key]) for row in history if key in row]
        tasks.plot(*zip(*points, strict=True), marker=".", label=key[4:].removesuffix("_loss"))
    tasks.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    tasks.set(
        xlabel="epoch",
        ylabel="validation loss (tasks: 1 = label prior)",
        title="validation loss by part",
        yscale="log",
    )
    tasks.legend(fontsize="small", ncol=2)
    for axes in (total, tasks):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


def metric_key(name: str) -> str:
    """MLflow metric/param names allow letters, digits, _ - . / and spaces."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def log_history(history: Sequence[Mapping[str, float]], prefix: str, title: str) -> None:
    """Per-epoch metrics (step = epoch) and the learning-curve picture."""
    for row in history:
        mlflow.log_metrics(
            {
                metric_key(f"{prefix}{key}"): value
                for key, value in row.items()
                if key != "epoch" and math.isfinite(value)
            },
            step=int(row["epoch"]),
        )
    if history:
        mlflow.log_figure(learning_curves(history, title), f"{prefix}learning_curves.png")


def train_and_log(
    launch: Launch,
    spec: LoopSpec,
    factory: ModelFactory,
    resume: bool,
    prefix: str,
    title: str,
    objective: ObjectiveFactory = MultitaskObjective,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Train, then log the history, also when training fails (what it reached is kept).
    Returns the result and the best epoch's metrics."""
    try:
        result = train_model(launch, spec, factory, resume, objective)
    finally:
        history = read_history(Path(spec.run_dir))
        log_history(history, prefix, title)
    mlflow.log_dict(result, f"{prefix}result.json")
    mlflow.log_params(
        {
            metric_key(f"{prefix}run.{key}"): result[key]
            for key in ("device", "backend", "mixed_precision", "world_size")
        }
    )
    best = next(row for row in history if row["epoch"] == result["best_epoch"])
    metrics = {
        f"best_{prefix}{key}": value
        for key, value in best.items()
        if key.startswith("val_") and math.isfinite(value)
    }
    metrics[f"{prefix}best_epoch"] = result["best_epoch"]
    metrics[f"{prefix}epochs_run"] = result["epochs_run"]
    speeds = [
        row["train_samples_per_second"] for row in history if "train_samples_per_second" in row
    ]
    if speeds:
        metrics[f"{prefix}median_train_samples_per_second"] = float(np.median(speeds))
    return result, {metric_key(key): value for key, value in metrics.items()}
