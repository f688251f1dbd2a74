"""Benchmark: the training loader (pipelines/training/loader.py) against plain `pyarrow.dataset`
batches -> torch tensors, over the same shards with the same batch size, in one run.

The shards are the shard stage's output for the synthetic catalog (built once under
work/bench-loader through clean, corpus and shard, reused while the config is unchanged).
"plain" is what a trainer would write without a loader: `dataset.to_batches()` in file
order, one process, pyarrow's own decode threads, each record batch turned into the same
contract tensors by the same vectorised conversion; so the ratio is the cost of what the
loader adds (plan, (rank, worker) sharing, window shuffling, row_id, the DataLoader).
Every reader makes `--epochs` passes over the train split; the readers run in turn for
`--rounds` rounds so machine noise hits all of them, and medians are compared.

Also shown: the loader with 2 worker processes, bare and with a simulated training step
(`--step-ms` of sleep per batch, a GPU step that leaves the CPU free), against plain with
the same step: workers cost IPC when nothing else runs and pay off when they overlap the
step. If HF `datasets` is installed, its streaming Parquet reader is timed too (it is not a
dependency).

The last line is `RESULT loader ratio=<ours / plain rows/s>`, both in one process, no step;
goal >= 0.8.

    .venv/bin/python bench/loader.py [--rows 20000] [--batch-size 256] [--epochs 8]
                                     [--rounds 3] [--step-ms 5] [--fresh] [--no-subwords]

`--no-subwords` shards without the title's subword ids (the shard layout before issue 18):
those 384 ids a row are most of the bytes every reader converts.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import torch

from pipelines.core.config import Config, load_config
from pipelines.data.shards import MANIFEST, load_manifest
from pipelines.training.loader import (
    Block,
    as_tensors,
    fields_of,
    make_loader,
    to_arrays,
)

WORKDIR = Path("work/bench-loader")


def ensure_shards(config: Config, fresh: bool) -> Path:
    """The shard set for `config`, built through clean, corpus and shard unless a shard set
    with this config's hash is already there (--fresh rebuilds)."""
    root = config.outputs.shards
    manifest = root / MANIFEST
    if (
        not fresh
        and manifest.is_file()
        and json.loads(manifest.read_text()).get("config_hash") == config.digest()
    ):
        print(f"reusing the shards in {root} (--fresh rebuilds them)")
        return root
    from pipelines.core.spark import get_spark
    from pipelines.stages import clean, corpus, shard

    spark = get_spark(config.spark)
    try:
        for stage in (clean, corpus, shard):
            started = time.perf_counter()
            stage.run(spark, config)
            print(f"{stage.__name__.split('.')[-1]} stage: {time.perf_counter() - started:.1f} s")
    finally:
        spark.stop()
    return root


def consume(batches: Iterable[dict[str, torch.Tensor]], step_s: float) -> int:
    """Count the real rows; `step_s` of sleep per batch stands in for a GPU training step
    (the process waits, the CPU is free), which is what worker processes overlap with."""
    rows = 0
    for batch in batches:
        rows += int((batch["row_id"] >= 0).sum())
        if step_s:
            time.sleep(step_s)
    return rows


def plain_batches(root: Path, batch_size: int, epochs: int) -> Iterator[dict[str, torch.Tensor]]:
    """pyarrow.dataset record batches in file order -> the same contract tensors."""
    manifest = load_manifest(root)
    fields = fields_of(manifest)
    columns = sorted({f.column for f in fields} | {f.values for f in fields if f.values})
    dataset = ds.dataset(
        [str(root / f["path"]) for f in manifest["files"]["train"]], format="parquet"
    )
    for _ in range(epochs):
        first = 0
        for record_batch in dataset.to_batches(columns=columns, batch_size=batch_size):
            n = record_batch.num_rows
            block = Block(
                pa.Table.from_batches([record_batch]), fields, np.arange(first, first + n)
            )
            yield as_tensors(to_arrays([block.take(np.arange(n), fields)], fields))
            first += n


def our_batches(
    root: Path, batch_size: int, epochs: int, workers: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The loader as a trainer uses it: shuffled, set_epoch before each epoch."""
    loader = make_loader(root, "train", batch_size, num_workers=workers, seed=0)
    for epoch in range(epochs):
        loader.dataset.set_epoch(epoch)
        yield from loader


def hf_batches(root: Path, batch_size: int, epochs: int) -> Iterator[dict[str, torch.Tensor]]:
    """HF datasets' streaming Parquet reader (Arrow tables) -> the same contract tensors."""
    from datasets import load_dataset

    manifest = load_manifest(root)
    fields = fields_of(manifest)
    files = [str(root / f["path"]) for f in manifest["files"]["train"]]
    stream = load_dataset("parquet", data_files=files, split="train", streaming=True).with_format(
        "arrow"
    )
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        first = 0
        for table in stream.iter(batch_size=batch_size):
            n = table.num_rows
            block = Block(table, fields, np.arange(first, first + n))
            yield as_tensors(to_arrays([block.take(np.arange(n), fields)], fields))
            first += n


def timed(run: Callable[[], int]) -> float:
    """rows/s of one run."""
    started = time.perf_counter()
    rows = run()
    return rows / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="synthetic catalog rows")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=8, help="passes over train per timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--step-ms", type=int, default=5, help="simulated training step")
    parser.add_argument("--fresh", action="store_true", help="rebuild the shards")
    parser.add_argument(
        "--no-subwords", action="store_true", help="shards without the title's subword ids"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    overrides = [f"workdir={WORKDIR}", f"catalog.synthetic.rows={args.rows}", "word2vec.epochs=2"]
    if args.no_subwords:
        overrides.append("shard.subwords.enabled=false")
    config = load_config(overrides=overrides)
    root = ensure_shards(config, args.fresh)
    manifest = load_manifest(root)
    units = sum(len(f["row_groups"]) for f in manifest["files"]["train"])
    print(
        f"train split: {manifest['splits']['train']:,} rows in "
        f"{len(manifest['files']['train'])} file(s), {units} row groups; batch "
        f"{args.batch_size}, {len(fields_of(manifest))} batch fields, {args.epochs} epochs "
        f"per timing, {args.rounds} rounds"
    )

    size, epochs, step = args.batch_size, args.epochs, args.step_ms / 1000
    sides: dict[str, Callable[[], int]] = {
        "plain": lambda: consume(plain_batches(root, size, epochs), 0),
        "ours, 0 workers": lambda: consume(our_batches(root, size, epochs, 0), 0),
        "ours, 2 workers": lambda: consume(our_batches(root, size, epochs, 2), 0),
        f"plain + {args.step_ms} ms step": lambda: consume(plain_batches(root, size, epochs), step),
        f"ours, 2 workers + {args.step_ms} ms step": lambda: consume(
            our_batches(root, size, epochs, 2), step
        ),
    }
    try:
        import datasets  # noqa: F401

        sides["HF datasets streaming"] = lambda: consume(hf_batches(root, size, epochs), 0)
    except ImportError:
        print("HF datasets: not installed, skipped")
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for round_ in range(args.rounds):
        for name, run in sides.items():
            rates[name].append(timed(run))
        print(
            f"round {round_ + 1} rows/s: "
            + "; ".join(f"{name} {values[-1]:,.0f}" for name, values in rates.items())
        )
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"{'reader (median of rounds)':<36} {'rows/s':>10} {'vs plain':>9}")
    for name, median in medians.items():
        plain = medians[f"plain + {args.step_ms} ms step" if "step" in name else "plain"]
        print(f"{name:<36} {median:>10,.0f} {median / plain:>8.2f}x")
    print(f"RESULT loader ratio={medians['ours, 0 workers'] / medians['plain']:.2f}")


if __name__ == "__main__":
    main()
