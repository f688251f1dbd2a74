"""The shared tokenizer and vocabulary: one tokenisation in Spark, Python, Arrow and gensim's
corpus reader; deterministic ids; encoding that pads, truncates and maps unknown words."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from gensim.models import KeyedVectors
from gensim.models.word2vec_corpusfile import CythonLineSentence
from pyspark.sql import types as T

from pipelines.core.errors import VocabularyError
from pipelines.data.tokenizer import (
    FIRST_WORD_ID,
    OOV_ID,
    PAD_ID,
    Vocabulary,
    encode_column,
    tokenize,
    tokenize_arrow,
    tokens,
)

TEXTS = [
    "nike air max running shoes",
    "  leading and trailing  ",
    "tabs\tand\x0bvertical\x0cfeeds\rand\r\nnewlines",
    "a  b   c",
    "dots 2.5 kg 1.0.1",
    "not\x1csplit\xa0either",  # not ASCII whitespace: one token, everywhere
    "café",
    "",
    "   ",
    None,
]


def test_spark_python_and_arrow_tokenise_alike(spark):
    frame = spark.createDataFrame([(i, text) for i, text in enumerate(TEXTS)], "i int, text string")
    rows = frame.select("i", tokens("text").alias("tokens")).orderBy("i").collect()
    by_spark = [row["tokens"] for row in rows]
    by_python = [tokenize(text) for text in TEXTS]
    assert by_spark == by_python
    assert tokenize_arrow(TEXTS).to_pylist() == by_python
    assert tokenize_arrow(np.array([t or "" for t in TEXTS])).to_pylist() == by_python
    assert by_python[2] == ["tabs", "and", "vertical", "feeds", "and", "newlines"]
    assert by_python[5] == ["not\x1csplit\xa0either"]
    assert by_python[7:] == [[], [], []]


def test_gensim_corpus_file_reader_reads_the_same_tokens(tmp_path):
    lines = [text for text in TEXTS if text and "\n" not in text and "\r" not in text]
    path = tmp_path / "corpus.txt"
    path.write_bytes(("\n".join(lines) + "\n").encode())
    read = [[word.decode() for word in sentence] for sentence in CythonLineSentence(str(path))]
    assert read == [tokenize(line) for line in lines if tokenize(line)]


def test_tokenize_arrow_handles_sliced_and_chunked_input():
    array = pa.array(["x y", " a  b ", None, "c"])
    assert tokenize_arrow(array.slice(1)).to_pylist() == [["a", "b"], [], ["c"]]
    chunked = pa.chunked_array([["p q"], [None, " r "]])
    assert tokenize_arrow(chunked).to_pylist() == [["p", "q"], [], ["r"]]


def test_vocabulary_orders_by_count_then_word_and_trims():
    counts = {"shoe": 5, "red": 7, "blue": 5, "nike": 9, "rare": 1, "air": 5}
    vocabulary = Vocabulary.from_counts(counts.keys(), counts.values(), min_count=2, max_size=4)
    assert vocabulary.words.to_pylist() == ["nike", "red", "air", "blue"]  # "shoe" loses the tie
    assert vocabulary.counts.tolist() == [9, 7, 5, 5]
    assert len(vocabulary) == 4
    assert list(vocabulary.frequencies().items()) == [
        ("nike", 9),
        ("red", 7),
        ("air", 5),
        ("blue", 5),
    ]


def test_vocabulary_does_not_depend_on_input_order():
    words = [f"w{i}" for i in range(300)]
    counts = [i % 7 + 1 for i in range(300)]  # many ties
    expected = Vocabulary.from_counts(words, counts, min_count=2, max_size=150)
    pairs = list(zip(words, counts, strict=True))
    random.Random(3).shuffle(pairs)
    shuffled = Vocabulary.from_counts([w for w, _ in pairs], [c for _, c in pairs], 2, 150)
    assert shuffled == expected
    assert expected.counts.min() >= 2 and len(expected) == 150


def test_vocabulary_rejects_repeated_words_and_misaligned_counts():
    with pytest.raises(VocabularyError, match="repeat"):
        Vocabulary.from_counts(["a", "b", "a"], [3, 2, 1])
    with pytest.raises(VocabularyError, match="2 words but 1 counts"):
        Vocabulary(pa.array(["a", "b"]), np.array([1]))


def test_encode_pads_truncates_and_maps_unknown_words():
    vocabulary = Vocabulary.from_counts(["the", "cat", "dog"], [3, 2, 1])
    the, cat, dog = (FIRST_WORD_ID + i for i in range(3))
    docs = [["the", "cat", "zebra"], None, [], ["dog"] * 5, ["cat"]]
    encoded = vocabulary.encode(docs, 3)
    assert encoded.dtype == np.int32 and encoded.shape == (5, 3)
    assert encoded.tolist() == [
        [the, cat, OOV_ID],
        [PAD_ID] * 3,
        [PAD_ID] * 3,
        [dog] * 3,
        [cat, PAD_ID, PAD_ID],
    ]
    arrow = pa.array(docs, pa.list_(pa.string()))
    assert np.array_equal(vocabulary.encode(arrow, 3), encoded)
    assert np.array_equal(vocabulary.encode(arrow.slice(3), 3), encoded[3:])
    assert vocabulary.ids(["dog", "zebra"]).tolist() == [dog, OOV_ID]
    with pytest.raises(ValueError, match="max_len"):
        vocabulary.encode(docs, 0)


def test_save_and_load_round_trip_and_spark_reads_the_file(spark, tmp_path):
    vocabulary = Vocabulary.from_counts(["b", "a", "c"], [4, 4, 9])
    path = vocabulary.save(tmp_path / "vocabulary.parquet")
    assert Vocabulary.load(path) == vocabulary
    rows = spark.read.parquet(str(path)).orderBy("id").collect()
    assert [(r["id"], r["word"], r["count"]) for r in rows] == [
        (2, "c", 9),
        (3, "a", 4),
        (4, "b", 4),
    ]
    pq.write_table(pa.table({"id": [2], "word": ["x"], "count": [1]}), tmp_path / "other.parquet")
    with pytest.raises(VocabularyError, match="not a prodvec vocabulary"):
        Vocabulary.load(tmp_path / "other.parquet")


def test_spark_encoding_matches_python_encoding(spark):
    counts = Counter(word for text in TEXTS for word in tokenize(text))
    vocabulary = Vocabulary.from_counts(counts.keys(), counts.values(), min_count=2)
    titles = [*TEXTS, "nike zebra and and and and and and and and"]
    frame = spark.createDataFrame([(i, t) for i, t in enumerate(titles)], "i int, title string")
    shared = spark.sparkContext.broadcast(vocabulary)
    try:
        ids = encode_column(tokens("title"), shared, 6).alias("ids")
        encoded = frame.repartition(3).select("i", ids)
        assert encoded.schema["ids"].dataType == T.ArrayType(T.IntegerType(), False)
        rows = encoded.orderBy("i").collect()
    finally:
        shared.unpersist()
    expected = vocabulary.encode([tokenize(t) for t in titles], 6)
    assert [row["ids"] for row in rows] == expected.tolist()
    assert rows[-1]["ids"][1] == OOV_ID  # "zebra"


def test_embedding_matrix_rows_follow_ids_whatever_the_vector_order():
    vocabulary = Vocabulary.from_counts(["red", "blue", "green"], [5, 3, 1])
    vectors = KeyedVectors(vector_size=2)
    vectors.add_vectors(["green", "red", "blue"], np.array([[3, 3], [1, 1], [2, 2]], np.float32))
    matrix = vocabulary.embedding_matrix(vectors)
    assert matrix.tolist() == [[0, 0], [0, 0], [1, 1], [2, 2], [3, 3]]
    with pytest.raises(VocabularyError, match="no vector"):
        Vocabulary.from_counts(["red", "pink"], [2, 1]).embedding_matrix(vectors)
