"""Benchmark: MRNet training throughput with 1 and with 2 data-parallel processes, launched
the way the train stage launches them (TorchDistributor, local mode, gloo), on the same
shards, in one run.

The shards are the shard stage's output for the synthetic catalog (built once under
work/bench-train through clean, corpus and shard, reused while their settings are
unchanged), with small row groups so that two ranks get even shares. Both sides run the
stage's own training function with the stage's defaults (MRNet on the 256-d subword bag,
the contrastive objective beside all tasks of the catalog, joint optimisation, batch 512 per
process). Two processes get half
the cores each (the stage's rule). One process runs twice, with every core (the stage's
rule, torch's default) and with one thread: intra-op threads spin when other work holds
the cores, which can slow a multi-threaded process tenfold, so the 1-process figure is the
better of the two, the strongest single-process baseline. Each run trains `--epochs`
epochs; its samples/s is the median over epochs of real (non-padding) training rows per
second of training time (validation, checkpoints and start-up excluded). The runs
alternate for `--rounds` rounds so machine noise hits all of them; medians are compared.

The last line is `RESULT train ratio=<2-process / best 1-process samples/s>`. On one
machine the two processes share its cores and memory bandwidth, so the ratio shows what
DDP's gradient all-reduce costs and what a second process gains, not cluster scaling.

    .venv/bin/python bench/train.py [--rows 20000] [--epochs 2] [--rounds 2] [--fresh]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import time
from pathlib import Path

from pyspark.sql import SparkSession

from pipelines.core.config import Config, load_config
from pipelines.core.spark import get_spark
from pipelines.data.shards import MANIFEST
from pipelines.model_types.registry import model_type
from pipelines.training.inputs import loop_spec, word_vectors
from pipelines.training.launch import Launch, local_cores, train_model
from pipelines.training.reporting import read_history

WORKDIR = Path("work/bench-train")


def shard_key(config: Config) -> str:
    """The settings the shards depend on (not the train section)."""
    parts = [config.catalog, config.clean, config.word2vec, config.shard]
    text = json.dumps([part.model_dump(mode="json") for part in parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def ensure_shards(spark: SparkSession, config: Config, fresh: bool) -> Path:
    """Build the shards through clean, corpus and shard unless these settings built them."""
    root = config.outputs.shards
    stamp = config.outputs.root / "bench-stamp"
    if (
        not fresh
        and (root / MANIFEST).is_file()
        and stamp.is_file()
        and stamp.read_text() == shard_key(config)
    ):
        print(f"reusing the shards in {root} (--fresh rebuilds them)")
        return root
    from pipelines.stages import clean, corpus, shard

    started = time.perf_counter()
    for stage in (clean, corpus, shard):
        stage.run(spark, config)
    stamp.write_text(shard_key(config))
    print(f"clean + corpus + shard: {time.perf_counter() - started:.0f} s")
    return root


def throughput(config: Config, shards: Path, processes: int, threads: int) -> float:
    """Median samples/s over the epochs of one fresh training run."""
    launch = Launch("local", processes, False, threads)
    out = WORKDIR / f"run-{processes}p{threads}t"
    out.mkdir(parents=True, exist_ok=True)
    vectors = word_vectors(config, shards, out)
    chosen = model_type(config.train.model)
    spec = loop_spec(config, shards, out / "run", vectors, launch, chosen.fingerprint_part(config))
    started = time.perf_counter()
    result = train_model(launch, spec, chosen.factory(config, vectors), resume=False)
    wall = time.perf_counter() - started
    speeds = [
        row["train_samples_per_second"]
        for row in read_history(out / "run")
        if "train_samples_per_second" in row
    ]
    speed = statistics.median(speeds)
    print(
        f"  {processes} process(es) x {launch.threads} thread(s): "
        f"{', '.join(f'{s:,.0f}' for s in speeds)} samples/s by epoch -> median {speed:,.0f}; "
        f"{result['global_step']} steps, {wall:.0f} s wall with start-up and validation"
    )
    return speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="synthetic catalog rows")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="rebuild the shards")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = load_config(
        overrides=[
            f"workdir={WORKDIR}",
            f"catalog.synthetic.rows={args.rows}",
            "word2vec.epochs=2",
            "shard.row_group_rows=512",
            f"train.epochs={args.epochs}",
            f"train.patience={args.epochs}",
        ]
    )
    spark = get_spark(config.spark)  # TorchDistributor runs from the active session
    shards = ensure_shards(spark, config, args.fresh)
    rows = json.loads((shards / MANIFEST).read_text())["splits"]["train"]
    print(
        f"{rows:,} training rows, {local_cores()} cores, MRNet {config.train.embedding_size}-d, "
        f"batch {config.train.batch_size} per process, {args.epochs} epochs per run"
    )
    cores = local_cores()
    sides = sorted({(1, cores), (1, 1), (2, max(1, cores // 2))})
    speeds: dict[tuple[int, int], list[float]] = {side: [] for side in sides}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds} (load average {os.getloadavg()[0]:.1f})")
        for processes, threads in sides:
            speeds[processes, threads].append(throughput(config, shards, processes, threads))
    medians = {side: statistics.median(values) for side, values in speeds.items()}
    one = max(speed for (processes, _), speed in medians.items() if processes == 1)
    two = medians[2, max(1, cores // 2)]
    ratio = two / one
    print(
        "medians: "
        + "; ".join(
            f"{p} process(es) x {t} thread(s) {speed:,.0f} samples/s"
            for (p, t), speed in medians.items()
        )
    )
    print(
        f"2 processes {two:,.0f} samples/s / best 1 process {one:,.0f} samples/s "
        f"(load average {os.getloadavg()[0]:.1f}: other work on the machine skews all)"
    )
    print(f"RESULT train ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
