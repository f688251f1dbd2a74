"""Benchmark: the corpus stage's word2vec training against raw gensim on the same file.

One run, one corpus (the synthetic catalog, 200k products by default, through `clean`):

1. the whole corpus stage (Spark corpus + counts, then gensim), its training words/s;
2. raw gensim as a user would call `Word2Vec(corpus_file=...)` (its `build_vocab` scan,
   then `train`), same parameters, on the file the stage trained on, right after; then
   more pairs with the stage's own training function, in alternating order, so load
   from elsewhere on the machine hits both sides alike;
3. Spark's vocabulary count of the corpus against gensim's single-threaded scan;
4. Spark MLlib's Word2Vec (skip-gram, hierarchical softmax, one iteration) on the same
   corpus, in words per CPU-second (measured: the JVM's CPU time from /proc) against
   gensim's CBOW, and against gensim with MLlib's algorithm (skip-gram + hierarchical
   softmax).

Words/s are corpus (raw) words processed per second of training, the same definition on
every side; each training also reports its CPU utilisation (CPU seconds / wall seconds /
workers), which shows when other work on the machine starved it. The last line is
`RESULT word2vec ratio=<ours / raw gensim>`, the median over the pairs; goal >= 0.9.

    .venv/bin/python bench/word2vec.py [--rows 200000] [--epochs 3] [--rounds 3] [--fresh]
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

from gensim.models import Word2Vec
from pyspark.ml.feature import Word2Vec as MLlibWord2Vec
from pyspark.sql import SparkSession

from pipelines.core.config import Config, load_config
from pipelines.core.spark import get_spark
from pipelines.data.tokenizer import Vocabulary, tokens
from pipelines.stages import corpus
from pipelines.stages.registry import run_stage

WORKDIR = Path("work/bench-word2vec")


def ensure_clean(config: Config, spark: SparkSession, fresh: bool) -> None:
    """Run `clean` unless this exact catalog + clean config was cleaned before (it is
    deterministic by seed); --fresh forces it."""
    stamp = config.outputs.stage("clean") / "bench-stamp.json"
    key = hashlib.sha256(
        json.dumps(
            [config.catalog.model_dump(mode="json"), config.clean.model_dump(mode="json")],
            sort_keys=True,
        ).encode()
    ).hexdigest()
    if not fresh and stamp.is_file() and stamp.read_text() == key:
        print(f"reusing the clean catalog in {stamp.parent} (--fresh rebuilds it)")
        return
    started = time.perf_counter()
    run_stage("clean", config, spark)
    stamp.write_text(key)
    print(f"clean stage: {time.perf_counter() - started:.1f} s")


def raw_gensim(
    config: Config, corpus_file: Path, **overrides: int
) -> tuple[Word2Vec, float, corpus.Timing]:
    """What `Word2Vec(corpus_file=...)` does, timed in its two steps: (model, scan seconds,
    training timing)."""
    settings = config.word2vec
    params = {
        "vector_size": settings.dims,
        "window": settings.window,
        "min_count": settings.min_count,
        "sample": settings.sample,
        "seed": corpus.training_seed(config),
        "workers": corpus.workers(settings),
        "sg": int(settings.algorithm == "skipgram"),
        "negative": settings.negative,
        "epochs": settings.epochs,
    }
    model = Word2Vec(**{**params, **overrides})
    started = time.perf_counter()
    model.build_vocab(corpus_file=str(corpus_file))
    scan_seconds = time.perf_counter() - started
    started, cpu_started = time.perf_counter(), time.process_time()
    _, raw_words = model.train(
        corpus_file=str(corpus_file),
        total_examples=model.corpus_count,
        total_words=model.corpus_total_words,
        epochs=model.epochs,
    )
    timing = corpus.Timing(
        time.perf_counter() - started, time.process_time() - cpu_started, raw_words, model.workers
    )
    return model, scan_seconds, timing


def jvm_cpu_seconds(spark: SparkSession) -> float | None:
    """CPU seconds the Spark JVM has used so far, from /proc (None where there is none)."""
    stat = Path(f"/proc/{spark._jvm.java.lang.ProcessHandle.current().pid()}/stat")
    if not stat.is_file():
        return None
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def describe(timing: corpus.Timing) -> str:
    return f"{timing.words_per_s:,.0f} words/s ({100 * timing.cpu_utilisation:.0f}% CPU)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="synthetic products")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="ours/raw training pairs")
    parser.add_argument("--fresh", action="store_true", help="rebuild the clean catalog")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    config = load_config(
        ["local"],
        [
            f"workdir={WORKDIR}",
            f"catalog.synthetic.rows={args.rows}",
            f"word2vec.epochs={args.epochs}",
        ],
    )
    settings = config.word2vec
    spark = get_spark(config.spark)
    cores = spark.sparkContext.defaultParallelism
    workers = corpus.workers(settings)
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
        f"Spark {spark.sparkContext.master}, gensim workers {workers}; "
        f"word2vec {settings.algorithm} dims={settings.dims} window={settings.window} "
        f"negative={settings.negative} epochs={settings.epochs} min_count={settings.min_count}"
    )
    ensure_clean(config, spark, args.fresh)

    # 1. The whole stage.
    started = time.perf_counter()
    result = run_stage("corpus", config, spark)
    stage_seconds = time.perf_counter() - started
    m = result.metrics
    words, documents = result.rows["words"], result.rows["documents"]
    print(
        f"corpus: {documents:,} documents, {words:,} words, "
        f"vocabulary {result.rows['vocabulary']:,}"
    )
    print(
        f"stage: {stage_seconds:.1f} s in all = corpus {m['seconds_corpus']:.1f} s + "
        f"Spark vocabulary {m['seconds_vocabulary']:.1f} s + concatenate "
        f"{m['seconds_concatenate']:.2f} s + training {m['seconds_train']:.1f} s "
        f"+ saving and MLflow"
    )
    corpus_file = corpus.concatenate(Path(result.outputs["corpus"]), WORKDIR / "corpus.txt")
    vocabulary = Vocabulary.load(Path(result.outputs["vocabulary"]))

    # 2. Pairs on the same file. Pair 1: the stage above, then raw gensim. Later pairs: the
    #    stage's training function and raw gensim, in alternating order.
    stats = corpus.CorpusStats(documents, words, 0, 0)

    def ours() -> corpus.Timing:
        callback = corpus.EpochMetrics(words)
        _, timing = corpus.train(
            settings, corpus.training_seed(config), vocabulary, corpus_file, stats, callback
        )
        print(
            "  ours, words/s per epoch: "
            + ", ".join(f"{rate:,.0f}" for rate in callback.words_per_s)
        )
        return timing

    seconds = m["seconds_train"]
    stage = corpus.Timing(
        seconds,
        seconds * workers * m["train_cpu_utilisation"],
        round(m["train_words_per_s"] * seconds),
        workers,
    )
    model, scan_seconds, raw = raw_gensim(config, corpus_file)
    counts = dict(zip(model.wv.index_to_key, model.wv.expandos["count"].tolist(), strict=True))
    print(
        f"gensim's own scan finds the vocabulary Spark counted: "
        f"{counts == vocabulary.frequencies()}"
    )
    pairs, scans = [(stage, raw)], [scan_seconds]
    for pair in range(2, args.rounds + 1):
        if pair % 2 == 0:
            _, scan_seconds, raw = raw_gensim(config, corpus_file)
            pairs.append((ours(), raw))
        else:
            timing = ours()
            _, scan_seconds, raw = raw_gensim(config, corpus_file)
            pairs.append((timing, raw))
        scans.append(scan_seconds)
    for pair, (a, b) in enumerate(pairs, 1):
        what = (
            "whole stage, then raw"
            if pair == 1
            else ("raw first" if pair % 2 == 0 else "ours first")
        )
        per_cpu = (a.raw_words / a.cpu_seconds) / (b.raw_words / b.cpu_seconds)
        print(
            f"pair {pair} ({what}): ours {describe(a)}, raw gensim corpus_file {describe(b)}, "
            f"ratio {a.words_per_s / b.words_per_s:.3f} (per CPU-second {per_cpu:.3f})"
        )
    ratio = statistics.median(a.words_per_s / b.words_per_s for a, b in pairs)

    # 3. Vocabulary: Spark's count against gensim's scan.
    started = time.perf_counter()
    corpus.build_vocabulary(
        corpus.count_words(spark, Path(result.outputs["corpus"])),
        settings.min_count,
        settings.max_vocab,
    )
    spark_seconds = time.perf_counter() - started
    scan_seconds = statistics.median(scans)
    print(
        f"vocabulary: Spark count {spark_seconds:.2f} s "
        f"({words / spark_seconds:,.0f} words/s on {cores} cores), gensim build_vocab scan "
        f"{scan_seconds:.2f} s ({words / scan_seconds:,.0f} words/s, one thread)"
    )

    # 4. Spark MLlib, one iteration, against gensim per CPU-second (measured CPU time: the
    #    JVM's for MLlib, this process's for gensim).
    lines = spark.read.text(result.outputs["corpus"]).select(tokens("value").alias("tokens"))
    lines = lines.cache()
    lines.count()
    mllib = MLlibWord2Vec(
        vectorSize=settings.dims,
        minCount=settings.min_count,
        windowSize=settings.window,
        maxIter=1,
        numPartitions=cores,
        seed=corpus.training_seed(config),
        inputCol="tokens",
        outputCol="vector",
    )
    started, cpu_started = time.perf_counter(), jvm_cpu_seconds(spark)
    mllib.fit(lines)
    mllib_seconds = time.perf_counter() - started
    if cpu_started is None:  # no /proc: assume every core busy
        mllib_cpu = mllib_seconds * cores
    else:
        mllib_cpu = jvm_cpu_seconds(spark) - cpu_started
    lines.unpersist()
    mllib_rate = words / mllib_cpu
    print(
        f"Spark MLlib Word2Vec, 1 iteration on {cores} partitions: {mllib_seconds:.1f} s, "
        f"{words / mllib_seconds:,.0f} words/s, {mllib_cpu:.1f} CPU-s"
    )
    _, _, sg_hs = raw_gensim(config, corpus_file, sg=1, hs=1, negative=0, epochs=1)
    sg_hs_rate = sg_hs.raw_words / sg_hs.cpu_seconds
    gensim_rate = statistics.median(b.raw_words / b.cpu_seconds for _, b in pairs)
    print(
        f"words per CPU-second: gensim {settings.algorithm} {gensim_rate:,.0f}, gensim "
        f"skip-gram+hs {sg_hs_rate:,.0f}, Spark MLlib Word2Vec (skip-gram+hs) {mllib_rate:,.0f}"
        f" = {mllib_rate / gensim_rate:.3f}x gensim {settings.algorithm}, "
        f"{mllib_rate / sg_hs_rate:.3f}x gensim skip-gram+hs"
    )
    corpus_file.unlink()
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"RESULT word2vec ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
