"""Embed stage throughput: rows/s of our mapInArrow path against three baselines, one run.

    .venv/bin/python bench/embed.py [--rows 1000000] [--embedding-size 16]

Over the same Parquet catalog (synthetic titles, 4-12 words from a 5,000-word vocabulary),
on local[2], each variant writes the same output shape (product_id, content_hash,
embedding array<float>) to Parquet:
- ours:   `pipelines.stages.embed.embed_frame` (mapInArrow, model cached per Python worker,
          one torch thread per task) + a Parquet write;
- floor:  Spark read + write with no model (the embedding a constant array built by Spark
          SQL): the I/O floor no inference path can beat;
- python: the same model in one plain Python process (pyarrow.dataset batches, one torch
          thread: on this machine two threads run the LSTM ~6x slower; pyarrow writer);
- pandas: the common `predict_batch_udf` path (pandas batches, per-row arrays back) with
          the same model.
The model is an untrained, registered MRNet (`TitleEncoder`) with a small embedding size by
default so the four variants run in minutes on 2 cores; inference cost grows with it.
Python workers are started (imports, model load) by a 1% sample before the timed runs and
that fixed start-up is printed on its own. The last line is
`RESULT embed ratio=<ours rows/s / floor rows/s>` (steady state).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
from pyspark.ml.functions import predict_batch_udf
from pyspark.sql import functions as F
from pyspark.sql import types as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.encoders import TitleEncoder
from models.mrnet import MRNet, TaskHead
from pipelines.core.config import SparkConfig
from pipelines.core.devices import infer
from pipelines.core.spark import get_spark
from pipelines.data.tokenizer import Vocabulary, tokenize_arrow
from pipelines.stages.embed import embed_frame, prepare_model
from pipelines.training.publish import log_and_register

WORDS = 5_000
MAX_LEN = 16


def make_catalog(rows: int, out: Path, files: int = 8) -> list[str]:
    """Titles of 4-12 Zipf-ish words; ids and hashes as strings, like the clean catalog."""
    rng = np.random.default_rng(7)
    words = np.array([f"w{i}" for i in range(WORDS)])
    lengths = rng.integers(4, 13, rows)
    picks = np.minimum(rng.zipf(1.3, lengths.sum()) - 1, WORDS - 1)
    tokens = words[picks]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    titles = [" ".join(tokens[bounds[i] : bounds[i + 1]]) for i in range(rows)]
    out.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "product_id": [f"p{i:09d}" for i in range(rows)],
            "content_hash": [f"h{i:x}" for i in range(rows)],
            "title": titles,
        }
    )
    step = -(-rows // files)
    for part in range(files):
        pq.write_table(table.slice(part * step, step), out / f"part-{part}.parquet")
    return titles


def register(work: Path, titles: list[str], embedding_size: int) -> str:
    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    mlflow.set_experiment("bench-embed")
    tokens = tokenize_arrow(titles[:200_000]).flatten().value_counts()
    vocabulary = Vocabulary.from_counts(tokens.field("values"), tokens.field("counts"))
    export = work / "export"
    vocabulary.save(export / "vocabulary.parquet")
    (export / "tokenizer.json").write_text(f'{{"max_len": {MAX_LEN}}}')
    (export / "labels.json").write_text("{}")
    torch.manual_seed(0)
    model = MRNet(
        len(vocabulary) + 2,
        embedding_size,
        [TaskHead("flag", "binary", 1, scalar=True)],
        embedding_size=embedding_size,
    )
    example = np.zeros((2, MAX_LEN), dtype=np.int64)
    example[:, 0] = 2
    with mlflow.start_run():
        _, version = log_and_register(
            TitleEncoder(model),
            example,
            "bench-embed",
            [str(export / n) for n in ("vocabulary.parquet", "tokenizer.json", "labels.json")],
            {},
        )
    return f"models:/bench-embed/{version}"


def timed(name: str, rows: int, action) -> float:
    started = time.perf_counter()
    action()
    seconds = time.perf_counter() - started
    print(
        f"{name:<8} {rows:>10,} rows  {seconds:7.1f} s  {rows / seconds:>10,.0f} rows/s", flush=True
    )
    return rows / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--embedding-size", type=int, default=16)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        source = work / "catalog"
        titles = make_catalog(args.rows, source)
        spec = prepare_model(register(work, titles, args.embedding_size), work / "models")
        del titles
        spark = get_spark(SparkConfig(master="local[2]", shuffle_partitions=4, driver_memory="2g"))
        print(
            f"{args.rows:,} products, MRNet {spec.dimension}-d, title ids {spec.max_len}, "
            f"local[2], torch {torch.__version__}, {os.cpu_count()} cores",
            flush=True,
        )

        def catalog():
            return spark.read.parquet(str(source))

        def ours() -> None:
            frame, _ = embed_frame(catalog(), spec)
            frame.write.mode("overwrite").parquet(str(work / "out-ours"))

        def floor() -> None:
            zeros = F.array_repeat(F.lit(0.0).cast("float"), spec.dimension)
            (
                catalog()
                .select("product_id", "content_hash", zeros.alias("embedding"))
                .write.mode("overwrite")
                .parquet(str(work / "out-floor"))
            )

        def python() -> None:
            module = mlflow.pytorch.load_model(spec.folder).eval()
            vocabulary = Vocabulary.load(Path(spec.folder) / "extra_files" / "vocabulary.parquet")
            # One thread: its best setting here (two threads run this LSTM ~6x slower).
            torch.set_num_threads(1)
            writer = None
            for batch in ds.dataset(source).to_batches(batch_size=10_000):
                ids = vocabulary.encode(tokenize_arrow(batch.column("title")), spec.max_len)
                vectors = infer(module, ids.astype(np.int64), spec.batch_size, torch.device("cpu"))
                values = pa.array(vectors.reshape(-1))
                offsets = pa.array(np.arange(len(vectors) + 1, dtype=np.int32) * spec.dimension)
                out = pa.table(
                    {
                        "product_id": batch.column("product_id"),
                        "content_hash": batch.column("content_hash"),
                        "embedding": pa.ListArray.from_arrays(offsets, values),
                    }
                )
                writer = writer or pq.ParquetWriter(work / "out-python.parquet", out.schema)
                writer.write_table(out)
            writer.close()

        def make_predict_fn():
            module = mlflow.pytorch.load_model(spec.folder).eval()
            vocabulary = Vocabulary.load(Path(spec.folder) / "extra_files" / "vocabulary.parquet")

            def predict(texts: np.ndarray) -> np.ndarray:
                ids = vocabulary.encode(tokenize_arrow(list(texts)), spec.max_len)
                with torch.inference_mode():
                    return module(torch.from_numpy(ids.astype(np.int64))).numpy()

            return predict

        def pandas() -> None:
            udf = predict_batch_udf(
                make_predict_fn, return_type=T.ArrayType(T.FloatType()), batch_size=spec.batch_size
            )
            (
                catalog()
                .select("product_id", "content_hash", udf("title").alias("embedding"))
                .write.mode("overwrite")
                .parquet(str(work / "out-pandas"))
            )

        timed("warm-up", args.rows, floor)  # JVM JIT, file cache
        # Python workers start once per executor: imports (torch, mlflow through
        # pipelines.stages.train) and the model load. A 1% sample in every task pays that here, so
        # the variants below compare steady-state rates; this line is the fixed start-up.
        started = time.perf_counter()
        sample, loads = embed_frame(catalog().where(F.rand(0) < 0.01), spec)
        sample.write.mode("overwrite").parquet(str(work / "out-start"))
        print(
            f"start-up {time.perf_counter() - started:.1f} s for {loads.value} worker "
            "model load(s) (1% sample)",
            flush=True,
        )
        rates = {
            name: timed(name, args.rows, action)
            for name, action in (
                ("floor", floor),
                ("ours", ours),
                ("python", python),
                ("pandas", pandas),
            )
        }
        print(
            f"ours/floor {rates['ours'] / rates['floor']:.2f}, ours/python "
            f"{rates['ours'] / rates['python']:.2f}, pandas/floor "
            f"{rates['pandas'] / rates['floor']:.2f}"
        )
        print(f"RESULT embed ratio={rates['ours'] / rates['floor']:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
