"""The embedded default catalog: realistic synthetic products, so `make run` needs no download.

Products are drawn from a small fixed taxonomy (group >> category >> product type) in which
every word that matters for a downstream model is consistent: a product type has its own base
price, weight, materials, sizes and modifiers; a brand belongs to one group and carries a price
tier; colour, material and size usually appear in the title. Price = type base x brand tier x
lognormal noise, so it is learnable from title words.

About `dirty_fraction` of rows carry exactly one defect of the kinds real catalog exports have
(HTML, mojibake, duplicates, broken prices, ...), recorded in the `defect` column so tests can
check that cleaning handles each kind. Texts are built by indexing lookup tables of templated
words (object arrays) and concatenating a few of them per row: no per-row Python, a million rows
in a few seconds.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipelines.core.config import SyntheticConfig

__all__ = [
    "ACCENTED_BRANDS",
    "BAD_PRICES",
    "BULLETS_P",
    "BULLET_SEPARATOR",
    "CENTS",
    "COLUMNS",
    "DEFECT_KINDS",
    "DIGITS4",
    "LEVEL_SEPARATOR",
    "LONG_TITLE_CHARS",
    "LOW_GROUPS",
    "MAX_PRICE_CENTS",
    "MAX_TABLE",
    "PRICE_FORMAT_P",
    "SENTENCES_P",
    "TAXONOMY",
    "TITLE_TEMPLATE_P",
    "Category",
    "Group",
    "ProductType",
    "ensure_synthetic_catalog",
    "generate_catalog",
    "load_taxonomy",
    "pseudo_word",
    "translate",
    "with_translated_locale",
    "write_catalog",
]

COLUMNS = (
    "sku", "name", "description", "bullets", "brand", "category", "price",
    "color", "material", "size", "weight_kg", "locale",
)  # fmt: skip
DEFECT_KINDS = (
    "html_entity", "html_tags", "mojibake", "accents", "brand_spaces", "missing_title",
    "long_title", "bad_price", "negative_price", "exact_duplicate", "id_conflict",
    "invalid_encoding",
)  # fmt: skip
LEVEL_SEPARATOR = " >> "
BULLET_SEPARATOR = " | "
LONG_TITLE_CHARS = 600

# How often an attribute the product has is also written in its title.
SHOW_COLOR, SHOW_MATERIAL, SHOW_SIZE, SHOW_MODIFIER = 0.85, 0.75, 0.7, 0.6
SHOW_FIXED_AUDIENCE, SHOW_POOLED_AUDIENCE = 0.9, 0.45
TITLE_TEMPLATE_P = (0.5, 0.2, 0.15, 0.15)
SENTENCES_P = (0.08, 0.3, 0.4, 0.22)  # empty description, then 1, 2 or 3 sentences
BULLETS_P = (0.1, 0.3, 0.35, 0.25)  # no bullets, then 2, 3 or 4 phrases
PRICE_FORMAT_P = (0.74, 0.12, 0.06, 0.06, 0.02)  # 12.99 | $1,299.00 | USD 1299 | 1,299 | empty
TITLE_AS_LEVEL_P, TRUNCATED_PATH_P = 0.10, 0.03
BAD_PRICES = ("call for price", "N/A", "price on request", "see store", "TBD", "--")
ACCENTED_BRANDS = (
    "Café Noir", "Crème Maison", "Maison Lumière", "Señor Sueño", "Müller & Söhne",
    "Björk Design", "Zoë Atelier", "Élan Studio",
)  # fmt: skip


@dataclass(frozen=True)
class ProductType:
    label: str  # category level 3, plural
    noun: str  # as written in titles
    price: float  # base price in USD for a mid-tier brand
    weight: float  # base shipping weight in kg
    modifiers: tuple[str, ...]
    materials: tuple[str, ...] = ()  # empty: the group's materials
    sizes: tuple[str, ...] = ()  # empty: the group's sizes


@dataclass(frozen=True)
class Category:
    name: str  # category level 2
    uses: tuple[str, ...]  # what descriptions say the product is for
    types: tuple[ProductType, ...]
    audience: str = ""  # fixed audience (e.g. "Men's" clothing), else the group's pool


@dataclass(frozen=True)
class Group:
    name: str  # category level 1
    brands: tuple[tuple[str, float], ...]  # (brand, price tier multiplier)
    colors: tuple[str, ...]
    materials: tuple[str, ...]
    sizes: tuple[str, ...]  # ("",): products of this group have no size
    features: tuple[str, ...]
    categories: tuple[Category, ...]
    audiences: tuple[str, ...] = ("",)
    material_phrase: str = "made from"


def load_taxonomy() -> tuple[Group, ...]:
    """The taxonomy shipped as package data (`pipelines/data/taxonomy.yaml`)."""
    text = resources.files("pipelines.data").joinpath("taxonomy.yaml").read_text("utf-8")
    return tuple(
        Group(
            name=group["name"],
            brands=tuple((brand["name"], float(brand["tier"])) for brand in group["brands"]),
            colors=tuple(group["colors"]),
            materials=tuple(group["materials"]),
            sizes=tuple(group["sizes"]),
            features=tuple(group["features"]),
            categories=tuple(
                Category(
                    name=category["name"],
                    uses=tuple(category["uses"]),
                    audience=category.get("audience", ""),
                    types=tuple(
                        ProductType(
                            label=kind["label"],
                            noun=kind["noun"],
                            price=float(kind["price"]),
                            weight=float(kind["weight"]),
                            modifiers=tuple(kind["modifiers"]),
                            materials=tuple(kind.get("materials", ())),
                            sizes=tuple(kind.get("sizes", ())),
                        )
                        for kind in category["types"]
                    ),
                )
                for category in group["categories"]
            ),
            audiences=tuple(group.get("audiences", ("",))),
            material_phrase=group.get("material_phrase", "made from"),
        )
        for group in yaml.safe_load(text)
    )


TAXONOMY = load_taxonomy()

MAX_TABLE = 1 << 17  # largest outer-sum lookup table worth building (see _Text)
MAX_PRICE_CENTS = 99_999_99  # prices stay below $100,000, so number tables stay small


def _vocab(words: list[str]) -> np.ndarray:
    return np.array(words, dtype=object)


CENTS = _vocab([f".{c:02d}" for c in range(100)])
LOW_GROUPS = _vocab([str(g) for g in range(1000)] + [f"{g:03d}" for g in range(1000)])
DIGITS4 = _vocab([f"{i:04d}" for i in range(10_000)])


class _Text:
    """Per-row text held lazily as a sum of parts, each a lookup table and a row index into it.

    Vocabularies are small and rows many, so `a + b` merges neighbouring parts into one
    outer-sum table while that stays small: a six-word title then costs one or two string
    additions per row instead of six, and rows are only built (`rows`) where they are used."""

    def __init__(self, parts: list[tuple[np.ndarray, np.ndarray | int]]) -> None:
        self.parts = parts

    @classmethod
    def of(cls, table: np.ndarray, index: np.ndarray | int = 0) -> _Text:
        return cls([(table, index)])

    @classmethod
    def const(cls, text: str) -> _Text:
        return cls.of(_vocab([text]))

    def __add__(self, other: _Text | str) -> _Text:
        other = _Text.const(other) if isinstance(other, str) else other
        (left, i), (right, j) = self.parts[-1], other.parts[0]
        if len(left) * len(right) > MAX_TABLE:
            return _Text(self.parts + other.parts)
        merged = (np.add.outer(left, right).ravel(), i * len(right) + j)
        return _Text([*self.parts[:-1], merged, *other.parts[1:]])

    def __radd__(self, other: str) -> _Text:
        return _Text.const(other) + self

    def around(self, prefix: str, suffix: str = "") -> _Text:
        """prefix + text + suffix, or "" where the text is empty (one-table texts only)."""
        ((table, index),) = self.parts
        return _Text.of(_vocab([prefix + t + suffix if t else "" for t in table]), index)

    def rows(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The texts of `rows` (all rows when None) as an object array."""

        def pick(index: np.ndarray | int) -> np.ndarray | int:
            return index if rows is None or np.ndim(index) == 0 else cast(np.ndarray, index)[rows]

        texts = [table[pick(index)] for table, index in self.parts]
        out = texts[0]
        for text in texts[1:]:
            out = out + text
        return out if np.ndim(out) else np.full(0 if rows is None else len(rows), out, dtype=object)


def _joined(separator: str, a: _Text, b: _Text) -> _Text:
    """a + separator + b, leaving out the separator next to an empty side (one-table texts)."""
    ((left, i),), ((right, j),) = a.parts, b.parts
    table = [separator.join(t for t in (x, y) if t) for x in left for y in right]
    return _Text.of(_vocab(table), i * len(right) + j)


def _lower(text: str) -> str:
    """Lower case for running text, keeping acronyms: "USB-C Hub" -> "USB-C hub"."""
    return " ".join(
        word if sum(c.isalpha() for c in word) > 1 and word.isupper() else word.lower()
        for word in text.split(" ")
    )


class _Ragged:
    """Per-owner word lists flattened into one table, so each row's pick is one vectorised index.

    Index `empty` (one past the words) stands for "": an attribute left out of a text."""

    def __init__(self, lists: list[tuple[str, ...]]) -> None:
        self.lengths = np.array([len(words) for words in lists])
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.values = [word for words in lists for word in words]
        self.words = _vocab([*self.values, ""])
        self.empty = len(self.values)

    def at(self, index: np.ndarray, template: str = "{}", lower: bool = False) -> _Text:
        """Each row's word put through `template` (e.g. " | Color: {}"); "" stays ""."""
        words = [template.format(_lower(w) if lower else w) if w else "" for w in self.values]
        return _Text.of(_vocab([*words, ""]), index)

    def pick(self, rng: np.random.Generator, owner: np.ndarray) -> np.ndarray:
        """A uniform index into each row's owner list."""
        return self.offsets[owner] + (rng.random(len(owner)) * self.lengths[owner]).astype(int)

    def pick_other(
        self, rng: np.random.Generator, owner: np.ndarray, first: np.ndarray
    ) -> np.ndarray:
        """A second pick from the same list that differs from `first` where the list allows."""
        length = self.lengths[owner]
        step = 1 + (rng.random(len(owner)) * np.maximum(length - 1, 1)).astype(int)
        return self.offsets[owner] + (first - self.offsets[owner] + step) % length

    def shown(self, index: np.ndarray, visible: np.ndarray) -> np.ndarray:
        """`index` where visible, else the empty slot."""
        return np.where(visible, index, self.empty)


@dataclass(frozen=True)
class _Tables:
    """The taxonomy as per-type arrays and ragged word lists, built once per process."""

    types: tuple[tuple[Group, Category, ProductType], ...]
    group: np.ndarray  # per type
    category: np.ndarray  # per type
    price: np.ndarray  # per type
    weight: np.ndarray  # per type
    audience_p: np.ndarray  # per type: how often the audience is in the title
    path: np.ndarray  # per type: "Group >> Category >> Types"
    headlines: _Ragged  # per type: the noun, then "<modifier> <noun>" for each modifier
    materials: _Ragged  # per type
    sizes: _Ragged  # per type
    audiences: _Ragged  # per type
    brands: _Ragged  # per group
    tiers: np.ndarray  # per brand index
    colors: _Ragged  # per group
    features: _Ragged  # per group
    uses: _Ragged  # per category

    def per_type(self, kind: np.ndarray, template: str) -> _Text:
        """Each row's type through `template`, with {noun} and {category} in lower case,
        {phrase} ("made from") and singular/plural {this}, {This}, {is_}, {features}."""
        texts = []
        for group, category, product in self.types:
            plural = product.noun.endswith("s") and not product.noun.endswith("ss")
            texts.append(template.format(
                noun=_lower(product.noun), category=_lower(category.name),
                phrase=group.material_phrase, this="these" if plural else "this",
                This="These" if plural else "This", is_="are" if plural else "is",
                features="feature" if plural else "features",
            ))  # fmt: skip
        return _Text.of(_vocab(texts), kind)


@cache
def _tables() -> _Tables:
    types = tuple((g, c, t) for g in TAXONOMY for c in g.categories for t in c.types)
    categories = [(g, c) for g in TAXONOMY for c in g.categories]
    return _Tables(
        types=types,
        group=np.array([TAXONOMY.index(g) for g, _, _ in types]),
        category=np.array([categories.index((g, c)) for g, c, _ in types]),
        price=np.array([t.price for *_, t in types], dtype=float),
        weight=np.array([t.weight for *_, t in types], dtype=float),
        audience_p=np.array([SHOW_FIXED_AUDIENCE if c.audience else SHOW_POOLED_AUDIENCE
                             for _, c, _ in types]),
        path=_vocab([LEVEL_SEPARATOR.join((g.name, c.name, t.label)) for g, c, t in types]),
        headlines=_Ragged([(t.noun, *(f"{m} {t.noun}" for m in t.modifiers))
                           for *_, t in types]),
        materials=_Ragged([t.materials or g.materials for g, _, t in types]),
        sizes=_Ragged([t.sizes or g.sizes for g, _, t in types]),
        audiences=_Ragged([(c.audience,) if c.audience else g.audiences for g, c, _ in types]),
        brands=_Ragged([tuple(b for b, _ in g.brands) for g in TAXONOMY]),
        tiers=np.array([tier for g in TAXONOMY for _, tier in g.brands]),
        colors=_Ragged([g.colors for g in TAXONOMY]),
        features=_Ragged([g.features for g in TAXONOMY]),
        uses=_Ragged([c.uses for _, c in categories]),
    )  # fmt: skip


def _choose(rng: np.random.Generator, n: int, p: tuple[float, ...]) -> np.ndarray:
    return rng.choice(len(p), size=n, p=np.asarray(p) / sum(p))


def _fill(which: np.ndarray, options: list[Callable[[np.ndarray], np.ndarray | str]]) -> np.ndarray:
    """out[i] = options[which[i]] for row i, each option built only on the rows that use it
    (rows whose `which` matches no option are left None)."""
    out = np.empty(len(which), dtype=object)
    for k, build in enumerate(options):
        rows = np.flatnonzero(which == k)
        if len(rows):
            out[rows] = build(rows)
    return out


def _integers(values: np.ndarray) -> _Text:
    """Decimal text of small non-negative integers."""
    return _Text.of(_vocab([str(i) for i in range(int(values.max(initial=0)) + 1)]), values)


def _cents(cents: np.ndarray) -> _Text:
    """12345 -> "123.45"."""
    return _integers(cents // 100) + _Text.of(CENTS, cents % 100)


def _thousands(amount: np.ndarray) -> _Text:
    """1234 -> "1,234" (amounts below a million)."""
    high, low = amount // 1000, amount % 1000
    highs = _vocab(["", *(f"{h}," for h in range(1, int(high.max(initial=0)) + 1))])
    return _Text.of(highs, high) + _Text.of(LOW_GROUPS, low + 1000 * (high > 0))


def _format_prices(rng: np.random.Generator, cents: np.ndarray) -> np.ndarray:
    """Mostly "12.99"; sometimes "$1,299.00", "USD 1299", "1,299" or missing, as exports mix."""
    dollars = (cents + 50) // 100
    formats = [
        _cents(cents),
        "$" + _thousands(cents // 100) + _Text.of(CENTS, cents % 100),
        "USD " + _integers(dollars),
        _thousands(dollars),
        _Text.const(""),
    ]
    return _fill(_choose(rng, len(cents), PRICE_FORMAT_P), [f.rows for f in formats])


def _draw_products(rng: np.random.Generator, tables: _Tables, n: int) -> dict[str, np.ndarray]:
    """Consistent attributes per row, as table indices: the type fixes group, category,
    materials and sizes; the group fixes brands and colours."""
    kind = rng.integers(0, len(tables.types), n)
    group = tables.group[kind]
    brand = tables.brands.pick(rng, group)
    price = tables.price[kind] * tables.tiers[brand] * rng.lognormal(0.0, 0.3, n)
    ending = _choose(rng, n, (0.5, 0.25, 0.25))  # x.99, x.00, exact cents
    cents = np.select(
        [ending == 0, ending == 1],
        [np.floor(price) * 100 + 99, np.round(price) * 100],
        np.round(price * 100),
    ).astype(np.int64)
    weight = tables.weight[kind] * rng.lognormal(0.0, 0.2, n)
    plain = tables.headlines.offsets[kind]  # the bare noun; modified headlines follow it
    headline = plain + 1 + (rng.random(n) * (tables.headlines.lengths[kind] - 1)).astype(int)
    color = tables.colors.pick(rng, group)
    material = tables.materials.pick(rng, kind)
    size = tables.sizes.pick(rng, kind)
    audience = tables.audiences.pick(rng, kind)
    feature = tables.features.pick(rng, group)
    return {
        "kind": kind,
        "brand": brand,
        "color": color,
        "material": material,
        "size": size,
        "headline": headline,  # "Running T-Shirt"
        "use": tables.uses.pick(rng, tables.category[kind]),
        "feature": feature,
        "other_feature": tables.features.pick_other(rng, group, feature),
        "cents": np.clip(cents, 99, MAX_PRICE_CENTS),
        "weight_cents": np.maximum(np.round(weight * 100), 1).astype(np.int64),
        # What the title shows: attributes are left out now and then, as sellers do.
        "title_color": tables.colors.shown(color, rng.random(n) < SHOW_COLOR),
        "title_material": tables.materials.shown(material, rng.random(n) < SHOW_MATERIAL),
        "title_size": tables.sizes.shown(size, rng.random(n) < SHOW_SIZE),
        "title_audience": tables.audiences.shown(audience, rng.random(n) < tables.audience_p[kind]),
        "title_headline": np.where(rng.random(n) < SHOW_MODIFIER, headline, plain),
    }


def _titles(
    rng: np.random.Generator, tables: _Tables, p: dict[str, np.ndarray], brand: _Text
) -> np.ndarray:
    """A few word orders, as different sellers write titles. Optional words carry their own
    separator (and are "" when left out), so no template leaves a doubled space or comma."""
    headline = tables.headlines.at(p["title_headline"])
    audience, audience_ = (tables.audiences.at(p["title_audience"], t) for t in (" {}", "{} "))
    color, color_ = (tables.colors.at(p["title_color"], t) for t in (" {}", "{} "))
    material, material_, comma_material = (
        tables.materials.at(p["title_material"], t) for t in (" {}", "{} ", ", {}")
    )
    size, comma_size = (tables.sizes.at(p["title_size"], t) for t in (" {}", ", {}"))
    color_and_size = _joined(", ", tables.colors.at(p["title_color"]),
                             tables.sizes.at(p["title_size"]))  # fmt: skip
    templates = [
        # Nike Men's Blue Cotton Running T-Shirt XL
        brand + audience + color + material + " " + headline + size,
        # Nike Men's Running T-Shirt, Blue Cotton, XL
        brand + audience + " " + headline + (color + material).around(",") + comma_size,
        # Men's Blue Running T-Shirt by Nike, Cotton, XL
        audience_ + color_ + headline + " by " + brand + comma_material + comma_size,
        # Nike - Cotton Running T-Shirt (Blue, XL)
        brand + " - " + material_ + headline + color_and_size.around(" (", ")"),
    ]
    return _fill(_choose(rng, len(p["kind"]), TITLE_TEMPLATE_P), [t.rows for t in templates])


def _descriptions(
    rng: np.random.Generator,
    tables: _Tables,
    p: dict[str, np.ndarray],
    brand: _Text,
    needed: np.ndarray,
) -> np.ndarray:
    """1-3 template sentences on colour, material and use; empty for some rows not `needed`."""
    n, kind = len(p["kind"]), p["kind"]
    color = tables.colors.at(p["color"], lower=True)
    material = tables.materials.at(p["material"], "{}.", lower=True)
    weight = _cents(p["weight_cents"])
    sizes = _vocab([f" Available in size {s}." if s else " Ships in 1-2 business days."
                    for s in tables.sizes.values])  # fmt: skip
    sentences = _choose(rng, n, SENTENCES_P)
    sentences[needed & (sentences == 0)] = 1
    first = _fill(np.where(sentences >= 1, _choose(rng, n, (1, 1, 1)), -1), [t.rows for t in (
        # This blue t-shirt is made from cotton.
        tables.per_type(kind, "{This} ") + color
        + tables.per_type(kind, " {noun} {is_} {phrase} ") + material,
        # Designed for everyday wear, this t-shirt features cotton.
        tables.uses.at(p["use"], "Designed for {}, ")
        + tables.per_type(kind, "{this} {noun} {features} ") + material,
        # Our running t-shirt in blue, perfect for everyday wear.
        tables.headlines.at(p["headline"], "Our {} in ", lower=True) + color
        + tables.uses.at(p["use"], ", perfect for {}."),
    )])  # fmt: skip
    second = _fill(np.where(sentences >= 2, _choose(rng, n, (1, 1, 1)), -1), [t.rows for t in (
        " " + brand + tables.uses.at(p["use"], " made it for {}."),
        _Text.const(" Built to last and easy to care for."),
        tables.per_type(kind, " From the {category} range by ") + brand + ".",
    )])  # fmt: skip
    third = _fill(np.where(sentences >= 3, _choose(rng, n, (1, 1, 1)), -1), [t.rows for t in (
        _Text.of(sizes, p["size"]),
        " Weighs about " + weight + " kg.",
        tables.features.at(p["feature"], " {}."),
    )])  # fmt: skip
    return _fill(sentences, [
        lambda r: "",
        lambda r: first[r],
        lambda r: first[r] + second[r],
        lambda r: first[r] + second[r] + third[r],
    ])  # fmt: skip


def _bullets(rng: np.random.Generator, tables: _Tables, p: dict[str, np.ndarray]) -> np.ndarray:
    """2-4 short feature phrases, or none."""
    two = tables.features.at(p["feature"]) + tables.materials.at(
        p["material"], BULLET_SEPARATOR + "Material: {}"
    )
    three = two + tables.features.at(p["other_feature"], BULLET_SEPARATOR + "{}")
    four = three + tables.colors.at(p["color"], BULLET_SEPARATOR + "Color: {}")
    options = [_Text.const(""), two, three, four]
    return _fill(_choose(rng, len(p["kind"]), BULLETS_P), [t.rows for t in options])


def _strings(values: np.ndarray) -> np.ndarray:
    """As numpy StringDType, for np.strings operations on the few rows that need them."""
    return values.astype(np.dtypes.StringDType())


def _categories(rng: np.random.Generator, path: np.ndarray, title: np.ndarray) -> np.ndarray:
    """Three levels; some rows append the title as a 4th level or are cut off with "...",
    as marketplace exports are."""
    n = len(path)
    leaf = np.flatnonzero((rng.random(n) < TITLE_AS_LEVEL_P) & (title != ""))
    path[leaf] = path[leaf] + LEVEL_SEPARATOR + title[leaf]
    cut = np.flatnonzero(rng.random(n) < TRUNCATED_PATH_P)
    cut_paths = _strings(path[cut])
    # Keep level 1 and at least three characters of level 2; drop at least two at the end.
    low = np.strings.find(cut_paths, LEVEL_SEPARATOR) + len(LEVEL_SEPARATOR) + 3
    high = np.strings.str_len(cut_paths) - 2
    stop = low + (rng.random(len(cut)) * (high - low)).astype(int)
    path[cut] = (np.strings.slice(cut_paths, 0, stop) + "...").astype(object)
    return path


def _assign_defects(
    rng: np.random.Generator, rows: int, dirty_fraction: float
) -> dict[str, np.ndarray]:
    """Rows of each defect kind: exactly one defect per dirty row, kinds dealt in turn so
    each gets an even share."""
    dirty = rng.choice(rows, size=round(rows * dirty_fraction), replace=False)
    return {kind: np.sort(dirty[k :: len(DEFECT_KINDS)]) for k, kind in enumerate(DEFECT_KINDS)}


def _html_entities(title: np.ndarray) -> np.ndarray:
    """Escaped as a scraped page would be: "Levi&#39;s", "Salt &amp; Pepper", "Dr.&nbsp;Martens"."""
    title = np.strings.replace(np.strings.replace(_strings(title), "&", "&amp;"), "'", "&#39;")
    plain = np.strings.find(title, "&") < 0
    return np.where(plain, np.strings.replace(title, " ", "&nbsp;", 1), title).astype(object)


def _mojibake(title: np.ndarray) -> np.ndarray:
    """Typographic text (’ and a no-break space) saved as UTF-8 and read back as cp1252:
    "Women’s" -> "Womenâ€™s"."""
    typographic = np.strings.replace(_strings(title), "'", "\u2019")
    typographic = np.strings.replace(typographic, " ", "\xa0", 1)
    return np.strings.decode(np.strings.encode(typographic, "utf-8"), "cp1252").astype(object)


def _replacement_char(rng: np.random.Generator, title: np.ndarray) -> np.ndarray:
    """One character lost to a bad decode: "Caf\ufffd Noir"."""
    title = _strings(title)
    at = 1 + (rng.random(len(title)) * (np.strings.str_len(title) - 2)).astype(int)
    broken = np.strings.slice(title, 0, at) + "\ufffd" + np.strings.slice(title, at + 1, None)
    return broken.astype(object)


def _stuffed(title: np.ndarray, keywords: np.ndarray) -> np.ndarray:
    """Keyword stuffing past LONG_TITLE_CHARS, the way spam listings pad titles."""
    keywords = _strings(keywords + " Best Seller Gift Idea ")
    repeats = LONG_TITLE_CHARS // np.strings.str_len(keywords) + 1
    return title + " " + np.strings.rstrip(np.strings.multiply(keywords, repeats)).astype(object)


def _pick(rng: np.random.Generator, words: tuple[str, ...], n: int) -> np.ndarray:
    return _vocab(list(words))[rng.integers(0, len(words), n)]


def generate_catalog(rows: int, seed: int, dirty_fraction: float) -> pd.DataFrame:
    """`rows` products as a raw CSV export holds them (all text, "" where missing), plus a
    `defect` column naming the one defect of each dirty row ("" for clean rows).

    Deterministic in (rows, seed, dirty_fraction): the default catalog is reproducible
    without shipping it."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    if not 0.0 <= dirty_fraction <= 0.5:
        raise ValueError(f"dirty_fraction must be within [0, 0.5], got {dirty_fraction}")
    rng = np.random.default_rng(seed)
    tables = _tables()
    rows_with = _assign_defects(rng, rows, dirty_fraction)
    defect = np.full(rows, "", dtype=object)
    for kind, kind_rows in rows_with.items():
        defect[kind_rows] = kind

    p = _draw_products(rng, tables, rows)
    accents = rows_with["accents"]  # accented brands are extra words after the real ones
    p["brand"][accents] = len(tables.brands.words) + rng.integers(0, len(ACCENTED_BRANDS),
                                                                  len(accents))  # fmt: skip
    brand = _Text.of(_vocab([*tables.brands.words, *ACCENTED_BRANDS]), p["brand"])
    title = _titles(rng, tables, p, brand)
    cents, number = p["cents"], np.arange(1, rows + 1)
    sku = "SKU" + _Text.of(_vocab([f"{h:03d}" for h in range(rows // 10_000 + 1)]),
                           number // 10_000) + _Text.of(DIGITS4, number % 10_000)  # fmt: skip
    columns = {
        "sku": sku.rows(),
        "name": title.copy(),
        "description": _descriptions(rng, tables, p, brand, defect == "html_tags"),
        "bullets": _bullets(rng, tables, p),
        "brand": brand.rows(),
        "category": _categories(rng, tables.path[p["kind"]], title),
        "price": _format_prices(rng, cents),
        "color": tables.colors.words[p["color"]],
        "material": tables.materials.words[p["material"]],
        "size": tables.sizes.words[p["size"]],
        "weight_kg": _cents(p["weight_cents"]).rows(),
        "locale": np.full(rows, "en_US", dtype=object),
        "defect": defect,
    }

    name, price, brands = columns["name"], columns["price"], columns["brand"]
    r = rows_with["html_entity"]
    name[r] = _html_entities(name[r])
    r = rows_with["html_tags"]
    columns["description"][r] = "<p>" + columns["description"][r] + "</p><br/>"
    r = rows_with["mojibake"]
    name[r] = _mojibake(name[r])
    r = rows_with["brand_spaces"]
    brands[r] = _fill(rng.integers(0, 3, len(r)), [
        lambda s: " " + brands[r[s]],
        lambda s: brands[r[s]] + "  ",
        lambda s: "  " + brands[r[s]] + " ",
    ])  # fmt: skip
    name[rows_with["missing_title"]] = ""
    r = rows_with["long_title"]
    keywords = (brands[r] + " " + tables.headlines.words[p["headline"][r]] + " "
                + columns["color"][r] + " " + columns["material"][r] + " "
                + tables.path[p["kind"][r]])  # fmt: skip
    name[r] = _stuffed(name[r], keywords)
    r = rows_with["bad_price"]
    price[r] = _pick(rng, BAD_PRICES, len(r))
    r = rows_with["negative_price"]
    price[r] = ("-" + _cents(cents[r])).rows()
    r = rows_with["invalid_encoding"]
    name[r] = _replacement_char(rng, name[r])

    # Duplicates and id conflicts take their slot, so the row count stays `rows`, and point at
    # a clean row. An exact duplicate copies it whole. An id conflict keeps its sku but not its
    # content: half copy the row with a new price, half are another product under that sku.
    duplicates, conflicts = rows_with["exact_duplicate"], rows_with["id_conflict"]
    repriced, reused = conflicts[::2], conflicts[1::2]
    copies = np.concatenate([duplicates, repriced])
    sources = rng.choice(np.flatnonzero(defect == ""), size=len(copies) + len(reused),
                         replace=False)  # fmt: skip
    for column, values in columns.items():
        if column != "defect":
            values[copies] = values[sources[: len(copies)]]
    markup = rng.uniform(1.1, 1.6, len(repriced))
    new_cents = np.round(cents[sources[len(duplicates) : len(copies)]] * markup).astype(np.int64)
    price[repriced] = _cents(new_cents).rows()
    columns["sku"][reused] = columns["sku"][sources[len(copies) :]]
    return pd.DataFrame(columns)


SYLLABLES = (
    "ba", "ce", "di", "fo", "gu", "la", "me", "ni", "po", "ru", "sa", "te", "vi", "zo", "que", "lle",
)  # fmt: skip
TRANSLATED = ("name", "description", "bullets")  # the texts a second locale writes its own way
_WORD = re.compile(r"(\W*)([^\W\d_]+)(.*)", re.DOTALL)  # punctuation, letters, the rest


def pseudo_word(word: str) -> str:
    """`word` (lower case) in the generated language: four syllables drawn from its hash, the
    same on every run and machine."""
    digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
    return "".join(SYLLABLES[byte % len(SYLLABLES)] for byte in digest)


def translate(texts: np.ndarray, keep: frozenset[str]) -> np.ndarray:
    """Each text word by word into the generated language, as a catalog in another language
    would write it: words of `keep` (brand names, lower case), numbers and codes stay; a
    capital stays; punctuation around a word stays. One dictionary lookup per distinct word."""
    words = pd.Series(texts, dtype=object).str.split(" ", regex=False).explode()

    def word_in_locale(word: str) -> str:
        match = _WORD.fullmatch(word)
        if match is None or word.lower() in keep or match.group(2).lower() in keep:
            return word
        before, letters, rest = match.groups()
        new = pseudo_word(letters.lower())
        return before + (new.capitalize() if letters[0].isupper() else new) + rest

    mapping = {word: word_in_locale(word) for word in words.dropna().unique()}
    joined = words.map(mapping).fillna("").groupby(level=0).agg(" ".join)
    return joined.to_numpy(dtype=object)


def with_translated_locale(frame: pd.DataFrame, locale: str) -> pd.DataFrame:
    """`frame` and every product listed again in `locale`: its texts translated (`translate`),
    its sku suffixed with the locale; both listings share a `global_id` column (the original
    sku), which is how a marketplace knows the two are one product."""
    brands = [*(b for group in TAXONOMY for b, _ in group.brands), *ACCENTED_BRANDS]
    keep = frozenset(word.lower() for brand in brands for word in brand.split())
    second = frame.copy()
    for column in TRANSLATED:
        second[column] = translate(frame[column].to_numpy(dtype=object), keep)
    second["sku"] = frame["sku"] + "-" + locale
    second["locale"] = locale
    both = pd.concat([frame.assign(global_id=frame["sku"]), second.assign(global_id=frame["sku"])])
    return both.reset_index(drop=True)


def write_catalog(frame: pd.DataFrame, path: Path, fmt: str, *, keep_defect: bool = False) -> None:
    """Write as a source system would: CSV (minimal quoting, doubled quotes, UTF-8), JSON lines
    or Parquet, all columns strings. `defect` is ground truth for tests, not catalog data, so it
    is dropped unless asked for."""
    if not keep_defect:
        frame = frame.drop(columns="defect", errors="ignore")
    if fmt == "csv":
        frame.to_csv(path, index=False, encoding="utf-8", lineterminator="\n")
    elif fmt == "json":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    elif fmt == "parquet":
        schema = pa.schema([(column, pa.string()) for column in frame.columns])
        pq.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False), path)
    else:
        raise ValueError(f"unknown catalog format {fmt!r}: expected csv, json or parquet")


def ensure_synthetic_catalog(config: SyntheticConfig, directory: Path) -> Path:
    """The CSV for `config`, generated on first use. The name carries every parameter, so an
    existing file is the right one and is reused as is."""
    locale = f"-{config.translated_locale}" if config.translated_locale else ""
    name = f"catalog-{config.rows}-{config.seed}-{config.dirty_fraction}{locale}.csv"
    path = directory / name
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        frame = generate_catalog(config.rows, config.seed, config.dirty_fraction)
        if config.translated_locale:
            frame = with_translated_locale(frame, config.translated_locale)
        write_catalog(frame, partial, "csv")
        os.replace(partial, path)  # atomic: a reader never sees half a catalog
    finally:
        partial.unlink(missing_ok=True)
    return path
