"""Property-based tests of the text normaliser and the price parser, run as what the clean
stage runs: the Spark expressions of pipelines/text.py, through the shared session. Each
hypothesis example is one batch of generated strings and one Spark job, so example counts stay
small; the strings mix arbitrary Unicode with the fragments catalogs break on (entities,
mojibake, tags, ligatures, fullwidth digits, currency marks).
"""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.data.text import fold_text, normalize_text, parse_price

FRAGMENTS = [
    "&amp;",
    "&amp;#39;",
    "&#174",
    "&Reg;",
    "&nbsp;",
    "Ã©",
    "â€™",
    "Ã¼",
    "<b>",
    "</p>",
    "<br/>",
    "™",
    "ﬁ",
    "１２",
    "½",
    "é",
    "ß",
    "—",
    "’",
    "\u00a0",
    "\t",
    "\n",
    "  ",
    "'",
    ",",
    ".",
    "1,299",
    "3.5",
    "₹",
    "Rs.",
    "$",
    "€",
    "\ufffd",
    "\x00",
    "日本",
    "🙂",
]
TEXT = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(FRAGMENTS)), max_size=8).map("".join)
pytestmark = pytest.mark.slow  # each example is a Spark job: a minute of searching

PROPERTY_SETTINGS = settings(
    max_examples=8,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
TOKENISABLE = r"^([a-z0-9.]+( [a-z0-9.]+)*)?$"  # single spaces between non-empty tokens


def _frame(spark, texts: list[str | None]):
    schema = T.StructType(
        [T.StructField("i", T.IntegerType()), T.StructField("raw", T.StringType())]
    )
    return spark.createDataFrame(list(enumerate(texts)), schema)


@PROPERTY_SETTINGS
@given(texts=st.lists(st.one_of(st.none(), TEXT), min_size=1, max_size=40))
def test_normalize_text_is_ascii_tokenisable_and_idempotent(spark, texts):
    once = normalize_text(F.col("raw"))
    rows = (
        _frame(spark, texts)
        .select(
            "i",
            "raw",
            once.alias("once"),
            normalize_text(once).alias("twice"),
            fold_text(F.col("raw")).alias("folded"),
            once.rlike(TOKENISABLE).alias("tokenisable"),
        )
        .orderBy("i")
        .collect()
    )
    assert len(rows) == len(texts)
    for row in rows:
        if row.raw is None:
            assert row.once is None and row.folded is None
            continue
        assert row.once.isascii() and row.folded.isascii(), row
        assert row.tokenisable, row
        assert row.twice == row.once, row
        assert not re.search(r"(?<![0-9])\.|\.(?![0-9])", row.once), row  # '.' between digits


@PROPERTY_SETTINGS
@given(texts=st.lists(st.one_of(st.none(), TEXT), min_size=1, max_size=40))
def test_parse_price_never_crashes_and_flags_what_it_cannot_read(spark, texts):
    rows = (
        _frame(spark, texts)
        .select("i", "raw", parse_price(F.col("raw"), "USD").alias("price"))
        .orderBy("i")
        .collect()
    )
    assert len(rows) == len(texts)
    for row in rows:
        amount, currency, error = row.price
        assert error in (None, "unparsable_price", "negative_price"), row
        if amount is None:
            assert currency is None and error != "negative_price", row
        else:
            assert currency in ("USD", "INR", "EUR", "GBP"), row
            assert math.isfinite(amount) or len(row.raw) > 300, row
            assert (amount < 0) == (error == "negative_price"), row
        if row.raw is None or not row.raw.strip():
            assert (amount, error) == (None, None), row


SYMBOLS = [("$", "USD"), ("₹", "INR"), ("Rs. ", "INR"), ("€", "EUR"), ("£", "GBP"), ("", "USD")]


@PROPERTY_SETTINGS
@given(
    prices=st.lists(
        st.tuples(
            st.decimals(
                min_value=0, max_value=10**7, places=2, allow_nan=False, allow_infinity=False
            ),
            st.sampled_from(SYMBOLS),
            st.booleans(),
            st.sampled_from(["", " ", "  - 1,999.00"]),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_parse_price_reads_back_the_price_it_was_given(spark, prices):
    """Written as catalogs write prices (symbol, optional thousands commas, optional range),
    every price parses back to its amount (a range to its lower bound) and currency."""
    texts = [
        f"{symbol}{amount:,.2f}{tail}" if grouped else f"{symbol}{amount:.2f}{tail}"
        for amount, (symbol, _), grouped, tail in prices
    ]
    rows = (
        _frame(spark, texts)
        .select("i", parse_price(F.col("raw"), "USD").alias("price"))
        .orderBy("i")
        .collect()
    )
    for row, (amount, (_, code), _, _) in zip(rows, prices, strict=True):
        assert row.price.amount == pytest.approx(float(amount)), (texts[row.i], row)
        assert (row.price.currency, row.price.error) == (code, None), (texts[row.i], row)
