"""Text, price and category cleaning as Spark Column expressions.

Everything Spark SQL can do runs as built-in expressions (JVM, no Python). Only
the steps Spark has no built-in for (mojibake repair, HTML unescape, Unicode
normalisation and ASCII folding) run in a vectorised pandas UDF, and the UDF is
fed only the rows that can change: every other row reaches it as a null, so
Arrow moves almost nothing for plain-ASCII text. A row needs Python when it has
a non-ASCII character or something that looks like an HTML entity ('&' followed
by '#' or a letter); HTML tags are removed by a built-in, so '<' alone does not.
"""

from __future__ import annotations

import html
import re
import unicodedata
from functools import lru_cache
from html.entities import html5

import pandas as pd
from pyspark.sql import Column
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, StringType

__all__ = [
    "fold_string",
    "fold_text",
    "has_invalid_encoding",
    "normalize_folded",
    "normalize_text",
    "parse_price",
    "path_levels",
    "split_list",
    "split_path",
    "trim_path",
]

# ---------------------------------------------------------------------------
# Python part of fold_text (runs inside the pandas UDF only)
# ---------------------------------------------------------------------------


def _decode_cp1252_lenient(raw: bytes) -> str:
    """cp1252 byte by byte; its five undefined bytes fall back to latin-1 (C1 controls),
    which is what most broken exporters produce for them."""
    return "".join(bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in raw)


def _mojibake_table() -> dict[str, str]:
    """Map 'UTF-8 bytes decoded as cp1252 or latin-1' back to the character, for Latin-1
    letters/symbols and general punctuation (the characters that show up in catalogs)."""
    chars = [chr(c) for c in range(0xA0, 0x100)] + [chr(c) for c in range(0x2010, 0x203B)]
    chars += ["\u20ac", "\u2122"]  # euro sign, trade mark sign
    table: dict[str, str] = {}
    for ch in chars:
        raw = ch.encode("utf-8")
        for garbled in (_decode_cp1252_lenient(raw), raw.decode("latin-1")):
            table[garbled] = ch
    return table


_MOJIBAKE = _mojibake_table()
# Longest first, so a 3-byte sequence ("â€™") wins over a 2-byte prefix of it.
_MOJIBAKE_RE = re.compile("|".join(map(re.escape, sorted(_MOJIBAKE, key=len, reverse=True))))

# Numeric entities with or without ';' (catalogs have "&#174 ;"); named ones only with
# ';', so that "A&paradise" is not turned into "A¶dise" as html.unescape would.
_ENTITY_RE = re.compile(r"&(?:#[0-9]{1,7};?|#[xX][0-9a-fA-F]{1,6};?|[A-Za-z][A-Za-z0-9]{1,31};)")

# Repair passes: double-escaped ("&amp;#39;") and double-encoded text need a second one.
_MAX_REPAIR_PASSES = 3

# Before NFKD: NFKD spells these out as letters ("™" -> "TM") that would glue onto the word.
_BEFORE_NFKD = str.maketrans({"\u2122": "", "\u2120": ""})


def _after_nfkd_table() -> dict[int, str]:
    """What NFKD leaves non-ASCII but has an obvious ASCII spelling."""
    table = {
        "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O", "ß": "ss", "ẞ": "SS",
        "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "ł": "l", "Ł": "L", "þ": "th", "Þ": "Th",
        "ı": "i", "×": "x", "\u2044": "/", "\u2212": "-",
    }  # fmt: skip
    table.update(dict.fromkeys("‘’‚‛′‹›", "'"))
    table.update(dict.fromkeys("“”„‟″«»", '"'))
    for code in range(0x80, 0x10000):
        ch = chr(code)
        if ch.isspace():
            table[ch] = " "
        elif unicodedata.category(ch) == "Pd":
            table[ch] = "-"
    return str.maketrans(table)


_AFTER_NFKD = _after_nfkd_table()


def _unescape_entity(match: re.Match[str]) -> str:
    entity = match.group()
    if entity[1] == "#":
        return html.unescape(entity)
    name = entity[1:]
    # Title-cased exports turn "&reg;" into "&Reg;"; try the lower-case name too.
    return html5.get(name) or html5.get(name.lower(), entity)


def _unmojibake(match: re.Match[str]) -> str:
    return _MOJIBAKE[match.group()]


@lru_cache(maxsize=1 << 16)
def fold_string(text: str) -> str:
    """Repair and fold one string to ASCII; whitespace and tags are left to the built-in tail.
    Cached: brands and category paths repeat heavily within a catalog."""
    for _ in range(_MAX_REPAIR_PASSES):
        repaired = _MOJIBAKE_RE.sub(_unmojibake, _ENTITY_RE.sub(_unescape_entity, text))
        if repaired == text:
            break
        text = repaired
    # NFKD covers NFKC's compatibility mappings (ligatures, fullwidth, superscripts) and
    # also splits accents off, so one pass does both; encode() then drops the marks and
    # anything else still non-ASCII (emoji, other scripts).
    text = unicodedata.normalize("NFKD", text.translate(_BEFORE_NFKD)).translate(_AFTER_NFKD)
    return text.encode("ascii", "ignore").decode("ascii")


@F.pandas_udf(StringType())  # type: ignore[call-overload]
def _fold_udf(texts: pd.Series) -> pd.Series:
    return pd.Series([None if t is None else fold_string(t) for t in texts], index=texts.index)


@F.pandas_udf(ArrayType(StringType()))  # type: ignore[call-overload]
def _fold_array_udf(arrays: pd.Series) -> pd.Series:
    folded = [None if a is None else [fold_string(t) for t in a] for a in arrays]
    return pd.Series(folded, index=arrays.index)


# ---------------------------------------------------------------------------
# Built-in parts (Java regex syntax)
# ---------------------------------------------------------------------------

_NEEDS_PYTHON = r"[^\x00-\x7F]|&[#A-Za-z]"
# Whitespace, ASCII controls and HTML tags become one space. A tag must start with a
# letter, '/' or '!', so "5 < 6 and 7 > 3" is text, not a tag.
_SPACE_RUN = r"(?:[\x00-\x20\x7F]|<[A-Za-z/!][^<>]*>)+"
_DELETE_IN_WORD = r"'|(?<=[0-9]),(?=[0-9])"  # apostrophes, thousands commas
_NOT_TOKEN_RUN = r"(?:[^a-z0-9.]|(?<![0-9])\.|\.(?![0-9]))+"  # '.' survives between digits
_INVALID_ENCODING = r"[\x{FFFD}\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F]"
_PATH_WRAPPER = r'(?s)^\s*\[\s*"(.*)"\s*\]\s*$'  # ["A >> B"] -> A >> B

# Price: currency tokens, then (first) number with an optional minus just before it.
_CUR = r"(?:[$£€₹]|(?i:(?:rs\.?|inr|usd|eur|gbp)(?![a-z])))"
_PRICE = rf"^[^0-9]*?(?:([-−])\s*(?:{_CUR}\s*)?)?([0-9][0-9,]*(?:\.[0-9]+)?|(?<![A-Za-z])\.[0-9]+)"
_DECIMAL_COMMA = r"^[0-9]+,[0-9]{1,2}$"  # "12,50" is 12.5; "1,299" and "1,00,000" are groups
_BLANK = r"^[\s\x{A0}]*$"
_CURRENCY_PATTERNS = (  # first match wins
    ("INR", r"(?i)₹|(?<![a-z])(?:rs\.?|inr)(?![a-z])"),
    ("GBP", r"(?i)£|(?<![a-z])gbp(?![a-z])"),
    ("EUR", r"(?i)€|(?<![a-z])eur(?![a-z])"),
    ("USD", r"(?i)\$|(?<![a-z])usd(?![a-z])"),
)


def _java_literal(text: str) -> str:
    """Regex matching `text` literally; every non-alphanumeric is written as \\x{..}."""
    return "".join(c if c.isascii() and c.isalnum() else f"\\x{{{ord(c):X}}}" for c in text)


def _ascii_tail(col: Column) -> Column:
    """Built-in finish of fold_text: tags, controls and whitespace runs -> one space, trim."""
    return F.trim(F.regexp_replace(col, _SPACE_RUN, " "))


def normalize_folded(col: Column) -> Column:
    """normalize_text for text fold_text already produced, such as category levels: pure
    built-ins, no second repair."""
    text = F.regexp_replace(F.lower(col), _DELETE_IN_WORD, "")
    return F.trim(F.regexp_replace(text, _NOT_TOKEN_RUN, " "))


def _needs_python(col: Column) -> Column:
    return col.rlike(_NEEDS_PYTHON)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def fold_text(col: Column) -> Column:
    """Repair mojibake and HTML entities, strip tags, fold to ASCII (case and punctuation
    kept), collapse whitespace, trim."""
    return _ascii_tail(F.coalesce(_fold_udf(F.when(_needs_python(col), col)), col))


def normalize_text(col: Column) -> Column:
    """The tokenisable form every stage splits on ' ': only [a-z0-9. ], '.' only between
    digits, no apostrophes, no thousands commas; idempotent."""
    return normalize_folded(fold_text(col))


def has_invalid_encoding(col: Column) -> Column:
    """True when the raw text holds U+FFFD or a C0/C1 control other than tab, LF, CR."""
    return col.rlike(_INVALID_ENCODING)


def parse_price(col: Column, default_currency: str) -> Column:
    """Parse a price string into struct<amount: double, currency: string, error: string>.

    Blank means "no price" (all null). The first number wins, so a range gives its lower
    bound. Unparsable and negative prices are kept but flagged, for the caller to decide.
    """
    if not re.fullmatch(r"[A-Z]{3}", default_currency):
        raise ValueError(f"default_currency must be an ISO 4217 code, got {default_currency!r}")
    blank = F.coalesce(col.rlike(_BLANK), F.lit(True))
    number = F.regexp_extract(col, _PRICE, 2)
    negative = F.regexp_extract(col, _PRICE, 1) != ""
    plain = F.when(number.rlike(_DECIMAL_COMMA), F.regexp_replace(number, ",", ".")).otherwise(
        F.regexp_replace(number, ",", "")
    )
    magnitude = F.when(number != "", plain.cast("double"))
    currency = F.lit(default_currency)
    for code, pattern in reversed(_CURRENCY_PATTERNS):
        currency = F.when(col.rlike(pattern), F.lit(code)).otherwise(currency)
    return F.struct(
        F.when(negative, -magnitude).otherwise(magnitude).alias("amount"),
        F.when(magnitude.isNotNull(), currency).alias("currency"),
        F.when(~blank & magnitude.isNull(), F.lit("unparsable_price"))
        .when(~blank & negative, F.lit("negative_price"))
        .alias("error"),
    )


def _split_folded(col: Column, separator: str) -> Column:
    """Split on the raw separator first (so folding can never alter or invent one), then
    fold the pieces: Python only for rows that need it, the built-in tail for all."""
    if not separator:
        raise ValueError("separator must not be empty")
    parts = F.split(col, _java_literal(separator))
    folded = F.coalesce(_fold_array_udf(F.when(_needs_python(col), parts)), parts)
    return F.transform(folded, _ascii_tail)


def path_levels(col: Column, separator: str) -> Column:
    """Category path -> its folded levels, top first, empty and truncated ("...") ones
    dropped. A projection of its own: `trim_path` reads it several times."""
    levels = _split_folded(F.regexp_replace(col, _PATH_WRAPPER, "$1"), separator)
    return F.filter(levels, lambda level: (level != "") & ~level.endswith("..."))


def trim_path(levels: Column, title: Column, max_levels: int) -> Column:
    """`path_levels` -> at most `max_levels` of them, without a leaf that merely repeats the
    (normalised) `title`."""
    if max_levels < 1:
        raise ValueError(f"max_levels must be >= 1, got {max_levels}")
    leaf = normalize_folded(F.try_element_at(levels, F.lit(-1)))
    leaf_is_title = (leaf != "") & (title != "") & (title.startswith(leaf) | leaf.startswith(title))
    keep = F.size(levels) - F.when(leaf_is_title, 1).otherwise(0)
    return F.slice(levels, 1, F.least(keep, F.lit(max_levels)))


def split_path(col: Column, separator: str, title: Column, max_levels: int) -> Column:
    """Category path -> at most `max_levels` folded levels, top first. Empty and truncated
    ("...") levels are dropped, and so is a leaf that merely repeats the (raw) title. The
    clean stage makes `path_levels` a column first and calls `trim_path` on it: as one
    expression, Spark derives the levels again for every place that reads them."""
    return trim_path(path_levels(col, separator), normalize_text(title), max_levels)


def split_list(col: Column, separator: str) -> Column:
    """Bullet list "a | b | c" -> normalised, non-empty items."""
    items = F.transform(_split_folded(col, separator), normalize_folded)
    return F.filter(items, lambda item: item != "")
