"""The corpus + word2vec stage end to end: the corpus files, a vocabulary that is exactly
Spark's count of them, vectors that put co-occurring words near each other, the MLflow run,
and a clear failure when no word is frequent enough."""

from __future__ import annotations

import itertools
import random
import shutil
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import pytest
from gensim.models import KeyedVectors

from pipelines.core.config import Config, load_config
from pipelines.core.errors import CorpusError, EmptyVocabularyError, ProdvecError
from pipelines.core.outputs import COMPLETION_RECORD, StageResult, check_corpus
from pipelines.data.catalog import CLEAN_SCHEMA, seal_catalog
from pipelines.data.tokenizer import Vocabulary, tokenize
from pipelines.stages.registry import run_stage
from pipelines.training.inputs import word_vectors

# Planted structure: titles and descriptions draw words from one topic each.
TOPICS = {
    "shoes": "running sneaker trail cushioned mesh laces sole jogging",
    "kitchen": "skillet saucepan nonstick cast iron lid simmer cookware",
    "audio": "headphones wireless bass earcups bluetooth noise cancelling stereo",
    "garden": "shovel rake hose planter soil seeds pruning trowel",
    "beauty": "serum moisturizer retinol hydrating spf cleanser toner vitamin",
    "toys": "puzzle lego blocks dollhouse plush teddy crayons kite",
}
COMMON = ["new", "set", "pack", "with"]
MIN_COUNT = 3


def _planted_rows(n: int = 3000) -> list[tuple]:
    rng = random.Random(11)
    topics = [words.split() for words in TOPICS.values()]
    rows = []
    for i in range(n):
        words = topics[i % len(topics)]
        title = [*rng.sample(words, 5), rng.choice(COMMON)]
        rng.shuffle(title)
        if i < 2:
            title.append("rareword")  # 2 < MIN_COUNT: never in the vocabulary
        description = [*rng.choices(words, k=8), *rng.sample(COMMON, 2)]
        if i % 10 == 0:
            description.append("descword")
        bullets = ["bulletword " + rng.choice(words), ""] if i % 3 == 0 else None
        rows.append(
            (
                f"p{i}",
                " ".join(title),
                " ".join(title).upper(),
                " ".join(description) if i % 7 else None,
                bullets,
                "brandword" if i % 4 == 0 else None,  # brand
                None,  # keywords
                None,  # category_path
                None,  # price
                None,  # currency
                "unknown",
                "en_US",
                None,
                None,
                f"h{i}",
                "planted",
            )
        )
    return rows


def _config(workdir: Path, *overrides: str) -> Config:
    return load_config(
        overrides=[
            f"workdir={workdir}",
            f"word2vec.min_count={MIN_COUNT}",
            "word2vec.dims=24",
            "word2vec.epochs=8",
            "word2vec.workers=2",
            "word2vec.neighbours=3",
            "word2vec.probe_words=[Sneaker, skillet, zzzmissing]",
            *overrides,
        ]
    )


def _expected_counts(rows: list[tuple], fields: list[str]) -> Counter:
    """An independent count in plain Python: what Spark must have found."""
    column = {"title": 1, "description": 3, "bullets": 4, "brand": 5}
    counts: Counter = Counter()
    for row in rows:
        for field in fields:
            value = row[column[field]]
            text = " ".join(value) if isinstance(value, list) else value
            counts.update(tokenize(text))
    return counts


@pytest.fixture(scope="module")
def planted(spark, tmp_path_factory) -> tuple[Config, list[tuple], StageResult]:
    config = _config(tmp_path_factory.mktemp("planted"))
    rows = _planted_rows()
    spark.createDataFrame(rows, CLEAN_SCHEMA).write.parquet(str(config.outputs.clean_catalog))
    seal_catalog(config.outputs.clean_catalog, len(rows), config)
    return config, rows, run_stage("corpus", config, spark)


def test_corpus_is_one_document_a_line(planted):
    config, rows, result = planted
    parts = sorted(Path(result.outputs["corpus"]).glob("part-*"))
    assert parts, "no part files written"
    lines = [line for part in parts for line in part.read_text().splitlines()]
    expected = [" ".join(tokenize(row[i])) for row in rows for i in (1, 3) if tokenize(row[i])]
    assert sorted(lines) == sorted(expected)
    assert result.rows["documents"] == len(expected)
    assert result.rows["words"] == sum(len(line.split(" ")) for line in expected)
    assert not (config.outputs.corpus / "train-corpus.txt").exists()


def test_vocabulary_is_the_count_of_the_corpus(planted):
    _, rows, result = planted
    vocabulary = Vocabulary.load(Path(result.outputs["vocabulary"]))
    counts = _expected_counts(rows, ["title", "description"])
    assert vocabulary == Vocabulary.from_counts(counts.keys(), counts.values(), MIN_COUNT)
    assert "rareword" not in vocabulary.frequencies()
    assert "descword" in vocabulary.frequencies()
    assert "bulletword" not in vocabulary.frequencies()  # bullets not among the fields
    assert result.rows["vocabulary"] == len(vocabulary) == len(counts) - 1


def test_vectors_are_aligned_with_vocabulary_ids(planted):
    _, _, result = planted
    vocabulary = Vocabulary.load(Path(result.outputs["vocabulary"]))
    vectors = KeyedVectors.load(result.outputs["vectors"])
    assert vectors.vector_size == 24
    assert vectors.index_to_key == vocabulary.words.to_pylist()
    matrix = vocabulary.embedding_matrix(vectors)
    assert np.array_equal(matrix[2:], vectors.vectors)
    assert not matrix[:2].any()


def _mean_cosine(vectors: KeyedVectors, pairs: list[tuple[str, str]]) -> float:
    return float(np.mean([vectors.similarity(a, b) for a, b in pairs]))


def test_words_of_one_topic_end_up_nearer_than_words_of_different_topics(planted):
    _, _, result = planted
    vectors = KeyedVectors.load(result.outputs["vectors"])
    topics = [words.split() for words in TOPICS.values()]
    within = [pair for words in topics for pair in itertools.combinations(words, 2)]
    across = [(a, b) for t, u in itertools.combinations(topics, 2) for a in t for b in u]
    near, far = _mean_cosine(vectors, within), _mean_cosine(vectors, across)
    assert near > far + 0.5, (near, far)


def test_neighbour_table_lists_probe_words_in_the_vocabulary(planted):
    _, _, result = planted
    lines = Path(result.outputs["neighbours"]).read_text().splitlines()
    assert lines[0] == "probe\trank\tneighbour\tsimilarity"
    table = [line.split("\t") for line in lines[1:]]
    assert [(probe, int(rank)) for probe, rank, _, _ in table] == [
        ("sneaker", 1),
        ("sneaker", 2),
        ("sneaker", 3),
        ("skillet", 1),
        ("skillet", 2),
        ("skillet", 3),
    ]  # probes are lower-cased; "zzzmissing" has no vector and no rows
    similarities = [float(row[3]) for row in table[:3]]
    assert similarities == sorted(similarities, reverse=True)
    assert table[0][2] in TOPICS["shoes"].split()


def test_mlflow_run_holds_metrics_per_epoch_and_artifacts(planted):
    config, _, result = planted
    mlflow.set_tracking_uri(f"sqlite:///{config.workdir / 'mlflow.db'}")
    run = mlflow.search_runs(
        experiment_names=["prodvec"],
        output_format="list",
        filter_string="tags.`prodvec.stage` = 'corpus'",
    )[0]
    metrics = run.data.metrics
    assert metrics["vocabulary_size"] == result.rows["vocabulary"]
    assert metrics["corpus_words"] == result.rows["words"]
    assert metrics["train_words_per_s"] > 0
    client = mlflow.MlflowClient()
    for key in ("words_per_s", "train_loss"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [point.step for point in history] == list(range(1, config.word2vec.epochs + 1))
        assert all(point.value > 0 for point in history)
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"vocabulary.parquet", "word2vec.kv", "neighbours.tsv"} <= artifacts


def test_rerun_gives_the_same_vocabulary(planted, spark):
    config, _, result = planted
    first = Vocabulary.load(Path(result.outputs["vocabulary"]))
    partitions = spark.conf.get("spark.sql.shuffle.partitions")
    spark.conf.set("spark.sql.shuffle.partitions", "3")  # different grouping, same counts
    try:
        again = run_stage("corpus", config, spark)
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", partitions)
    assert Vocabulary.load(Path(again.outputs["vocabulary"])) == first


def test_fields_choose_the_text_that_feeds_the_corpus(planted, spark, tmp_path, shared_tracking):
    _, rows, _ = planted
    config = _config(
        tmp_path,
        "word2vec.fields=[title, bullets, brand]",
        "word2vec.algorithm=skipgram",
        shared_tracking,
    )
    spark.createDataFrame(rows, CLEAN_SCHEMA).write.parquet(str(config.outputs.clean_catalog))
    seal_catalog(config.outputs.clean_catalog, len(rows), config)
    result = run_stage("corpus", config, spark)
    vocabulary = Vocabulary.load(Path(result.outputs["vocabulary"]))
    counts = _expected_counts(rows, ["title", "bullets", "brand"])
    assert vocabulary == Vocabulary.from_counts(counts.keys(), counts.values(), MIN_COUNT)
    words = vocabulary.frequencies()
    assert "bulletword" in words and "brandword" in words and "descword" not in words


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("word2vec.min_count=100000", r"min_count=100000 .* documents, [1-9][\d,]* words"),
        ("word2vec.fields=[bullets]", r"min_count=3 .* 0 documents, 0 words"),  # none has any
    ],
)
def test_no_word_above_min_count_fails_clearly(
    planted, spark, tmp_path, shared_tracking, override, message
):
    _, rows, _ = planted
    config = _config(tmp_path, override, shared_tracking)
    spark.createDataFrame([row for row in rows[:50] if row[4] is None], CLEAN_SCHEMA).write.parquet(
        str(config.outputs.clean_catalog)
    )
    seal_catalog(config.outputs.clean_catalog, 50, config)
    with pytest.raises(EmptyVocabularyError, match=message) as error:
        run_stage("corpus", config, spark)
    assert isinstance(error.value, ProdvecError)
    assert "lower min_count or add fields" in str(error.value)
    assert not (config.outputs.word2vec).exists()


def test_readers_refuse_a_corpus_output_its_stage_did_not_finish(
    planted, spark, tmp_path, shared_tracking
):
    """The corpus folder is sealed last (vocabulary, vectors, neighbours with their sizes);
    shard and train refuse it, naming it, when a file is cut short or the record is gone."""
    source, _, _ = planted
    config = _config(tmp_path, shared_tracking)
    shutil.copytree(source.outputs.clean_catalog, config.outputs.clean_catalog)
    shutil.copytree(source.outputs.corpus, config.outputs.corpus)
    record = check_corpus(config.outputs)
    assert {"vocabulary.parquet", "word2vec.kv", "neighbours.tsv"} <= set(record["files"])
    vectors = max(config.outputs.corpus.glob("word2vec.kv*"), key=lambda p: p.stat().st_size)
    with vectors.open("r+b") as handle:
        handle.truncate(vectors.stat().st_size // 2)
    with pytest.raises(CorpusError, match=r"corpus output .* not the one its stage sealed .* 1 of"):
        run_stage("shard", config, spark)
    (config.outputs.corpus / COMPLETION_RECORD).unlink()
    with pytest.raises(CorpusError, match=r"corpus output .* has no completion record"):
        word_vectors(config, config.outputs.shards, tmp_path)


# --- real catalogs through the clean stage ---------------------------------------------


def _cooccurrence_gap(spark, config: Config, result: StageResult) -> tuple[float, float]:
    """Mean cosine of word pairs that often share a title, and of random vocabulary pairs."""
    vectors = KeyedVectors.load(result.outputs["vectors"])
    vocabulary = set(vectors.index_to_key)
    titles = [
        row["title"]
        for row in spark.read.parquet(str(config.outputs.clean_catalog)).select("title").collect()
    ]
    single: Counter = Counter()
    pairs: Counter = Counter()
    for title in titles:
        words = sorted(set(tokenize(title)) & vocabulary)
        single.update(words)
        pairs.update(itertools.combinations(words, 2))
    # Pairs seen together in at least half the titles of the rarer word, and often.
    strong = [
        (pair, n)
        for pair, n in pairs.items()
        if n >= 10 and n >= 0.5 * min(single[pair[0]], single[pair[1]])
    ]
    strong = [pair for pair, _ in sorted(strong, key=lambda item: (-item[1], item[0]))[:300]]
    rng = random.Random(5)
    words = sorted(vocabulary)
    random_pairs = [tuple(rng.sample(words, 2)) for _ in range(300)]
    assert len(strong) >= 30, f"only {len(strong)} strongly co-occurring pairs"
    return _mean_cosine(vectors, strong), _mean_cosine(vectors, random_pairs)


@pytest.mark.slow
def test_synthetic_catalog_cooccurring_title_words_are_nearer(spark, tmp_path):
    config = load_config(overrides=[f"workdir={tmp_path}", "catalog.synthetic.rows=2000"])
    run_stage("clean", config, spark)
    result = run_stage("corpus", config, spark)
    near, far = _cooccurrence_gap(spark, config, result)
    assert near > far + 0.3, (near, far)


@pytest.mark.shared_data
def test_flipkart_cooccurring_title_words_are_nearer(spark, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PRODVEC_DATA", str(shared_data))
    config = load_config(["flipkart"], [f"workdir={tmp_path}"])
    run_stage("clean", config, spark)
    result = run_stage("corpus", config, spark)
    near, far = _cooccurrence_gap(spark, config, result)
    assert near > far + 0.15, (near, far)
