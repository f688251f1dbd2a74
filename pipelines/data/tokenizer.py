"""The one tokenizer every stage uses, and the vocabulary that maps its tokens to ids.

Text reaching a tokenizer is already normalised by the clean stage
(`pipelines.data.text.normalize_text`: lower-case ASCII words separated by single spaces), so
tokenising is a split on ASCII whitespace that drops empty pieces. It exists in three
forms that give identical tokens, so a title is tokenised the same way by the corpus,
shard and inference stages:

- `tokens(col)`: a Spark Column (built-in `split` + `filter`, no Python UDF);
- `tokenize(text)`: one Python string;
- `tokenize_arrow(texts)`: a whole Arrow / numpy / Python batch at once, for inference.

The separator set is C's `isspace` in the "C" locale (space, \\t, \\n, \\v, \\f, \\r): what
gensim's `corpus_file` reader splits on, and what Arrow's `ascii_split_whitespace` uses,
so the corpus file gensim reads yields exactly these tokens too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import Column
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.core.errors import VocabularyError

if TYPE_CHECKING:
    from gensim.models import KeyedVectors
    from pyspark import Broadcast

__all__ = [
    "FIRST_WORD_ID",
    "OOV_ID",
    "PAD_ID",
    "SEPARATOR",
    "VOCABULARY_FILE",
    "Vocabulary",
    "encode_column",
    "tokenize",
    "tokenize_arrow",
    "tokens",
]

# One pattern that Java's and Python's regex engines read alike.
SEPARATOR = r"[ \t\n\x0B\f\r]+"
_SEPARATOR = re.compile(SEPARATOR)

PAD_ID = 0  # fills encoded rows past the last token
OOV_ID = 1  # every token not in the vocabulary
FIRST_WORD_ID = 2
VOCABULARY_FILE = "vocabulary.parquet"  # the file name wherever a vocabulary is saved
_FORMAT = {"format": "prodvec.vocabulary/1", "pad_id": PAD_ID, "oov_id": OOV_ID}


def tokens(col: Column | str) -> Column:
    """array<string> of the tokens of a text column; a null text gives an empty array."""
    text = F.coalesce(F.col(col) if isinstance(col, str) else col, F.lit(""))
    return F.filter(F.split(text, SEPARATOR), lambda token: token != "")


def tokenize(text: str | None) -> list[str]:
    """The tokens of one string, as `tokens` gives them in Spark."""
    return [token for token in _SEPARATOR.split(text) if token] if text else []


def _as_array(values: Any, type_: pa.DataType) -> pa.Array:
    """One contiguous Arrow array from Arrow, numpy or Python values (Arrow types kept)."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    return pa.array(values if isinstance(values, np.ndarray | Sequence) else list(values), type_)


def tokenize_arrow(
    texts: pa.Array | pa.ChunkedArray | np.ndarray | Sequence[str | None],
) -> pa.Array:
    """list<string> of tokens for a whole batch (nulls give empty lists), vectorised in Arrow."""
    split = pc.ascii_split_whitespace(_as_array(texts, pa.string()))
    values = pc.list_flatten(split)
    parents = pc.list_parent_indices(split)
    keep = pc.not_equal(pc.binary_length(values), 0)  # leading/trailing separators
    values, parents = values.filter(keep), parents.filter(keep)
    lengths = np.bincount(parents.to_numpy(), minlength=len(split))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """Words with ids by descending count, ties by word (so the same counts always give the
    same ids); id 0 is padding, id 1 every out-of-vocabulary word, words start at 2.

    Words live in one Arrow array (compact to keep and to broadcast); the hash index that
    maps tokens to ids is built on first use and never pickled.
    """

    words: pa.Array  # string, in id order: words[i] has id i + FIRST_WORD_ID
    counts: np.ndarray  # int64 corpus counts, same order

    def __post_init__(self) -> None:
        if len(self.words) != len(self.counts):
            raise VocabularyError(f"{len(self.words)} words but {len(self.counts)} counts")

    @classmethod
    def from_counts(
        cls,
        words: Iterable[str] | pa.Array | pa.ChunkedArray,
        counts: Iterable[int] | np.ndarray | pa.Array | pa.ChunkedArray,
        min_count: int = 1,
        max_size: int | None = None,
    ) -> Vocabulary:
        """Keep words seen at least `min_count` times, the `max_size` most frequent of them."""
        table = pa.table(
            {
                "word": _as_array(words, pa.string()).cast(pa.string()),
                "count": _as_array(counts, pa.int64()).cast(pa.int64()),
            }
        )
        table = table.filter(pc.greater_equal(table["count"], min_count))
        order = pc.sort_indices(table, sort_keys=[("count", "descending"), ("word", "ascending")])
        table = table.take(order).slice(0, max_size)
        vocabulary = cls(table["word"].combine_chunks(), table["count"].to_numpy())
        if not vocabulary._index.is_unique:
            raise VocabularyError("words repeat: count each word once before building a vocabulary")
        return vocabulary

    def __len__(self) -> int:
        """Number of words; ids in use are 0 .. len + 1 (two reserved)."""
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Vocabulary)
            and self.words.equals(other.words)
            and np.array_equal(self.counts, other.counts)
        )

    def __getstate__(self) -> dict[str, Any]:
        return {"words": self.words, "counts": self.counts}  # not the cached index

    @cached_property
    def _index(self) -> pd.Index:
        return pd.Index(self.words.to_numpy(zero_copy_only=False), dtype=object)

    def frequencies(self) -> dict[str, int]:
        """word -> count in id order (what gensim's `build_vocab_from_freq` takes)."""
        return dict(zip(self.words.to_pylist(), self.counts.tolist(), strict=True))

    def ids(self, tokens: Sequence[str] | np.ndarray | pa.Array) -> np.ndarray:
        """int32 id of each token, OOV_ID for unknown ones."""
        values = tokens.to_numpy(zero_copy_only=False) if isinstance(tokens, pa.Array) else tokens
        found = self._index.get_indexer(np.asarray(values, dtype=object))
        return np.where(found < 0, OOV_ID, found + FIRST_WORD_ID).astype(np.int32)

    def encode(
        self, docs: pa.Array | pa.ChunkedArray | Sequence[Sequence[str] | None], max_len: int
    ) -> np.ndarray:
        """(len(docs), max_len) int32 ids: the first `max_len` tokens, PAD_ID after the last.

        One hash lookup for all tokens of the batch and one scatter; no Python loop per row.
        """
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        lists = _as_array(docs, pa.list_(pa.string()))
        parents = pc.list_parent_indices(lists).to_numpy()
        ids = self.ids(pc.list_flatten(lists))
        lengths = np.bincount(parents, minlength=len(lists))
        position = np.arange(len(parents)) - (np.cumsum(lengths) - lengths)[parents]
        kept = position < max_len
        encoded = np.full((len(lists), max_len), PAD_ID, dtype=np.int32)
        encoded[parents[kept], position[kept]] = ids[kept]
        return encoded

    def embedding_matrix(self, vectors: KeyedVectors) -> np.ndarray:
        """float32 rows by id for an embedding layer: padding and OOV rows are zeros."""
        key_to_index = vectors.key_to_index
        missing = [word for word in self.words.to_pylist() if word not in key_to_index]
        if missing:
            raise VocabularyError(f"{len(missing)} words have no vector, e.g. {missing[:5]}")
        rows = np.fromiter(
            (key_to_index[word] for word in self.words.to_pylist()), dtype=np.int64, count=len(self)
        )
        matrix = np.zeros((len(self) + FIRST_WORD_ID, vectors.vector_size), dtype=np.float32)
        matrix[FIRST_WORD_ID:] = vectors.vectors[rows]
        return matrix

    def save(self, path: Path) -> Path:
        """One Parquet file (id, word, count): Spark, pandas and polars read it as is."""
        ids = np.arange(FIRST_WORD_ID, len(self) + FIRST_WORD_ID, dtype=np.int32)
        table = pa.table({"id": ids, "word": self.words, "count": self.counts})
        table = table.replace_schema_metadata({"prodvec": json.dumps(_FORMAT)})
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        return path

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        table = pq.read_table(path)
        metadata = json.loads((table.schema.metadata or {}).get(b"prodvec", b"{}"))
        if metadata != _FORMAT:
            raise VocabularyError(f"{path} is not a prodvec vocabulary (metadata {metadata})")
        expected = np.arange(FIRST_WORD_ID, table.num_rows + FIRST_WORD_ID)
        if not np.array_equal(table["id"].to_numpy(), expected):
            raise VocabularyError(f"{path}: ids are not {FIRST_WORD_ID}.. in file order")
        return cls(table["word"].combine_chunks(), table["count"].to_numpy().astype(np.int64))


def encode_column(tokens_col: Column, vocabulary: Broadcast[Vocabulary], max_len: int) -> Column:
    """Spark column of fixed-length array<int> ids, as `Vocabulary.encode` gives them.

    How: an Arrow UDF over the token arrays, with the vocabulary broadcast once per
    executor and its hash index built once per Python worker; each batch is then one
    vectorised lookup, with no shuffle. Rejected: a map literal in `F.transform` (the
    whole vocabulary would sit in the query plan: millions of entries neither serialise
    nor optimise), and a join on exploded tokens (even with the vocabulary broadcast,
    every token - about 2 billion rows at 143M titles - is shuffled to put each title back
    together in position order; a vocabulary too big to broadcast adds a second shuffle).
    The price of the choice is memory: each Python worker holds the vocabulary (~100 bytes
    a word, ~200 MB at 2M words), which `word2vec.max_vocab` bounds. Usage:

        shared = spark.sparkContext.broadcast(vocabulary)
        frame.withColumn("ids", encode_column(tokens("title"), shared, 32))
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")

    @F.arrow_udf(T.ArrayType(T.IntegerType(), containsNull=False))  # type: ignore[call-overload]
    def encode(docs: pa.Array) -> pa.Array:
        ids = vocabulary.value.encode(docs, max_len)
        offsets = np.arange(0, ids.size + 1, max_len, dtype=np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.ravel()))

    return encode(tokens_col)
