"""Corpus + word2vec stage: Spark builds the corpus and counts its words, gensim trains.

Spark does the data-parallel part: tokenise the clean catalog's text fields
(`pipelines.data.tokenizer`), write the corpus as text part files (one document a line), and
count every word of those files; the vocabulary (`min_count`, `max_vocab`) comes from
those counts. gensim then trains on the driver in `corpus_file` mode: its worker threads
each read their own slice of one file in C, with no Python iterator to starve them, and
it receives the vocabulary through `build_vocab_from_freq`, so its single-threaded
vocabulary scan never runs. The part files are concatenated into that one file for the
length of the training and removed afterwards.

Outputs under `<workdir>/<catalog>/corpus/`: `corpus/` (part files), `vocabulary.parquet`
(id, word, count; `pipelines.data.tokenizer.Vocabulary`), `word2vec.kv` (gensim KeyedVectors,
row i = vocabulary id i + 2) and `neighbours.tsv` (nearest words of the probe words).
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
from gensim.models import KeyedVectors, Word2Vec
from gensim.models.callbacks import CallbackAny2Vec
from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from pipelines.core.config import Config, Word2VecConfig
from pipelines.core.errors import EmptyVocabularyError
from pipelines.core.outputs import COMPLETION_RECORD, StageResult, seal
from pipelines.data.catalog import read_clean, text_column
from pipelines.data.tokenizer import Vocabulary, tokens

__all__ = [
    "CorpusStats",
    "EpochMetrics",
    "Timing",
    "build_vocabulary",
    "concatenate",
    "count_words",
    "documents",
    "new_model",
    "run",
    "train",
    "training_seed",
    "workers",
    "write_corpus",
    "write_neighbours",
]

log = logging.getLogger(__name__)

_COPY_BUFFER = 16 << 20


@dataclass(frozen=True)
class CorpusStats:
    documents: int  # corpus lines
    words: int  # tokens in the corpus, every one (what gensim calls raw words)
    distinct_words: int
    top_count: int  # count of the most frequent word (0 for an empty corpus)


def documents(catalog: DataFrame, fields: Sequence[str]) -> DataFrame:
    """One corpus line per product and text field (list fields joined), tokens joined by one
    space; empty lines dropped. Columns: `line`, `words` (its token count)."""
    lines = catalog.select(F.explode(F.array(*map(text_column, fields))).alias("text"))
    lines = lines.select(tokens("text").alias("tokens"))
    return lines.filter(F.size("tokens") > 0).select(
        F.array_join("tokens", " ").alias("line"), F.size("tokens").alias("words")
    )


def write_corpus(lines: DataFrame, path: Path) -> tuple[int, int]:
    """Write the lines as uncompressed text part files; return (documents, words), counted
    while writing."""
    seen = Observation("corpus")
    lines.observe(seen, F.count(F.lit(1)).alias("documents"), F.sum("words").alias("words")).select(
        "line"
    ).write.mode("overwrite").option("compression", "none").text(str(path))
    metrics = seen.get
    return metrics["documents"], metrics["words"] or 0


def count_words(spark: SparkSession, corpus: Path) -> DataFrame:
    """word, count over the written corpus files: exactly the tokens gensim will read."""
    words = spark.read.text(str(corpus)).select(F.explode(tokens("value")).alias("word"))
    return words.groupBy("word").count()


def build_vocabulary(
    counts: DataFrame, min_count: int, max_vocab: int
) -> tuple[Vocabulary, int, int]:
    """The vocabulary from Spark's counts: only its `max_vocab` rows reach the driver (as
    Arrow). Returns (vocabulary, distinct words, top count)."""
    seen = Observation("vocabulary")
    top = (
        counts.observe(seen, F.count(F.lit(1)).alias("distinct"), F.max("count").alias("top"))
        .filter(F.col("count") >= min_count)
        .orderBy(F.desc("count"), F.asc("word"))
        .limit(max_vocab)
        .toArrow()
    )
    vocabulary = Vocabulary.from_counts(top["word"], top["count"], min_count, max_vocab)
    return vocabulary, seen.get["distinct"], seen.get["top"] or 0


def concatenate(parts_dir: Path, target: Path) -> Path:
    """Spark's part files, in name order, as the one file `corpus_file` mode reads."""
    with target.open("wb") as out:
        for part in sorted(parts_dir.glob("part-*")):
            with part.open("rb") as source:
                shutil.copyfileobj(source, out, _COPY_BUFFER)
    return target


class EpochMetrics(CallbackAny2Vec):
    """Words/s and training loss per epoch.

    gensim's loss counter is cumulative float32 and, in `corpus_file` mode, each worker
    thread adds to a copy it took at the epoch's start, the last to finish writing it back
    (gensim issues #2735, #2743). Resetting it at every epoch start logs per-epoch deltas
    and keeps float32 from saturating; the value is one worker's share of the epoch's
    loss, so compare it across epochs of one run, not across worker counts.
    """

    def __init__(self, corpus_words: int) -> None:
        self.corpus_words = corpus_words
        self.started = 0.0
        self.words_per_s: list[float] = []  # corpus words / epoch seconds
        self.losses: list[float] = []

    def on_epoch_begin(self, model: Word2Vec) -> None:
        model.running_training_loss = 0.0
        self.started = time.perf_counter()

    def on_epoch_end(self, model: Word2Vec) -> None:
        self.words_per_s.append(self.corpus_words / (time.perf_counter() - self.started))
        self.losses.append(float(model.get_latest_training_loss()))
        epoch = len(self.losses)
        log.info(
            "word2vec epoch %d: %.0f words/s, loss %.4g",
            epoch,
            self.words_per_s[-1],
            self.losses[-1],
        )
        if mlflow.active_run():
            mlflow.log_metrics(
                {"words_per_s": self.words_per_s[-1], "train_loss": self.losses[-1]}, step=epoch
            )


def workers(settings: Word2VecConfig) -> int:
    return settings.workers or os.cpu_count() or 1


def training_seed(config: Config) -> int:
    return config.seed if config.word2vec.seed is None else config.word2vec.seed


def new_model(settings: Word2VecConfig, seed: int) -> Word2Vec:
    """An untrained Word2Vec with the configured parameters. `sorted_vocab=0` keeps the
    vocabulary's own order (gensim's sort reverses ties), so KeyedVectors row = id - 2."""
    return Word2Vec(
        vector_size=settings.dims,
        window=settings.window,
        min_count=settings.min_count,
        sample=settings.sample,
        seed=seed,
        workers=workers(settings),
        sg=int(settings.algorithm == "skipgram"),
        hs=0,
        negative=settings.negative,
        epochs=settings.epochs,
        sorted_vocab=0,
    )


@dataclass(frozen=True)
class Timing:
    """One `train` call: wall and CPU seconds, and the raw words gensim went through."""

    seconds: float
    cpu_seconds: float  # this process's CPU time: gensim's worker threads, nothing else
    raw_words: int
    workers: int

    @property
    def words_per_s(self) -> float:
        return self.raw_words / self.seconds

    @property
    def cpu_utilisation(self) -> float:
        """1.0 when every worker thread had a core all along; less when starved."""
        return self.cpu_seconds / self.seconds / self.workers


def train(
    settings: Word2VecConfig,
    seed: int,
    vocabulary: Vocabulary,
    corpus_file: Path,
    stats: CorpusStats,
    callback: EpochMetrics,
) -> tuple[Word2Vec, Timing]:
    """Train in corpus_file mode on the Spark-counted vocabulary."""
    model = new_model(settings, seed)
    model.build_vocab_from_freq(vocabulary.frequencies(), corpus_count=stats.documents)
    started, cpu_started = time.perf_counter(), time.process_time()
    _, raw_words = model.train(
        corpus_file=str(corpus_file),
        total_examples=stats.documents,
        total_words=stats.words,
        epochs=settings.epochs,
        compute_loss=True,
        callbacks=[callback],
    )
    timing = Timing(
        time.perf_counter() - started, time.process_time() - cpu_started, raw_words, model.workers
    )
    return model, timing


def write_neighbours(vectors: KeyedVectors, probes: list[str], k: int, path: Path) -> list[str]:
    """probe, rank, neighbour, cosine similarity; returns the probes not in the vocabulary."""
    missing = []
    with path.open("w", newline="") as out:
        table = csv.writer(out, delimiter="\t", lineterminator="\n")
        table.writerow(["probe", "rank", "neighbour", "similarity"])
        for probe in dict.fromkeys(word.lower() for word in probes):
            if probe not in vectors.key_to_index:
                missing.append(probe)
                continue
            for rank, (word, similarity) in enumerate(vectors.most_similar(probe, topn=k), 1):
                table.writerow([probe, rank, word, f"{similarity:.4f}"])
    return missing


def run(spark: SparkSession, config: Config) -> StageResult:
    """Corpus -> counts -> vocabulary -> gensim -> vectors, vocabulary and neighbour table."""
    settings = config.word2vec
    out = config.outputs.corpus
    out.mkdir(parents=True, exist_ok=True)
    corpus_dir, corpus_file = out / "corpus", out / "train-corpus.txt"
    vocabulary_file, vectors_file = config.outputs.vocabulary, config.outputs.word2vec
    neighbours_file = out / "neighbours.tsv"
    record = out / COMPLETION_RECORD  # first: readers refuse the folder until the new one
    for stale in [record, vocabulary_file, neighbours_file, *out.glob(f"{vectors_file.name}*")]:
        stale.unlink(missing_ok=True)  # never leave a previous run's model beside a new corpus
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    lines = documents(read_clean(spark, config), settings.fields)
    n_docs, n_words = write_corpus(lines, corpus_dir)
    seconds["corpus"] = time.perf_counter() - started

    started = time.perf_counter()
    vocabulary, distinct, top = build_vocabulary(
        count_words(spark, corpus_dir), settings.min_count, settings.max_vocab
    )
    seconds["vocabulary"] = time.perf_counter() - started
    stats = CorpusStats(n_docs, n_words, distinct, top)
    log.info("corpus: %s; vocabulary %d words", stats, len(vocabulary))
    if not len(vocabulary):
        raise EmptyVocabularyError(
            f"no word occurs at least word2vec.min_count={settings.min_count} times in the "
            f"corpus of {config.catalog.name} (fields {settings.fields}: {stats.documents:,} "
            f"documents, {stats.words:,} words, {stats.distinct_words:,} distinct, the most "
            f"frequent seen {stats.top_count} times); lower min_count or add fields"
        )
    vocabulary.save(vocabulary_file)

    started = time.perf_counter()
    concatenate(corpus_dir, corpus_file)
    seconds["concatenate"] = time.perf_counter() - started
    callback = EpochMetrics(stats.words)
    try:
        model, timing = train(
            settings, training_seed(config), vocabulary, corpus_file, stats, callback
        )
    finally:
        corpus_file.unlink(missing_ok=True)
    seconds["train"] = timing.seconds
    if model.wv.index_to_key != vocabulary.words.to_pylist():
        raise RuntimeError("gensim reordered the vocabulary (bug: please report)")

    model.wv.save(str(vectors_file))
    missing = write_neighbours(model.wv, settings.probe_words, settings.neighbours, neighbours_file)
    if missing:
        log.warning("probe words not in the vocabulary: %s", ", ".join(missing))
    published = [vocabulary_file, neighbours_file, *out.glob(f"{vectors_file.name}*")]
    seal(out, [path.name for path in published], stats.documents, config.digest())

    metrics = {
        "vocabulary_size": len(vocabulary),
        "corpus_documents": stats.documents,
        "corpus_words": stats.words,
        "distinct_words": stats.distinct_words,
        "oov_rate": 1 - int(vocabulary.counts.sum()) / stats.words,
        "train_words_per_s": timing.words_per_s,
        "train_workers": timing.workers,
        "train_cpu_utilisation": timing.cpu_utilisation,
        "final_train_loss": callback.losses[-1],
        "estimated_model_bytes": model.estimate_memory()["total"],
        **{f"seconds_{phase}": value for phase, value in seconds.items()},
    }
    if mlflow.active_run():
        for path in [vocabulary_file, neighbours_file, *sorted(out.glob("word2vec.kv*"))]:
            mlflow.log_artifact(str(path))
    log.info(
        "word2vec: %d words x %d dims, %.0f training words/s on %d workers (%.0f%% busy)",
        len(vocabulary),
        settings.dims,
        timing.words_per_s,
        timing.workers,
        100 * timing.cpu_utilisation,
    )
    return StageResult(
        rows={"documents": stats.documents, "words": stats.words, "vocabulary": len(vocabulary)},
        outputs={
            "corpus": str(corpus_dir),
            "vocabulary": str(vocabulary_file),
            "vectors": str(vectors_file),
            "neighbours": str(neighbours_file),
        },
        metrics=metrics,
    )
