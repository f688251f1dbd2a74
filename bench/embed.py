"""Embed stage throughput: rows/s of our mapInArrow path against three baselines, one run.

    .venv/bin/python bench/embed.py [--rows 1000000] [--encoder bag] [--embedding-size 256]

Over the same Parquet catalog (synthetic titles, 4-12 words from a 5,000-word vocabulary),
on local[2], each variant writes the same output shape (product_id, content_hash,
embedding array<float>) to Parquet:
- ours:   `pipelines.stages.embed.embed_frame` (mapInArrow, model cached per Python worker,
          one torch thread per task) + a Parquet write, with the default model's shape
          (`train.encoder`, `train.embedding_size`, `shard.text_fields.title`, subword ids);
- bilstm-128: the same path with the default before issue 18, a 128-d BiLSTM MRNet: the
          default shape must embed at least as many rows per second;
- floor:  Spark read + write with no model (the embedding a constant array built by Spark
          SQL): the I/O floor no inference path can beat;
- python: the same model and input code (`embed_batch`) in one plain Python process
          (pyarrow.dataset batches, one torch thread, pyarrow writer);
- pandas: the common `predict_batch_udf` path (pandas batches, per-row arrays back) with
          the same model.
The models are untrained MRNets registered with the files the train stage ships. Python
workers are started (imports, model loads) by a 1% sample before the timed runs and that
fixed start-up is printed on its own. The last line is
`RESULT embed ratio=<ours rows/s / floor rows/s>` (steady state).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
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

from models.bag import SubwordBag
from models.encoders import TitleEncoder
from models.mrnet import BiLSTMTitles, MRNet, TaskHead
from pipelines.core.config import ShardConfig, SparkConfig, TrainConfig, Word2VecConfig
from pipelines.core.spark import get_spark
from pipelines.data.subwords import Subwords
from pipelines.data.tokenizer import FIRST_WORD_ID, VOCABULARY_FILE, Vocabulary, tokenize_arrow
from pipelines.model_types.serving import ModelSpec, embed_batch, prepare_model
from pipelines.stages.embed import embed_frame
from pipelines.training.publish import log_and_register

WORDS = 5_000
PREVIOUS_DIM = 128  # the MRNet default before issue 18: a 128-d BiLSTM over 128-d word vectors


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


def register(work: Path, titles: list[str], encoder: str, dim: int, max_len: int) -> str:
    """An untrained MRNet on `encoder` (the subword bag reads subword ids too), registered
    with the files the train stage ships (vocabulary, tokenizer.json), as train would."""
    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    mlflow.set_experiment("bench-embed")
    tokens = tokenize_arrow(titles[:200_000])
    counts = tokens.flatten().value_counts()
    vocabulary = Vocabulary.from_counts(counts.field("values"), counts.field("counts"))
    export = work / f"export-{encoder}-{dim}"
    vocabulary.save(export / VOCABULARY_FILE)
    vocab_size = len(vocabulary) + FIRST_WORD_ID
    torch.manual_seed(0)
    subwords = None
    if encoder == "bag":
        subwords = Subwords(max_tokens=max_len)
        known = np.unique(subwords.encode(tokens))
        title_encoder: torch.nn.Module = SubwordBag(vocab_size, known[known > 0], dim)
    else:
        title_encoder = BiLSTMTitles(vocab_size, Word2VecConfig().dims, dim)
    model = MRNet(title_encoder, [TaskHead("flag", "binary", 1, scalar=True)])
    scheme = None if subwords is None else asdict(subwords)
    (export / "tokenizer.json").write_text(json.dumps({"max_len": max_len, "subwords": scheme}))
    (export / "labels.json").write_text("{}")
    width = 0 if subwords is None else subwords.width
    example = np.zeros((2, max_len + width), dtype=np.int64)
    example[:, 0] = FIRST_WORD_ID
    name = f"bench-embed-{encoder}-{dim}"
    with mlflow.start_run():
        _, version = log_and_register(
            TitleEncoder(model, max_len, width),
            example,
            name,
            [str(export / n) for n in (VOCABULARY_FILE, "tokenizer.json", "labels.json")],
            {},
        )
    return f"models:/{name}/{version}"


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
    parser.add_argument("--encoder", choices=("bag", "bilstm"), default=TrainConfig().encoder)
    parser.add_argument("--embedding-size", type=int, default=TrainConfig().embedding_size)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    max_len = ShardConfig().text_fields["title"]
    try:
        source = work / "catalog"
        titles = make_catalog(args.rows, source)
        models = work / "models"
        spec = prepare_model(
            register(work, titles, args.encoder, args.embedding_size, max_len), models
        )
        previous = prepare_model(register(work, titles, "bilstm", PREVIOUS_DIM, max_len), models)
        del titles
        spark = get_spark(SparkConfig(master="local[2]", shuffle_partitions=4, driver_memory="2g"))
        print(
            f"{args.rows:,} products, MRNet on the {args.encoder} encoder, {spec.dimension}-d, "
            f"title ids {max_len}, local[2], torch {torch.__version__}, {os.cpu_count()} cores",
            flush=True,
        )
        read_columns = ["product_id", "content_hash", "title"]

        def catalog():
            return spark.read.parquet(str(source))

        def through_stage(model: ModelSpec, out: str) -> Callable[[], None]:
            def run() -> None:
                frame, _ = embed_frame(catalog(), model)
                frame.write.mode("overwrite").parquet(str(work / out))

            return run

        def floor() -> None:
            zeros = F.array_repeat(F.lit(0.0).cast("float"), spec.dimension)
            (
                catalog()
                .select("product_id", "content_hash", zeros.alias("embedding"))
                .write.mode("overwrite")
                .parquet(str(work / "out-floor"))
            )

        def python() -> None:
            # One thread: its best setting here (two threads run the LSTM ~6x slower).
            torch.set_num_threads(1)
            writer = None
            for batch in ds.dataset(source).to_batches(batch_size=10_000, columns=read_columns):
                vectors = embed_batch(spec, batch, torch.device("cpu"), spec.batch_size)
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
            device = torch.device("cpu")

            def predict(texts: np.ndarray) -> np.ndarray:
                batch = pa.record_batch({"title": pa.array(texts, pa.string())})
                return embed_batch(spec, batch, device, spec.batch_size)

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
        # Python workers start once per executor: imports and the model load. A 1% sample in
        # every task pays that here, so the variants below compare steady-state rates; this
        # line is the fixed start-up.
        started = time.perf_counter()
        loads = 0
        for model in (spec, previous):
            sample, loaded = embed_frame(catalog().where(F.rand(0) < 0.01), model)
            sample.write.mode("overwrite").parquet(str(work / "out-start"))
            loads += loaded.value
        print(
            f"start-up {time.perf_counter() - started:.1f} s for {loads} worker "
            "model load(s) (1% sample, both models)",
            flush=True,
        )
        rates = {
            name: timed(name, args.rows, action)
            for name, action in (
                ("floor", floor),
                ("ours", through_stage(spec, "out-ours")),
                (f"bilstm-{PREVIOUS_DIM}", through_stage(previous, "out-previous")),
                ("python", python),
                ("pandas", pandas),
            )
        }
        print(
            f"ours/floor {rates['ours'] / rates['floor']:.2f}, ours/python "
            f"{rates['ours'] / rates['python']:.2f}, pandas/floor "
            f"{rates['pandas'] / rates['floor']:.2f}; ours ({args.encoder} "
            f"{spec.dimension}-d) / {PREVIOUS_DIM}-d BiLSTM MRNet "
            f"{rates['ours'] / rates[f'bilstm-{PREVIOUS_DIM}']:.2f}; ours per core "
            f"{rates['ours'] / 2:,.0f} rows/s"
        )
        print(f"RESULT embed ratio={rates['ours'] / rates['floor']:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
