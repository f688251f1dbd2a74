"""Training data loader: the shard stage's Parquet files -> contract batches, each training row
exactly once per epoch across every rank and worker.

Why our own loader: Petastorm does not run on this stack (see the README), a plain
`pyarrow.dataset` scan has no notion of ranks, workers, shuffling or resuming, and HF
`datasets` streaming read these shards at under a fifth of this loader's rate
(bench/loader.py). The loader is a torch `IterableDataset` over pyarrow row-group reads.

How a split is shared out, computed identically in every process from the manifest alone
(so every rank must use the same num_workers, batch_size and seed):
- units are the (file, row group) pairs; each epoch they are shuffled by (seed, epoch) and
  dealt round-robin to the world_size x num_workers readers (reader = rank * num_workers +
  worker), so every unit, hence every row, is read by exactly one reader;
- a reader gathers consecutive units into windows of at least `buffer_rows` rows, permutes
  each window by (seed, epoch, reader, window) and cuts its row stream into batches of
  `batch_size` (its last batch may be short); conversion to batch arrays is vectorised
  over a whole window, batches are gathered from it by index;
- `row_id` is the row's position in the split (files in manifest order, then row groups,
  then rows), so exactly-once can be checked from batches alone.

DDP needs every rank to run the same number of steps, and uneven row groups give ranks
unequal shares. Rows are never dropped: with `equal_steps` (the default when world_size > 1)
a rank with fewer batches ends its epoch with padding batches: every task mask False,
row_id -1, zero ids of length 1, image_missing True. `steps_per_epoch()` (= len(loader)) is
the step count every rank yields, known before the epoch. A loss must give an all-masked
batch zero (masked labels already require it: not every product has every label), and
metrics must skip row_id -1.

Resume: `start_step` (a rank's batches already consumed this epoch, with the same
world_size, num_workers, batch_size and seed) skips whole batches. The DataLoader takes
batches from its workers round-robin, so the loader replays that order to know how many
batches each worker's stream has given and which stream is next; windows before the skip
point are never read.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.core.errors import ShardError
from pipelines.data.shards import SPLITS, BatchField, load_manifest
from pipelines.tasks import kind_of

__all__ = [
    "SHARED_MEMORY_BYTES",
    "Arrays",
    "Batch",
    "Block",
    "Packed",
    "ShardDataset",
    "ShardLoader",
    "Unit",
    "as_tensors",
    "fields_of",
    "make_loader",
    "pack",
    "pad_arrays",
    "resume_point",
    "to_arrays",
    "unpack",
]

Arrays = dict[str, np.ndarray]  # a batch as the dataset yields it
# Batches above this size leave a worker in one shared-memory buffer, smaller ones pickled
# through its pipe: on the 2-core dev machine shared memory costs ~4 ms a segment and the
# pipe ~5 ms a MB, so they cross near 1 MB (bench/loader.py, batch 256 = 0.7 MB).
SHARED_MEMORY_BYTES = 1 << 20
Batch = dict[str, torch.Tensor]  # a batch as the loader gives it (the contract)


@dataclass(frozen=True)
class Unit:
    """One row group: the unit of sharing and of reading."""

    file: int
    row_group: int
    rows: int
    first_row: int  # row_id of its first row


def fields_of(manifest: dict[str, Any]) -> list[BatchField]:
    """The batch layout the manifest describes (the shared contract)."""
    fields = []
    for name, columns in manifest["text_fields"].items():
        fields.append(
            BatchField(
                columns["ids"],
                "fixed",
                columns["ids"],
                np.dtype(np.int64),
                manifest["max_len"][name],
            )
        )
        fields.append(BatchField(columns["len"], "scalar", columns["len"], np.dtype(np.int64)))
    subwords = manifest.get("subwords")
    if subwords:
        column = subwords["column"]
        fields.append(BatchField(column, "fixed", column, np.dtype(np.int64), subwords["width"]))
    if manifest.get("image_features"):
        fields.append(
            BatchField(
                "image_features",
                "fixed",
                "image_features",
                np.dtype(np.float32),
                manifest["image_features"]["dim"],
            )
        )
        fields.append(BatchField("image_missing", "scalar", "image_missing", np.dtype(np.bool_)))
    for task in manifest["tasks"]:
        fields += kind_of(task["kind"]).batch_fields(task)
    return fields


class Block:
    """Rows of one window as numpy arrays, so batches are gathered by index with no per-row
    Python: fixed lists are reshaped from their flat values, sparse ones kept as CSR."""

    def __init__(self, table: pa.Table, fields: list[BatchField], row_ids: np.ndarray) -> None:
        self.rows = table.num_rows
        self.dense: dict[str, np.ndarray] = {"row_id": row_ids}
        self.sparse: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        for f in fields:
            column = table.column(f.column).combine_chunks()
            if f.mask:
                self.dense[f"{f.key}_mask"] = column.is_valid().to_numpy(zero_copy_only=False)
            if f.layout == "fixed":
                flat = pc.list_flatten(column).to_numpy()
                if flat.size != self.rows * f.width:
                    raise ShardError(
                        f"column {f.column}: expected {f.width} values a row, got "
                        f"{flat.size} for {self.rows} rows"
                    )
                self.dense[f.key] = flat.reshape(self.rows, f.width)
            elif f.layout in ("scalar", "label"):
                zero = False if pa.types.is_boolean(column.type) else 0
                self.dense[f.key] = column.fill_null(zero).to_numpy(zero_copy_only=False)
            else:
                lengths = pc.list_value_length(column).fill_null(0).to_numpy()
                indptr = np.concatenate([[0], np.cumsum(lengths)])
                indices = pc.list_flatten(column).to_numpy()
                values = None
                if f.values is not None:
                    values = pc.list_flatten(table.column(f.values).combine_chunks()).to_numpy()
                self.sparse[f.key] = (indptr, indices, values)

    def take(self, rows: np.ndarray, fields: list[BatchField]) -> dict[str, np.ndarray]:
        """The given rows as batch arrays (sparse columns scattered to dense)."""
        out = {key: array[rows] for key, array in self.dense.items()}
        for f in fields:
            if f.layout != "sparse":
                continue
            indptr, indices, values = self.sparse[f.key]
            starts, lengths = indptr[rows], indptr[rows + 1] - indptr[rows]
            total = int(lengths.sum())
            within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            source = np.repeat(starts, lengths) + within
            dense = np.zeros((len(rows), f.width), dtype=f.dtype)
            dense[np.repeat(np.arange(len(rows)), lengths), indices[source]] = (
                1.0 if values is None else values[source]
            )
            out[f.key] = dense
        return out


def to_arrays(parts: list[Arrays], fields: list[BatchField]) -> Arrays:
    """One batch from row parts, in contract dtypes: ids, lengths, classes and row_id int64,
    the rest float32 or bool."""
    arrays = (
        parts[0]
        if len(parts) == 1
        else {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    )
    dtypes = {f.key: f.dtype for f in fields} | {"row_id": np.dtype(np.int64)}
    return {
        key: np.ascontiguousarray(array, dtype=dtypes.get(key, np.dtype(np.bool_)))
        for key, array in arrays.items()
    }  # the keys without a field are masks


def as_tensors(arrays: Arrays, pin: bool = False) -> Batch:
    """numpy -> torch without copying (pinned when asked)."""
    batch = {key: torch.from_numpy(array) for key, array in arrays.items()}
    return {key: tensor.pin_memory() for key, tensor in batch.items()} if pin else batch


@dataclass(frozen=True)
class Packed:
    """A batch in one shared-memory buffer: what a worker process sends. One segment a
    batch; the training process gets views into it, no copy."""

    buffer: torch.Tensor  # uint8, in shared memory
    layout: tuple[tuple[str, str, tuple[int, ...], int], ...]  # key, dtype, shape, offset


def pack(arrays: Arrays) -> Packed:
    layout, size = [], 0
    for key, array in arrays.items():
        layout.append((key, array.dtype.str, array.shape, size))
        size += -(-array.nbytes // 8) * 8  # 8-byte aligned, so every view is aligned
    buffer = torch.empty(size, dtype=torch.uint8).share_memory_()
    target = buffer.numpy()
    for (_, _, _, offset), array in zip(layout, arrays.values(), strict=True):
        target[offset : offset + array.nbytes] = array.reshape(-1).view(np.uint8)
    return Packed(buffer, tuple(layout))


def unpack(packed: Packed) -> Arrays:
    """Views into the packed buffer (they keep it alive)."""
    memory = packed.buffer.numpy()
    return {
        key: np.frombuffer(memory, np.dtype(dtype), int(np.prod(shape)), offset).reshape(shape)
        for key, dtype, shape, offset in packed.layout
    }


def pad_arrays(fields: list[BatchField], size: int) -> Arrays:
    """A batch that trains nothing: every mask False, row_id -1, zero ids of length 1."""
    arrays = {"row_id": np.full(size, -1, dtype=np.int64)}
    for f in fields:
        shape = (size, f.width) if f.layout in ("fixed", "sparse") else (size,)
        fill = 1 if f.layout == "scalar" else 0  # lengths 1, image_missing True
        arrays[f.key] = np.full(shape, fill, dtype=f.dtype)
        if f.mask:
            arrays[f"{f.key}_mask"] = np.zeros(size, dtype=np.bool_)
    return arrays


def resume_point(counts: list[int], steps: int) -> tuple[list[int], int]:
    """Where a rank's epoch stands after `steps` batches: how many batches each stream has
    given, and the stream that gives the next one. The DataLoader takes one batch from each
    worker that still has one, in worker order, round after round."""
    skip = np.zeros(len(counts), dtype=np.int64)
    total = np.asarray(counts, dtype=np.int64)
    left, last = steps, -1
    while left > 0:
        active = np.flatnonzero(total > skip)
        if not len(active):
            raise ShardError(f"start_step {steps} is past the end of the epoch ({sum(counts)})")
        rounds = min(left // len(active), int((total - skip)[active].min()))
        if rounds:
            skip[active] += rounds
            left -= rounds * len(active)
            last = int(active[-1])
        else:  # fewer steps left than active workers: part of one round
            skip[active[:left]] += 1
            last, left = int(active[left - 1]), 0
    following = [(last + 1 + i) % len(counts) for i in range(len(counts))]
    after = next((s for s in following if skip[s] < total[s]), 0)
    return skip.tolist(), after


class ShardDataset(IterableDataset):
    """One split of a shard set for one rank; yields whole batches as numpy arrays (packed in
    shared memory inside a worker), which `ShardLoader` (from `make_loader`) turns into
    tensors."""

    def __init__(
        self,
        shard_dir: str | Path,
        split: str,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        buffer_rows: int | None = None,
        equal_steps: bool | None = None,
        epoch: int = 0,
        start_step: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}"
            )
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = (
            world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not within world_size {self.world_size}")
        self.root = Path(shard_dir)
        self.manifest = load_manifest(self.root)
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.shuffle = split == "train" if shuffle is None else shuffle
        self.num_workers = num_workers
        self.buffer_rows = buffer_rows if buffer_rows is not None else max(16 * batch_size, 8192)
        self.equal_steps = self.world_size > 1 if equal_steps is None else equal_steps
        self.fields = fields_of(self.manifest)
        self.files = [self.root / entry["path"] for entry in self.manifest["files"][split]]
        self.units = self._units()
        self.columns = sorted(
            {f.column for f in self.fields} | {f.values for f in self.fields if f.values}
        )
        self._state = torch.zeros(2, dtype=torch.int64).share_memory_()  # epoch, start_step
        self.set_epoch(epoch, start_step)

    def _units(self) -> list[Unit]:
        units, first = [], 0
        for index, (path, entry) in enumerate(
            zip(self.files, self.manifest["files"][self.split], strict=True)
        ):
            if not path.is_file():
                raise ShardError(f"shard file {path} listed in the manifest is missing")
            for group, rows in enumerate(entry["row_groups"]):
                units.append(Unit(index, group, rows, first))
                first += rows
        if first == 0:
            raise ShardError(
                f"split '{self.split}' of {self.root} has no rows "
                f"({len(self.files)} files): refusing an empty epoch"
            )
        if first != self.manifest["splits"][self.split]:
            raise ShardError(
                f"{self.root}: the files of '{self.split}' hold {first} rows, the "
                f"manifest says {self.manifest['splits'][self.split]}"
            )
        return units

    @property
    def rows(self) -> int:
        """Rows of the split (every rank together)."""
        return self.manifest["splits"][self.split]

    @property
    def epoch(self) -> int:
        return int(self._state[0])

    @property
    def start_step(self) -> int:
        return int(self._state[1])

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's shuffle and skip this rank's first `start_step` batches (to
        resume mid-epoch) until the next call. Call before iterating. The two numbers live
        in shared memory, so persistent worker processes see them too."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self._state[0], self._state[1] = epoch, start_step
        if start_step > self.steps_per_epoch():
            raise ShardError(
                f"start_step {start_step} is past the end of epoch {epoch} "
                f"({self.steps_per_epoch()} steps)"
            )

    def _readers(self) -> int:
        return self.world_size * max(self.num_workers, 1)

    def plan(self) -> list[list[Unit]]:
        """The epoch's units of every reader (reader = rank * workers + worker)."""
        order = np.arange(len(self.units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.units))
        readers = self._readers()
        return [[self.units[i] for i in order[reader::readers]] for reader in range(readers)]

    def batch_counts(self) -> np.ndarray:
        """[rank, worker] -> real batches this epoch."""
        rows = np.array([sum(u.rows for u in units) for units in self.plan()], dtype=np.int64)
        return (-(-rows // self.batch_size)).reshape(self.world_size, max(self.num_workers, 1))

    def steps_per_epoch(self) -> int:
        """Batches this rank yields in a whole epoch: the same on every rank when equal_steps."""
        counts = self.batch_counts()
        return int(counts.sum(axis=1).max() if self.equal_steps else counts[self.rank].sum())

    def __len__(self) -> int:
        return self.steps_per_epoch() - self.start_step

    def _worker_counts(self) -> list[int]:
        """Batches of each worker of this rank, padding included (on its busiest worker)."""
        counts = self.batch_counts()[self.rank].tolist()
        pads = self.steps_per_epoch() - sum(counts)
        counts[int(np.argmax(counts))] += pads
        return counts

    def __iter__(self) -> Iterator[Arrays | Packed]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != max(self.num_workers, 1):
            raise ShardError(
                f"dataset planned for {self.num_workers} workers, running in "
                f"{workers}: build the DataLoader with make_loader"
            )
        counts = self._worker_counts()
        skips, after = resume_point(counts, self.start_step)
        # A fresh DataLoader starts its round-robin at worker 0: when resuming, worker 0
        # serves the stream that gives the next batch, and the others follow in order.
        stream = (worker + after) % workers
        real = int(self.batch_counts()[self.rank][stream])
        reader = self.rank * workers + stream
        batches = self._read_batches(reader, self.plan()[reader], skips[stream], info is None)
        pads = (
            pad_arrays(self.fields, self.batch_size)
            for _ in range(counts[stream] - max(real, skips[stream]))
        )
        for arrays in itertools.chain(batches, pads):
            large = sum(array.nbytes for array in arrays.values()) > SHARED_MEMORY_BYTES
            yield pack(arrays) if info is not None and large else arrays

    def _windows(self, units: list[Unit]) -> list[list[Unit]]:
        """Consecutive units holding at least buffer_rows rows (one unit each when not
        shuffling)."""
        windows: list[list[Unit]] = []
        rows = 0
        for unit in units:
            if not windows or not self.shuffle or rows >= self.buffer_rows:
                windows.append([])
                rows = 0
            windows[-1].append(unit)
            rows += unit.rows
        return windows

    def _read(self, window: list[Unit], files: dict[int, pq.ParquetFile], threads: bool) -> Block:
        tables = []
        for unit in window:
            if unit.file not in files:
                files[unit.file] = pq.ParquetFile(self.files[unit.file])
            table = files[unit.file].read_row_group(
                unit.row_group, columns=self.columns, use_threads=threads
            )
            if table.num_rows != unit.rows:
                raise ShardError(
                    f"{self.files[unit.file]} row group {unit.row_group} has "
                    f"{table.num_rows} rows, the manifest says {unit.rows}"
                )
            tables.append(table)
        row_ids = np.concatenate([np.arange(u.first_row, u.first_row + u.rows) for u in window])
        return Block(pa.concat_tables(tables), self.fields, row_ids)

    def _read_batches(
        self, reader: int, units: list[Unit], skip: int, threads: bool
    ) -> Iterator[Arrays]:
        """The reader's row stream (permuted windows, in order) cut into batches, from
        batch `skip` on; windows wholly before it are not read."""
        skip_rows = skip * self.batch_size
        files: dict[int, pq.ParquetFile] = {}
        parts: list[dict[str, np.ndarray]] = []
        pending = 0
        for index, window in enumerate(self._windows(units)):
            rows = sum(unit.rows for unit in window)
            if skip_rows >= rows:
                skip_rows -= rows
                continue
            order = np.arange(rows)
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch, reader, index]).permutation(
                    rows
                )
            block = self._read(window, files, threads)
            order, skip_rows = order[skip_rows:], 0
            while len(order):
                take = min(self.batch_size - pending, len(order))
                parts.append(block.take(order[:take], self.fields))
                order, pending = order[take:], pending + take
                if pending == self.batch_size:
                    yield to_arrays(parts, self.fields)
                    parts, pending = [], 0
        if parts:
            yield to_arrays(parts, self.fields)


def _worker_init(_: int) -> None:
    """One intra-op thread per worker: the workers are the parallelism."""
    torch.set_num_threads(1)


def _keep(arrays: Any) -> Any:
    """The collate function: the dataset yields whole batches already."""
    return arrays


class ShardLoader(DataLoader):
    """A DataLoader whose workers send numpy batches (large ones packed in one shared-memory
    buffer, see SHARED_MEMORY_BYTES) and which makes the tensors in the training process.
    Why (bench/loader.py): a worker that yields tensors sends each of a batch's ~30 tensors
    through its own shared-memory segment, which made 2 workers 10x slower than one
    process."""

    def __init__(
        self, dataset: ShardDataset, *, num_workers: int, pin_memory: bool, prefetch_factor: int
    ) -> None:
        super().__init__(
            dataset,
            batch_size=None,
            collate_fn=_keep,
            num_workers=num_workers,
            worker_init_fn=_worker_init if num_workers else None,
            prefetch_factor=prefetch_factor if num_workers else None,
            persistent_workers=num_workers > 0,
            in_order=True,
        )
        self.pin = pin_memory

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        for item in super().__iter__():
            yield as_tensors(unpack(item) if isinstance(item, Packed) else item, self.pin)


def make_loader(
    shard_dir: str | Path,
    split: str,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    start_step: int = 0,
    shuffle: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 0,
    buffer_rows: int | None = None,
    equal_steps: bool | None = None,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> ShardLoader:
    """A DataLoader of contract batches for one rank. Call `loader.dataset.set_epoch(e)`
    before each epoch (the worker processes persist across epochs and read it from shared
    memory); `len(loader)` is the epoch's step count, equal on every rank unless
    equal_steps=False."""
    dataset = ShardDataset(
        shard_dir,
        split,
        batch_size,
        seed=seed,
        shuffle=shuffle,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        buffer_rows=buffer_rows,
        equal_steps=equal_steps,
        epoch=epoch,
        start_step=start_step,
    )
    return ShardLoader(
        dataset, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor
    )
