"""The per-process training loop: the one function every DDP rank runs when TorchDistributor
launches it, and that the single-process debugging path runs in the driver.

It is model-agnostic: it takes a model factory (manifest, tasks -> an nn.Module whose
`forward(batch, tasks=None)` returns one output per task) and an objective factory (tasks ->
an nn.Module with `tasks`, `calibrate(batches)` and `forward(outputs, batch, task) -> (total,
per-task losses)`), so the ProductNet master model (models/productnet.py) reuses it with its own factory, and its
Products-10K fine-tuning with `AccuracyObjective`.

What it does per process: pick the device (CUDA by LOCAL_RANK when visible) and the backend
(NCCL on GPUs, gloo on CPUs) at run time, wrap the model in DDP, autocast on CUDA, validate
every epoch (per-task metrics computed from statistics summed over ranks, so every rank takes
the same early-stopping decision), and checkpoint.

Only rank 0 writes, into the run folder, each file atomically (temp file + rename):
`last.pt` (to resume; every epoch and every `checkpoint_every_steps` steps), `best.pt` (the
epoch with the lowest validation loss), `history.json` (per-epoch metrics), `progress.json`
(for the driver's progress bar, at most once a second) and, at the end, `result.json`. The
driver reads them: TorchDistributor's return value is whichever rank finished last, so this
function returns nothing. Checkpoints hold only tensors, numbers, strings, lists and dicts,
so `torch.load(path, weights_only=True)` reads them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from models.mrnet import EMBEDDING
from pipelines.core.errors import TrainingError
from pipelines.data.shards import load_manifest
from pipelines.tasks import TaskMetrics, task_heads
from pipelines.training.contrastive import ContrastiveSpec, info_nce, join_views, view
from pipelines.training.loader import make_loader
from pipelines.training.objectives import ObjectiveFactory, sample_task

__all__ = [
    "CHECKPOINT_FORMAT",
    "PROGRESS",
    "Batch",
    "LoopSpec",
    "ModelFactory",
    "Ranks",
    "Trainer",
    "atomic_write",
    "exit_with_driver",
    "load_checkpoint",
    "parameter_digest",
    "resolve_device",
    "save_json",
    "save_torch",
    "train_process",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "prodvec.checkpoint/1"
LAST, BEST, HISTORY, RESULT = "last.pt", "best.pt", "history.json", "result.json"
PROGRESS = "progress.json"
Batch = dict[str, Tensor]


# (shard set folder, task heads, init_from=None) -> the model; picklable, it crosses to the
# training processes. Its forward(batch, tasks=None) returns {task: output, EMBEDDING: ...}.
ModelFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class LoopSpec:
    """Everything a training process needs, picklable (it crosses to TorchDistributor's
    processes). `fingerprint` names what is trained: a checkpoint with another one is not
    resumed."""

    shard_dir: str
    run_dir: str
    fingerprint: str
    epochs: int
    batch_size: int
    lr: float
    seed: int
    tasks: tuple[str, ...] = ()
    optimisation: Literal["joint", "alternating"] = "joint"
    weight_decay: float = 0.0
    grad_clip: float | None = None
    select_by: str = "val_loss"  # minimised when it ends in "loss", else maximised
    patience: int = 3
    min_delta: float = 0.0
    max_steps_per_epoch: int | None = None
    checkpoint_every_steps: int = 0
    calibration_batches: int = 20
    contrastive: ContrastiveSpec | None = None  # the contrastive objective, when weighted
    top_k: tuple[int, ...] = (1, 3, 5)  # multiclass top-k accuracies in validation
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: bool = True
    threads: int = 1
    loader_workers: int = 0
    progress: bool = False  # rank 0 writes progress.json for the driver's progress bar
    driver_pid: int | None = None  # local mode: the driver on this machine, watched (see below)


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temp file in the same folder, fsync, then rename: a reader (or a
    resume after a kill) sees the old file or the new one, never half of one."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def save_torch(path: Path, payload: Mapping[str, Any]) -> None:
    atomic_write(path, lambda handle: torch.save(dict(payload), handle))


def save_json(path: Path, payload: Any) -> None:
    def write(handle: IO[bytes]) -> None:
        handle.write(json.dumps(payload, indent=1).encode())

    atomic_write(path, write)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint this loop wrote, read with weights_only=True (no code runs on load)."""
    state = torch.load(path, map_location=device, weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not a prodvec checkpoint ({state.get('format')!r})")
    return state


# ---------------------------------------------------------------------------------------
# Processes and devices
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in the run."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> Ranks:
        """torchrun's variables; none set means the single-process path."""
        return cls(
            int(os.environ.get("RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")),
        )


def resolve_device(preference: str, local_rank: int) -> torch.device:
    """CUDA device `local_rank` when this process sees GPUs (TorchDistributor narrows
    CUDA_VISIBLE_DEVICES to a task's own GPUs), else the CPU; `cuda` insists on a GPU."""
    if preference != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    if preference == "cuda":
        raise TrainingError(
            "train.device is 'cuda' but this process sees no GPU "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    return torch.device("cpu")


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes: equal on all ranks iff DDP kept them in sync."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


class Trainer:
    """One process's share of a training run; `fit` runs it to the end."""

    def __init__(
        self,
        spec: LoopSpec,
        ranks: Ranks,
        device: torch.device,
        model_factory: ModelFactory,
        objective_factory: ObjectiveFactory,
    ) -> None:
        self.spec, self.ranks, self.device = spec, ranks, device
        self.run_dir = Path(spec.run_dir)
        self.manifest = load_manifest(Path(spec.shard_dir))
        self.tasks = task_heads(self.manifest, spec.tasks)
        if not self.tasks and spec.contrastive is None:
            raise TrainingError(
                "nothing to train: the shards have no task and train.contrastive.weight is 0"
            )
        self.alternating = spec.optimisation == "alternating"
        torch.manual_seed(spec.seed)  # the same initial weights on every rank
        self.module = model_factory(Path(spec.shard_dir), self.tasks).to(device)
        self.objective = objective_factory(self.tasks)
        self.parameters = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=spec.lr, weight_decay=spec.weight_decay
        )
        self.amp_dtype: torch.dtype | None = None
        if device.type == "cuda" and spec.mixed_precision:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.task_generator = torch.Generator().manual_seed(spec.seed)
        self.contrastive = spec.contrastive
        # Views are drawn from their own generator (seeded by rank, so ranks draw differently
        # for their different rows): checkpointed with the rest of the random state.
        self.view_generator = torch.Generator().manual_seed(
            (spec.contrastive.seed if spec.contrastive else 0) + ranks.rank
        )
        self.epoch = self.step = self.global_step = 0
        self.best, self.best_epoch, self.bad_epochs, self.stopped = math.inf, -1, 0, False
        self.history: list[dict[str, float]] = []
        # This epoch's loss sums (total, per task, contrastive) weighted by rows, then the
        # rows: real rows for the total and the contrastive loss (padding batches do not
        # count), labelled rows for each task.
        self.parts = len(self.tasks) + 2
        self.running = torch.zeros(2 * self.parts, dtype=torch.float64, device=device)
        self.resumed_from: dict[str, int] | None = None
        self.steps_this_run = 0
        self.reported = 0.0  # when progress.json was last written
        self.train_seconds = self.epoch_seconds = 0.0  # the whole run's, this epoch's
        self.model: nn.Module = self.module
        if ranks.world_size > 1:
            self.model = DistributedDataParallel(
                self.module,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=self.alternating,
            )  # alternating: one head a step

    @property
    def main(self) -> bool:
        return self.ranks.rank == 0

    # -- state ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        rng = {
            "torch": torch.get_rng_state(),
            "tasks": self.task_generator.get_state(),
            "views": self.view_generator.get_state(),
        }
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.spec.fingerprint,
            "model": self.module.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
            "world_size": self.ranks.world_size,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "stopped": self.stopped,
            "history": self.history,
            "running": self.running.cpu(),
            "train_seconds": self.train_seconds,
            "epoch_seconds": self.epoch_seconds,
            "rng": rng,
        }

    def restore(self) -> bool:
        """Continue from `last.pt` when it is this training setup's; False to start fresh."""
        path = self.run_dir / LAST
        if not path.is_file():
            return False
        state = load_checkpoint(path, self.device)
        if state["fingerprint"] != self.spec.fingerprint:
            if self.main:
                log.warning("%s is from another training setup: starting fresh", path)
            return False
        self.module.load_state_dict(state["model"])
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when the checkpoint's run did not scale (CPU, bf16)
            self.scaler.load_state_dict(state["scaler"])
        for key in (
            "epoch",
            "step",
            "global_step",
            "best",
            "best_epoch",
            "bad_epochs",
            "stopped",
            "history",
            "train_seconds",
            "epoch_seconds",
        ):
            setattr(self, key, state[key])
        self.running = state["running"].to(self.device)
        torch.set_rng_state(state["rng"]["torch"].cpu())
        self.task_generator.set_state(state["rng"]["tasks"].cpu())
        self.view_generator.set_state(state["rng"]["views"].cpu())
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)
        self.resumed_from = {
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
        }
        if self.step and state["world_size"] != self.ranks.world_size:
            # Ranks' shares of an epoch depend on the world size: redo this epoch whole.
            if self.main:
                log.warning(
                    "resuming with %d processes, checkpoint has %d: epoch %d restarts",
                    self.ranks.world_size,
                    state["world_size"],
                    self.epoch + 1,
                )
            self.global_step -= self.step
            self.step = 0
            self.running.zero_()
            self.epoch_seconds = 0.0
        return True

    def save(self, path: Path) -> None:
        if self.main:
            save_torch(path, self.state())

    # -- training ------------------------------------------------------------------------

    def loader(
        self,
        split: str,
        epoch: int = 0,
        start_step: int = 0,
        *,
        sharded: bool = True,
        shuffle: bool | None = None,
    ) -> torch.utils.data.DataLoader:
        rank, world = (self.ranks.rank, self.ranks.world_size) if sharded else (0, 1)
        return make_loader(
            self.spec.shard_dir,
            split,
            self.spec.batch_size,
            seed=self.spec.seed,
            epoch=epoch,
            start_step=start_step,
            shuffle=shuffle,
            rank=rank,
            world_size=world,
            num_workers=self.spec.loader_workers,
            pin_memory=self.device.type == "cuda",
        )

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, batch: Batch) -> Batch:
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    def calibrate(self) -> None:
        """Every rank calibrates on the same first train batches (unsharded, unshuffled), so
        all ranks optimise one objective without a broadcast."""
        batches = itertools.islice(
            self.loader("train", sharded=False, shuffle=False), self.spec.calibration_batches
        )
        self.objective.calibrate(batches)

    def forward(self, batch: Batch, task: str | None, generator: torch.Generator
                ) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:  # fmt: skip
        """(total loss, per-task losses, contrastive loss or None) of one batch. With the
        contrastive objective the model runs once over both views; the heads learn from the
        first view (a mildly noised copy of the batch)."""
        tasks = None if task is None else [task]
        if self.contrastive is None:
            outputs = self.model(batch, tasks=tasks)
            total, per_task = self.objective(outputs, batch, task)
            return total, per_task, None
        rows = len(batch["row_id"])
        joined = join_views(view(batch, self.contrastive, generator),
                            view(batch, self.contrastive, generator))  # fmt: skip
        outputs = self.model(joined, tasks=tasks)
        embedding = outputs.pop(EMBEDDING)
        total, per_task = self.objective({k: v[:rows] for k, v in outputs.items()}, batch, task)
        contrastive = info_nce(embedding[:rows], embedding[rows:], self.contrastive.temperature,
                               batch["row_id"] >= 0)  # fmt: skip
        return total + self.contrastive.weight * contrastive, per_task, contrastive

    def train_step(self, batch: Batch) -> None:
        task = (
            sample_task(self.task_generator, self.tasks)
            if self.alternating and self.tasks
            else None
        )
        with self.autocast():
            total, per_task, contrastive = self.forward(batch, task, self.view_generator)
        # set_to_none: a zero gradient would still move Adam's state for the idle heads
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.spec.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.parameters, self.spec.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        parts = self.parts
        real = (batch["row_id"] >= 0).sum()
        self.running[0] += total.detach().double() * real
        self.running[parts] += real
        for index, t in enumerate(self.tasks, start=1):
            if t.name in per_task:  # alternating: only the sampled task
                labelled = batch[f"{t.name}_mask"].sum()
                self.running[index] += per_task[t.name].double() * labelled
                self.running[parts + index] += labelled
        if contrastive is not None:
            self.running[parts - 1] += contrastive.detach().double() * real
            self.running[2 * parts - 1] += real

    def report(self, steps: int, force: bool = False) -> None:
        """Rank 0's position for the driver's progress bar, at most once a second."""
        if not (self.spec.progress and self.main):
            return
        now = time.monotonic()
        if force or now - self.reported >= 1.0:
            self.reported = now
            save_json(
                self.run_dir / PROGRESS,
                {
                    "epoch": self.epoch + 1,
                    "epochs": self.spec.epochs,
                    "step": self.step,
                    "steps": steps,
                },
            )

    def train_epoch(self) -> dict[str, float]:
        loader = self.loader("train", self.epoch, self.step)
        limit = len(loader) + self.step
        if self.spec.max_steps_per_epoch is not None:
            limit = min(limit, self.spec.max_steps_per_epoch)
        self.report(limit, force=True)
        self.module.train()
        started = time.perf_counter()
        for batch in loader:
            if self.step >= limit:
                break
            self.train_step(self.to_device(batch))
            self.step += 1
            self.global_step += 1
            self.steps_this_run += 1
            self.report(limit)
            every = self.spec.checkpoint_every_steps
            if every and self.global_step % every == 0 and self.step < limit:
                self.clock(started)
                self.save(self.run_dir / LAST)
                started = time.perf_counter()
        running = self.running.clone()
        if self.ranks.world_size > 1:
            dist.all_reduce(running)  # also waits for every rank: the epoch's true end
        self.clock(started)
        sums, rows = running[: self.parts].tolist(), running[self.parts :].tolist()
        metrics = {"train_loss": sums[0] / max(rows[0], 1)}
        if self.contrastive is not None:
            metrics["train_contrastive_loss"] = sums[-1] / max(rows[-1], 1)
        for task, total, labelled in zip(self.tasks, sums[1:-1], rows[1:-1], strict=True):
            if labelled:
                metrics[f"train_{task.name}_loss"] = total / labelled
        metrics["train_samples_per_second"] = rows[0] / max(self.epoch_seconds, 1e-9)
        return metrics

    def clock(self, started: float) -> None:
        """Count training time since `started` (checkpoint writes and validation excluded)."""
        seconds = time.perf_counter() - started
        self.train_seconds += seconds
        self.epoch_seconds += seconds

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Per-task metrics on the validation split, each rank reading its share."""
        self.module.eval()
        states = [TaskMetrics(task, self.device, self.spec.top_k) for task in self.tasks]
        # The contrastive loss of validation batches, over the same views every epoch.
        views = torch.Generator().manual_seed(self.spec.seed + self.ranks.rank)
        contrastive = torch.zeros(2, dtype=torch.float64, device=self.device)  # sum, rows
        loader = self.loader("validation", shuffle=False)
        for batch in loader:
            batch = self.to_device(batch)
            with self.autocast():
                outputs = self.module(batch)
                _, per_task = self.objective(outputs, batch)
                if self.contrastive is not None:
                    _, _, loss = self.forward(batch, None, views)
                    real = (batch["row_id"] >= 0).sum()
                    assert loss is not None  # the contrastive objective is on
                    contrastive += torch.stack([loss.detach().double() * real, real.double()])
            for state in states:
                name = state.head.name
                state.update(outputs[name], batch[name], batch[f"{name}_mask"], per_task[name])
        if self.ranks.world_size > 1:
            for state in states:
                dist.all_reduce(state.stats)
            dist.all_reduce(contrastive)
        self.module.train()
        metrics: dict[str, float] = {}
        for state in states:
            metrics.update(
                {f"val_{state.head.name}_{key}": value for key, value in state.compute().items()}
            )
        metrics["val_loss"] = sum(metrics.get(f"val_{t.name}_loss", 0.0) for t in self.tasks)
        if self.contrastive is not None:
            loss, rows = contrastive.tolist()
            metrics["val_contrastive_loss"] = loss / max(rows, 1)
            metrics["val_loss"] += self.contrastive.weight * metrics["val_contrastive_loss"]
        return metrics

    def selection_score(self, row: dict[str, float]) -> float:
        """The epoch's `select_by` figure as a loss (lower is better)."""
        name = self.spec.select_by
        if name not in row:
            figures = ", ".join(sorted(key for key in row if key.startswith("val_")))
            raise TrainingError(
                f"train.select_by {name!r} is not a validation figure of this model: "
                f"it reports {figures}"
            )
        return row[name] if name.endswith("loss") else -row[name]

    def end_epoch(self, row: dict[str, float]) -> None:
        """Record the epoch, keep the best model, decide on early stopping (rank 0's view,
        broadcast so that every rank stops at the same epoch)."""
        self.history.append(row)
        score = self.selection_score(row)
        improved = score < self.best - self.spec.min_delta
        if improved:
            self.best, self.best_epoch, self.bad_epochs = score, self.epoch, 0
        else:
            self.bad_epochs += 1
        stop = torch.tensor([float(self.bad_epochs >= self.spec.patience)], device=self.device)
        if self.ranks.world_size > 1:
            dist.broadcast(stop, 0)
        self.stopped = bool(stop.item())
        if self.main:
            log.info(
                "epoch %d: %s",
                self.epoch,
                ", ".join(
                    f"{key} {value:.4g}"
                    for key, value in row.items()
                    if key in ("train_loss", "val_loss", "train_samples_per_second")
                ),
            )
            if improved:
                save_torch(
                    self.run_dir / BEST,
                    {
                        "format": CHECKPOINT_FORMAT,
                        "fingerprint": self.spec.fingerprint,
                        "model": self.module.state_dict(),
                        "objective": self.objective.state_dict(),
                        "epoch": self.epoch,
                        "val_loss": row["val_loss"],
                    },
                )
            save_json(self.run_dir / HISTORY, self.history)

    def fit(self) -> None:
        resumed = self.restore()
        if not resumed:
            self.calibrate()
        self.objective.to(self.device)
        if not resumed:  # epoch 0: the untrained model, where the learning curves start
            self.end_epoch({"epoch": 0, **self.validate()})
            self.save(self.run_dir / LAST)
        while not self.stopped and self.epoch < self.spec.epochs:
            row = {"epoch": self.epoch + 1, **self.train_epoch()}
            if not math.isfinite(row["train_loss"]):
                raise TrainingError(
                    f"training loss is {row['train_loss']} in epoch "
                    f"{self.epoch + 1}: lower train.lr or set grad_clip"
                )
            row.update(self.validate())
            row["lr"] = self.spec.lr
            self.epoch += 1
            self.step = 0
            self.running.zero_()
            self.epoch_seconds = 0.0
            self.end_epoch(row)
            self.save(self.run_dir / LAST)
        self.finish()

    def finish(self) -> None:
        """Check that the replicas agree, then rank 0 writes the result."""
        digests = [parameter_digest(self.module)]
        if self.ranks.world_size > 1:
            gathered: list[Any] = [None] * self.ranks.world_size
            dist.all_gather_object(gathered, digests[0])
            digests = gathered
        if self.main:
            best = next(row for row in self.history if row["epoch"] == self.best_epoch)
            save_json(
                self.run_dir / RESULT,
                {
                    "fingerprint": self.spec.fingerprint,
                    "epochs_run": self.epoch,
                    "global_step": self.global_step,
                    "best_epoch": self.best_epoch,
                    "selected_by": self.spec.select_by,
                    "best_val_loss": best["val_loss"],
                    "best_selected": best[self.spec.select_by],
                    "stopped_early": self.stopped,
                    "resumed_from": self.resumed_from,
                    "steps_this_run": self.steps_this_run,
                    "world_size": self.ranks.world_size,
                    "device": str(self.device),
                    "backend": dist.get_backend() if self.ranks.world_size > 1 else None,
                    "mixed_precision": str(self.amp_dtype) if self.amp_dtype else None,
                    "train_seconds": self.train_seconds,
                    "replica_digests": digests,
                },
            )
        if len(set(digests)) > 1:
            raise TrainingError(f"DDP replicas diverged: parameter digests {digests}")


def exit_with_driver(driver_pid: int, every_seconds: float = 2.0) -> threading.Thread:
    """End this process when the driver process is gone. In local mode torchrun's processes
    are the driver's grandchildren: a driver killed with SIGKILL (a scheduler's timeout, the
    OOM killer) cannot stop them, and they would train on, holding cores and a port."""

    def watch() -> None:
        while True:
            time.sleep(every_seconds)
            try:
                os.kill(driver_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                continue  # a process of another user holds the id: still alive

    watcher = threading.Thread(target=watch, name="exit-with-driver", daemon=True)
    watcher.start()
    return watcher


def train_process(
    spec: LoopSpec, model_factory: ModelFactory, objective_factory: ObjectiveFactory
) -> None:
    """The training function: runs in each TorchDistributor process, or once in the driver.
    Results are the files in `spec.run_dir` (written by rank 0), never the return value."""
    ranks = Ranks.from_env()
    if "LOCAL_RANK" in os.environ:  # launched by torchrun: its stdout reaches the driver's
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s rank {ranks.rank}: %(message)s", "%H:%M:%S")
        )
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
        if spec.driver_pid is not None:
            exit_with_driver(spec.driver_pid)
    torch.set_num_threads(spec.threads)
    device = resolve_device(spec.device, ranks.local_rank)
    Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
    if ranks.world_size > 1:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            rank=ranks.rank,
            world_size=ranks.world_size,
        )
    try:
        Trainer(spec, ranks, device, model_factory, objective_factory).fit()
    finally:
        if ranks.world_size > 1:
            dist.destroy_process_group()
