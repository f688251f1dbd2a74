"""Subword ids: hashed character n-grams of each token (fastText buckets), so that rare words,
model numbers ("elplp12", "sf1008d") and misspellings carry signal instead of collapsing into
one out-of-vocabulary id.

For each of a text's first `max_tokens` tokens t, with w = "<" + t + ">":
  grams = [w] + [w[i:i+n] for n in n_min..n_max for i in 0..len(w)-n]  (w itself once),
  the first `per_word` of them, in that order;
  id = xxhash64(utf8(gram), seed 42) mod buckets + 1   (0 is padding).
A text's ids are the concatenation over its tokens, cut at `width` and 0-padded to it.

The hash is XXH64 with seed 42, which is exactly Spark SQL's `xxhash64(gram)`: since `buckets`
is a power of two, `pmod(xxhash64(gram), buckets) + 1` in Spark gives the same ids (a test
holds the two together). One implementation, numpy-vectorised over a batch's distinct tokens
and cached per process, serves the shard stage (an Arrow UDF), the embed stage and the served
model's callers, so the ids are identical everywhere by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import Column
from pyspark.sql import functions as F
from pyspark.sql import types as T

if TYPE_CHECKING:
    from pipelines.core.config import SubwordConfig

__all__ = ["SPARK_SEED", "Subwords", "subword_column", "xxh64"]

SPARK_SEED = 42  # the seed of Spark SQL's xxhash64
_MASK = (1 << 64) - 1
_P1, _P2, _P3, _P4, _P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                           0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)  # fmt: skip
_SHORT = 32  # bytes: below this XXH64 takes its single-accumulator path, vectorised here
_CACHE_TOKENS = 1 << 20  # distinct tokens whose ids a process keeps


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _MASK


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * _P2) & _MASK, 31) * _P1) & _MASK


def xxh64(data: bytes, seed: int = SPARK_SEED) -> int:
    """XXH64 of `data` as an unsigned 64-bit integer: the reference, one string at a time."""
    n, i = len(data), 0
    if n >= _SHORT:
        v = [(seed + _P1 + _P2) & _MASK, (seed + _P2) & _MASK, seed & _MASK, (seed - _P1) & _MASK]
        while i + 32 <= n:
            v = [_round(lane, int.from_bytes(data[i + 8 * k:i + 8 * k + 8], "little"))
                 for k, lane in enumerate(v)]  # fmt: skip
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _MASK
        for lane in v:
            h = ((h ^ _round(0, lane)) * _P1 + _P4) & _MASK
    else:
        h = (seed + _P5) & _MASK
    h = (h + n) & _MASK
    while i + 8 <= n:
        h = (
            _rotl(h ^ _round(0, int.from_bytes(data[i : i + 8], "little")), 27) * _P1 + _P4
        ) & _MASK
        i += 8
    if i + 4 <= n:
        h = (_rotl(h ^ ((int.from_bytes(data[i:i + 4], "little") * _P1) & _MASK), 23) * _P2
             + _P3) & _MASK  # fmt: skip
        i += 4
    while i < n:
        h = (_rotl(h ^ ((data[i] * _P5) & _MASK), 11) * _P1) & _MASK
        i += 1
    h ^= h >> 33
    h = (h * _P2) & _MASK
    h ^= h >> 29
    h = (h * _P3) & _MASK
    return h ^ (h >> 32)


def _u64(value: int) -> np.uint64:
    return np.uint64(value)


def _rotl_array(x: np.ndarray, r: int) -> np.ndarray:
    return (x << _u64(r)) | (x >> _u64(64 - r))


def _xxh64_short(padded: np.ndarray, lengths: np.ndarray, seed: int) -> np.ndarray:
    """XXH64 of many strings shorter than 32 bytes at once: `padded` is uint8 [n, 32] (zeros
    after each string), `lengths` their byte lengths. uint64 arithmetic wraps, as XXH64 does."""
    with np.errstate(over="ignore"):
        h = _u64((seed + _P5) & _MASK) + lengths.astype(np.uint64)
        lanes = padded.view("<u8")  # [n, 4] little-endian 8-byte words
        for k in range(3):
            lane = _rotl_array(lanes[:, k] * _u64(_P2), 31) * _u64(_P1)
            h = np.where(lengths >= 8 * (k + 1), _rotl_array(h ^ lane, 27) * _u64(_P1) + _u64(_P4),
                         h)  # fmt: skip
        start = (lengths // 8) * 8
        rows = np.arange(len(lengths))
        word = np.zeros(len(lengths), dtype=np.uint64)
        for b in range(4):
            word |= padded[rows, np.minimum(start + b, _SHORT - 1)].astype(np.uint64) << _u64(8 * b)
        has_word = lengths - start >= 4
        h = np.where(has_word, _rotl_array(h ^ (word * _u64(_P1)), 23) * _u64(_P2) + _u64(_P3), h)
        start = start + 4 * has_word
        for b in range(3):
            at = start + b
            byte = padded[rows, np.minimum(at, _SHORT - 1)].astype(np.uint64)
            h = np.where(at < lengths, _rotl_array(h ^ (byte * _u64(_P5)), 11) * _u64(_P1), h)
        h ^= h >> _u64(33)
        h *= _u64(_P2)
        h ^= h >> _u64(29)
        h *= _u64(_P3)
        return h ^ (h >> _u64(32))


def xxh64_many(texts: Sequence[str], seed: int = SPARK_SEED) -> np.ndarray:
    """uint64 XXH64 of each string's UTF-8 bytes: vectorised below 32 bytes, the reference
    above (whole long tokens, rare)."""
    encoded = [text.encode("utf-8") for text in texts]
    lengths = np.fromiter((len(data) for data in encoded), dtype=np.int64, count=len(encoded))
    out = np.zeros(len(encoded), dtype=np.uint64)
    short = np.flatnonzero(lengths < _SHORT)
    if len(short):
        padded = np.zeros((len(short), _SHORT), dtype=np.uint8)
        flat = np.frombuffer(b"".join(encoded[i] for i in short), dtype=np.uint8)
        row = np.repeat(np.arange(len(short)), lengths[short])
        column = np.arange(len(flat)) - np.repeat(np.cumsum(lengths[short]) - lengths[short],
                                                  lengths[short])  # fmt: skip
        padded[row, column] = flat
        out[short] = _xxh64_short(padded, lengths[short], seed)
    for i in np.flatnonzero(lengths >= _SHORT):
        out[i] = xxh64(encoded[i], seed)
    return out


@dataclass(frozen=True)
class Subwords:
    """The subword scheme of one shard set (`shard.subwords`), and the ids it gives."""

    buckets: int = 1 << 18
    n_min: int = 3
    n_max: int = 5
    per_word: int = 32
    max_tokens: int = 32
    width: int = 384

    @classmethod
    def from_config(cls, settings: SubwordConfig, max_tokens: int) -> Subwords:
        return cls(settings.buckets, settings.n_min, settings.n_max, settings.per_word,
                   max_tokens, settings.width)  # fmt: skip

    def grams(self, token: str) -> list[str]:
        """The token's grams in id order (the first `per_word`)."""
        word = f"<{token}>"
        grams = [word]
        for n in range(self.n_min, self.n_max + 1):
            grams += [word[i : i + n] for i in range(len(word) - n + 1) if n != len(word)]
        return grams[: self.per_word]

    def token_ids(self, tokens: Sequence[str]) -> list[np.ndarray]:
        """Each token's ids (int64, 1..buckets), cached per process and scheme by token."""
        cache = _TOKEN_IDS.setdefault(self.scheme, {})
        missing = [token for token in dict.fromkeys(tokens) if token not in cache]
        if missing:
            grams = [self.grams(token) for token in missing]
            hashed = xxh64_many([gram for each in grams for gram in each])
            ids = (hashed % _u64(self.buckets)).astype(np.int64) + 1
            ends = np.cumsum([len(each) for each in grams])
            if len(cache) + len(missing) > _CACHE_TOKENS:
                cache.clear()
            cache.update(zip(missing, np.split(ids, ends[:-1]), strict=True))
        return [cache[token] for token in tokens]

    @property
    def scheme(self) -> tuple[int, int, int, int]:
        """What a token's ids depend on."""
        return self.buckets, self.n_min, self.n_max, self.per_word

    def encode(self, docs: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """int64 [len(docs), width]: each text's ids (its first `max_tokens` tokens), 0-padded.

        `docs` is a list<string> array of tokens (the shared tokenizer's output). Hashing runs
        once per distinct token of the batch, and not at all for tokens seen before."""
        lists = docs.combine_chunks() if isinstance(docs, pa.ChunkedArray) else docs
        parents = pc.list_parent_indices(lists).to_numpy()
        lengths = np.bincount(parents, minlength=len(lists))
        position = np.arange(len(parents)) - (np.cumsum(lengths) - lengths)[parents]
        kept = position < self.max_tokens
        out = np.zeros((len(lists), self.width), dtype=np.int64)
        if not kept.any():
            return out
        parents = parents[kept]
        # Arrow's hash-based dictionary encoding finds the distinct tokens (numpy's unique
        # sorts strings: 3x slower).
        encoded = pc.dictionary_encode(pc.list_flatten(lists).filter(pa.array(kept)))
        inverse = encoded.indices.to_numpy()
        per_token = self.token_ids(encoded.dictionary.to_pylist())
        sizes = np.fromiter((len(ids) for ids in per_token), dtype=np.int64, count=len(per_token))
        occurrence = sizes[inverse]  # ids of each token occurrence, gathered from the distinct
        gather = np.repeat((np.cumsum(sizes) - sizes)[inverse], occurrence) + (
            np.arange(occurrence.sum()) - np.repeat(np.cumsum(occurrence) - occurrence, occurrence)
        )
        flat = np.concatenate(per_token)[gather]
        owner = np.repeat(parents, occurrence)
        per_text = np.bincount(owner, minlength=len(lists))
        slot = np.arange(len(flat)) - np.repeat(np.cumsum(per_text) - per_text, per_text)
        fits = slot < self.width
        out[owner[fits], slot[fits]] = flat[fits]
        return out


_TOKEN_IDS: dict[tuple[int, int, int, int], dict[str, np.ndarray]] = {}  # scheme -> token -> ids


def subword_column(tokens_col: Column, subwords: Subwords) -> Column:
    """Spark column of fixed-width array<int> subword ids (`Subwords.encode` in an Arrow UDF)."""

    @F.arrow_udf(T.ArrayType(T.IntegerType(), containsNull=False))  # type: ignore[call-overload]
    def encode(docs: pa.Array) -> pa.Array:
        ids = subwords.encode(docs).astype(np.int32)
        offsets = np.arange(0, ids.size + 1, subwords.width, dtype=np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.ravel()))

    return encode(tokens_col)
