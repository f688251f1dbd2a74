"""Table-driven tests for pipelines.data.text.

Each table is evaluated in ONE Spark job (a module-scoped fixture builds one
DataFrame of all its cases and collects once); the parametrized tests then only
look up their row. Expected values are written from the spec and from the real
defects in ../shared/data, not computed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from pyspark.sql import Column, SparkSession
from pyspark.sql import functions as F

from pipelines.data.text import (
    fold_text,
    has_invalid_encoding,
    normalize_text,
    parse_price,
    split_list,
    split_path,
)


def evaluate(
    spark: SparkSession, rows: Sequence[tuple[Any, ...]], schema: str, **exprs: Column
) -> list[dict[str, Any]]:
    """Evaluate named expressions over all rows in one job; results come back in row order."""
    df = spark.createDataFrame([(i, *row) for i, row in enumerate(rows)], f"i int, {schema}")
    out = df.select("i", *(expr.alias(name) for name, expr in exprs.items())).collect()
    return [r.asDict(recursive=True) for r in sorted(out, key=lambda r: r.i)]


def by_input(inputs: Sequence[Any], outputs: Sequence[Any]) -> dict[Any, Any]:
    assert len(set(inputs)) == len(inputs), "case inputs must be unique"
    return dict(zip(inputs, outputs, strict=True))


def one_column(
    spark: SparkSession, inputs: Sequence[str | None], fn: Callable[[Column], Column]
) -> dict[str | None, Any]:
    rows = evaluate(spark, [(s,) for s in inputs], "s string", out=fn(F.col("s")))
    return by_input(inputs, [r["out"] for r in rows])


# --------------------------------------------------------------------------- fold_text

FOLD_CASES = [
    ("OilÂ\xa0- Pure", "Oil - Pure"),  # BigBasket: UTF-8 NBSP read as latin-1
    ("SkinÂ\xa0FruitsÂ\xa0Cream", "Skin Fruits Cream"),
    ("L&#39;Or&Eacute;Al&Reg; Paris", "L'OrEAl Paris"),  # Instacart; "&Reg;" is title-cased
    ("Women&#39;s", "Women's"),
    ("Dentastix&#174 ; Large", "Dentastix ; Large"),  # numeric entity without ';'
    ("Sri Sri Ayurveda ", "Sri Sri Ayurveda"),  # BigBasket brand, trailing space
    ("  Mastercook\t", "Mastercook"),
    ("Café Crème", "Cafe Creme"),
    ("ﬁne", "fine"),
    ("ＡＢＣ １２３", "ABC 123"),
    ("a\xa0b\u2009c\u3000d", "a b c d"),
    ("<b>bold</b>text", "bold text"),
    ("&lt;p&gt;Soft&lt;/p&gt;", "Soft"),  # escaped tags are unescaped, then removed
    ("5 < 6 and 7 > 3", "5 < 6 and 7 > 3"),  # comparison signs are not tags
    ("Gift 🎁 Box", "Gift Box"),
    ("Привет world", "world"),
    ("it’s “quoted” «x»", 'it\'s "quoted" "x"'),
    ("itâ€™s", "it's"),  # ’ as cp1252 mojibake
    ("it\u00e2\u0080\u0099s", "it's"),  # ’ as latin-1 mojibake (C1 controls)
    ("CafÃ© NoÃ«l", "Cafe Noel"),
    ("donÃ¢â‚¬â„¢t", "don't"),  # encoded twice
    ("Salt &amp; Pepper", "Salt & Pepper"),
    ("Women&amp;#39;s", "Women's"),  # escaped twice
    ("Toys & Games", "Toys & Games"),
    ("AT&T", "AT&T"),
    ("A&paradise", "A&paradise"),  # no ';': not the "&para" entity
    ("Smartwatch—Black – 2‐pack", "Smartwatch-Black - 2-pack"),
    ("Straße Øl Æble Łódź þorn đ œuvre", "Strasse Ol AEble Lodz thorn d oeuvre"),
    ("Revitalift™ Peel", "Revitalift Peel"),
    ("10×20 cm²", "10x20 cm2"),
    ("Crème brûlée…", "Creme brulee..."),
    ("line1\nline2\t\r end", "line1 line2 end"),
    ("x\x00y", "x y"),
    ("   ", ""),
    ("", ""),
    (None, None),
]


@pytest.fixture(scope="module")
def folded(spark: SparkSession) -> dict[str | None, str | None]:
    return one_column(spark, [raw for raw, _ in FOLD_CASES], fold_text)


@pytest.mark.parametrize(("raw", "expected"), FOLD_CASES)
def test_fold_text(folded: dict, raw: str | None, expected: str | None) -> None:
    assert folded[raw] == expected


# ---------------------------------------------------------------------- normalize_text

NORMALIZE_CASES = [
    ("Alisha Solid Women's Cycling Shorts", "alisha solid womens cycling shorts"),
    ("L&#39;Or&Eacute;Al&Reg; Paris", "loreal paris"),
    ("l'oreal", "loreal"),
    ("Women’s", "womens"),
    ("Rock 'n' Roll", "rock n roll"),
    ("Price 1,299.00 INR", "price 1299.00 inr"),
    ("1,00,000", "100000"),
    ("2.5 kg", "2.5 kg"),
    ("v1.2.3", "v1.2.3"),
    ("End. Next.", "end next"),
    (".5 mm", "5 mm"),
    ("1..2", "1 2"),
    ('3.5" Floppy', "3.5 floppy"),
    ("Sizes S, M, L", "sizes s m l"),
    ("Toys & Games", "toys games"),
    ("Water-Resistant/USB_C (2x)", "water resistant usb c 2x"),
    ("OilÂ\xa0- Pure", "oil pure"),
    ("Ｃａｆé – ＮＯ.１", "cafe no 1"),
    ("Gift 🎁 Box!!", "gift box"),
    ("!!! ...", ""),
    ("", ""),
    (None, None),
]


@pytest.fixture(scope="module")
def normalized(spark: SparkSession) -> dict[str | None, str | None]:
    return one_column(spark, [raw for raw, _ in NORMALIZE_CASES], normalize_text)


@pytest.mark.parametrize(("raw", "expected"), NORMALIZE_CASES)
def test_normalize_text(normalized: dict, raw: str | None, expected: str | None) -> None:
    assert normalized[raw] == expected


# ------------------------------------------------------- properties over every test string

ALL_STRINGS = sorted(
    {s for table in (FOLD_CASES, NORMALIZE_CASES) for pair in table for s in pair if s}
)
TOKEN_TEXT = re.compile(r"(?:[a-z0-9.]+(?: [a-z0-9.]+)*)?")
STRAY_DOT = re.compile(r"(?<![0-9])\.|\.(?![0-9])")


@pytest.fixture(scope="module")
def properties(spark: SparkSession) -> list[dict[str, Any]]:
    s = F.col("s")
    return evaluate(
        spark,
        [(x,) for x in ALL_STRINGS],
        "s string",
        fold=fold_text(s),
        norm=normalize_text(s),
        norm2=normalize_text(normalize_text(s)),
    )


def test_fold_text_output_is_ascii_and_trimmed(properties: list[dict[str, Any]]) -> None:
    for row in properties:
        out = row["fold"]
        assert out.isascii() and out == " ".join(out.split()), (ALL_STRINGS[row["i"]], out)


def test_normalize_text_is_idempotent(properties: list[dict[str, Any]]) -> None:
    for row in properties:
        assert row["norm2"] == row["norm"], ALL_STRINGS[row["i"]]


def test_normalize_text_alphabet(properties: list[dict[str, Any]]) -> None:
    for row in properties:
        out = row["norm"]
        assert TOKEN_TEXT.fullmatch(out) and not STRAY_DOT.search(out), (ALL_STRINGS[row["i"]], out)


# ---------------------------------------------------------------- has_invalid_encoding

ENCODING_CASES = [
    ("plain text", False),
    ("Café Crème", False),
    ("no\xa0break", False),
    ("tab\tnew\nline\r", False),
    ("bad \ufffd char", True),
    ("nul\x00", True),
    ("\x1b[0m", True),
    ("form\x0cfeed", True),
    ("del\x7f", True),
    ("c1 \x85", True),
    ("it\u00e2\u0080\u0099s", True),
    ("", False),
    (None, None),
]


@pytest.fixture(scope="module")
def invalid_encoding(spark: SparkSession) -> dict[str | None, bool | None]:
    return one_column(spark, [raw for raw, _ in ENCODING_CASES], has_invalid_encoding)


@pytest.mark.parametrize(("raw", "expected"), ENCODING_CASES)
def test_has_invalid_encoding(
    invalid_encoding: dict, raw: str | None, expected: bool | None
) -> None:
    assert invalid_encoding[raw] is expected


# ------------------------------------------------------------------------- parse_price

DEFAULT_CURRENCY = "XTS"  # ISO "testing" code: shows when the default was used
UNPARSABLE = (None, None, "unparsable_price")
MISSING = (None, None, None)
PRICE_CASES = [
    ("$237.68", (237.68, "USD", None)),  # Amazon "Selling Price"
    ("1,299", (1299.0, DEFAULT_CURRENCY, None)),
    ("571230", (571230.0, DEFAULT_CURRENCY, None)),
    ("1,00,000", (100000.0, DEFAULT_CURRENCY, None)),  # Indian digit grouping
    ("1299.00", (1299.0, DEFAULT_CURRENCY, None)),
    (" 35 ", (35.0, DEFAULT_CURRENCY, None)),
    ("Rs. 999", (999.0, "INR", None)),
    ("Rs 999", (999.0, "INR", None)),
    ("Rs.999", (999.0, "INR", None)),
    ("₹1,299", (1299.0, "INR", None)),
    ("INR 999", (999.0, "INR", None)),
    ("£12.50", (12.5, "GBP", None)),
    ("€12", (12.0, "EUR", None)),
    ("€12,50", (12.5, "EUR", None)),  # decimal comma
    ("USD 10", (10.0, "USD", None)),
    ("12.99 USD", (12.99, "USD", None)),
    ("5 gbp", (5.0, "GBP", None)),
    ("Bars 12", (12.0, DEFAULT_CURRENCY, None)),  # "rs" inside a word is not rupees
    ("$.99", (0.99, "USD", None)),
    ("$10.99 - $15.99", (10.99, "USD", None)),  # range: lower bound
    ("Rs 999 - 1,299", (999.0, "INR", None)),
    ("-49.99", (-49.99, DEFAULT_CURRENCY, "negative_price")),
    ("-$5", (-5.0, "USD", "negative_price")),
    ("$ -5", (-5.0, "USD", "negative_price")),
    ("\u221212", (-12.0, DEFAULT_CURRENCY, "negative_price")),  # U+2212 minus sign
    ("N/A", UNPARSABLE),
    ("Free", UNPARSABLE),
    ("$", UNPARSABLE),
    ("", MISSING),
    ("   ", MISSING),
    ("\xa0", MISSING),
    (None, MISSING),
]


@pytest.fixture(scope="module")
def prices(spark: SparkSession) -> dict[str | None, tuple[Any, Any, Any]]:
    parsed = one_column(
        spark, [raw for raw, _ in PRICE_CASES], lambda c: parse_price(c, DEFAULT_CURRENCY)
    )
    return {k: (v["amount"], v["currency"], v["error"]) for k, v in parsed.items()}


@pytest.mark.parametrize(("raw", "expected"), PRICE_CASES)
def test_parse_price(prices: dict, raw: str | None, expected: tuple[Any, Any, Any]) -> None:
    assert prices[raw] == expected


def test_parse_price_schema(spark: SparkSession) -> None:
    df = spark.createDataFrame([("$1",)], "p string").select(parse_price(F.col("p"), "USD"))
    assert df.schema[0].dataType.simpleString() == (
        "struct<amount:double,currency:string,error:string>"
    )


def test_parse_price_rejects_bad_default_currency(spark: SparkSession) -> None:
    with pytest.raises(ValueError, match="ISO 4217"):
        parse_price(F.col("p"), "usd")


# -------------------------------------------------------------------------- split_path

FLIPKART_SHORTS = (
    "Clothing >> Women's Clothing >> Lingerie, Sleep & Swimwear >> Shorts >> Alisha Shorts"
    " >> Alisha Solid Women's Cycling Shorts"
)
FLIPKART_SOFA = (
    "Furniture >> Living Room Furniture >> Sofa Beds & Futons >> FabHomeDecor Fabric Double"
    " Sofa Bed (Finish Colo..."
)
# (path, title, separator, max_levels, expected)
PATH_CASES = [
    (
        FLIPKART_SHORTS,
        "Alisha Solid Women's Cycling Shorts",
        ">>",
        10,
        ["Clothing", "Women's Clothing", "Lingerie, Sleep & Swimwear", "Shorts", "Alisha Shorts"],
    ),
    (
        FLIPKART_SHORTS,
        "Alisha Solid Women's Cycling Shorts",
        ">>",
        3,
        ["Clothing", "Women's Clothing", "Lingerie, Sleep & Swimwear"],
    ),
    (
        FLIPKART_SOFA,
        "FabHomeDecor Fabric Double Sofa Bed",
        ">>",
        10,
        ["Furniture", "Living Room Furniture", "Sofa Beds & Futons"],
    ),  # truncated leaf
    ("Toys >> Marble… >> Action Figures", "Other", ">>", 10, ["Toys", "Action Figures"]),
    (
        "Pens & Stationery >> Pens >> Pilot Roller Ball Pens",
        "Pilot Roller Ball Pen",
        ">>",
        10,
        ["Pens & Stationery", "Pens"],
    ),  # leaf starts with the title
    (
        "Kitchen >> Mugs >> Coffee Mug",
        "Coffee Mug - Set of 2 (Blue)",
        ">>",
        10,
        ["Kitchen", "Mugs"],
    ),  # title starts with the leaf
    ("Beauty >> L'Oréal Paris", "L&#39;Or&Eacute;al PARIS", ">>", 10, ["Beauty"]),
    ("Shorts >> Clothing", "Shorts for Men", ">>", 10, ["Shorts", "Clothing"]),  # leaf only
    ("A >> Title >> Title Trunc...", "Title", ">>", 10, ["A"]),  # truncated dropped first
    ("Alisha Shorts", "Alisha Shorts", ">>", 10, []),
    ("A >> B", None, ">>", 10, ["A", "B"]),
    ("A >> B", "", ">>", 10, ["A", "B"]),
    ("A >> B", "!!!", ">>", 10, ["A", "B"]),
    ("A >> B >> C >> Title Here", "Title Here", ">>", 3, ["A", "B", "C"]),
    ("A >> B >> C >> Title Here", "Title Here", ">>", 2, ["A", "B"]),
    (
        '["Clothing >> Women\'s Clothing >> Western Wear"]',
        "Dress",
        ">>",
        10,
        ["Clothing", "Women's Clothing", "Western Wear"],
    ),
    ("A >>  >> B >>", "x", ">>", 10, ["A", "B"]),
    (
        "Home &amp; Kitchen >> CafÃ© Supplies >> Â\xa0",
        "x",
        ">>",
        10,
        ["Home & Kitchen", "Cafe Supplies"],
    ),
    (
        "Toys & Games | Party Supplies | Party Favors",
        "up4 Mickey Grab N Go Play Pack",
        "|",
        10,
        ["Toys & Games", "Party Supplies", "Party Favors"],
    ),  # Amazon; '|' is literal
    ("Home › Kitchen › Mugs", "Travel Cup", "›", 10, ["Home", "Kitchen", "Mugs"]),
    ("", "x", ">>", 10, []),
    (None, "x", ">>", 10, None),
]


@pytest.fixture(scope="module")
def paths(spark: SparkSession) -> list[Any]:
    configs = sorted({(sep, levels) for _, _, sep, levels, _ in PATH_CASES})
    exprs = {
        f"c{k}": split_path(F.col("path"), sep, F.col("title"), levels)
        for k, (sep, levels) in enumerate(configs)
    }
    rows = evaluate(
        spark, [(p, t) for p, t, *_ in PATH_CASES], "path string, title string", **exprs
    )
    return [row[f"c{configs.index((c[2], c[3]))}"] for row, c in zip(rows, PATH_CASES, strict=True)]


@pytest.mark.parametrize("case", range(len(PATH_CASES)))
def test_split_path(paths: list[Any], case: int) -> None:
    path, title, sep, levels, expected = PATH_CASES[case]
    assert paths[case] == expected, (path, title, sep, levels)


def test_split_path_rejects_zero_levels(spark: SparkSession) -> None:
    with pytest.raises(ValueError, match="max_levels"):
        split_path(F.col("p"), ">>", F.col("t"), 0)


# -------------------------------------------------------------------------- split_list

# (text, separator, expected)
LIST_CASES = [
    (
        'Fits 15" laptops | Water-resistant | Women&#39;s fit',
        "|",
        ["fits 15 laptops", "water resistant", "womens fit"],
    ),
    ("a |  | b |", "|", ["a", "b"]),
    ("!!! | ok", "|", ["ok"]),
    ("Crème | ﬁne", "|", ["creme", "fine"]),
    ("single item", "|", ["single item"]),
    ("Color: Red; Size: XL", ";", ["color red", "size xl"]),
    ("Line one\nLine two", "\n", ["line one", "line two"]),
    ("", "|", []),
    (None, "|", None),
]


@pytest.fixture(scope="module")
def lists(spark: SparkSession) -> list[Any]:
    seps = sorted({sep for _, sep, _ in LIST_CASES})
    exprs = {f"c{k}": split_list(F.col("s"), sep) for k, sep in enumerate(seps)}
    rows = evaluate(spark, [(s,) for s, _, _ in LIST_CASES], "s string", **exprs)
    return [row[f"c{seps.index(c[1])}"] for row, c in zip(rows, LIST_CASES, strict=True)]


@pytest.mark.parametrize("case", range(len(LIST_CASES)))
def test_split_list(lists: list[Any], case: int) -> None:
    text, sep, expected = LIST_CASES[case]
    assert lists[case] == expected, (text, sep)


def test_split_list_rejects_empty_separator(spark: SparkSession) -> None:
    with pytest.raises(ValueError, match="separator"):
        split_list(F.col("s"), "")


# --------------------------------------------------------------- the real shared catalogs

TITLE_COLUMNS = {
    "flipkart/flipkart_products.csv": "product_name",
    "bigbasket/bigbasket_products.csv": "product",
    "instacart/products.csv": "product_name",
    "amazon2020_sample/amazon_2020_sample_1000.csv": "Product Name",
}


@pytest.mark.shared_data
def test_real_titles_fold_clean_and_normalize_idempotently(
    spark: SparkSession, shared_data
) -> None:
    titles = None
    for rel, column in TITLE_COLUMNS.items():
        df = (
            spark.read.option("header", True)
            .option("multiLine", True)
            .option("escape", '"')
            .csv(str(shared_data / rel))
            .select(F.col(column).alias("t"))
        )
        titles = df if titles is None else titles.unionByName(df)
    folded, norm = fold_text(F.col("t")), normalize_text(F.col("t"))
    counts = titles.select(
        F.count("t").alias("rows"),
        F.count_if(folded.rlike(r"[^\x20-\x7E]")).alias("not_printable_ascii"),
        F.count_if(folded.rlike(r"&#[0-9]+|&[A-Za-z]+;")).alias("leftover_entities"),
        # an unrepaired "Â\xa0" would fold to a stray capital A glued to the word before
        F.count_if(F.col("t").contains("Â") & folded.rlike(r"[a-z]A( |$)")).alias("mojibake"),
        F.count_if(normalize_text(norm) != norm).alias("not_idempotent"),
        F.count_if(~norm.rlike(r"^[a-z0-9. ]*$")).alias("bad_alphabet"),
    ).first()
    assert counts["rows"] > 90_000
    assert counts["not_printable_ascii"] == 0
    assert counts["leftover_entities"] == 0
    assert counts["mojibake"] == 0
    assert counts["not_idempotent"] == 0
    assert counts["bad_alphabet"] == 0
