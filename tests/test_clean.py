"""Clean stage: every defect lands where it should, and rows in = clean + quarantined + duplicates."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from pipelines.core.config import Config, load_config
from pipelines.core.errors import CatalogError
from pipelines.data.catalog import content_hash, read_clean
from pipelines.data.synthetic import generate_catalog, write_catalog
from pipelines.stages import clean

HEADER = [
    "sku",
    "name",
    "description",
    "bullets",
    "brand",
    "category",
    "price",
    "color",
    "material",
    "size",
    "weight_kg",
    "locale",
]
GOOD_TITLE = "Nike Men's Blue Cotton T-Shirt XL"


def row(sku: str, name: str = GOOD_TITLE, price: str = "19.99", **fields: str) -> list[str]:
    values = {
        "sku": sku,
        "name": name,
        "description": "Soft <b>cotton</b> tee.",
        "bullets": "Breathable | Machine wash",
        "brand": "Nike",
        "category": "Clothing >> Men's Clothing >> T-Shirts",
        "price": price,
        "color": "Blue",
        "material": "Cotton",
        "size": "XL",
        "weight_kg": "0.20",
        "locale": "en_US",
        **fields,
    }
    return [values[column] for column in HEADER]


# (defect, row, expected outcome): outcome is "clean", "exact_duplicate" or a quarantine reason.
# With the two raw-byte rows below, the catalog carries 20 kinds of defect.
CASES: list[tuple[str, list[str], str]] = [
    ("currency_symbol_and_commas", row("ok1", price="$1,299.00"), "clean"),
    (
        "html_entities",
        row("entity", name="L&#39;Or&eacute;al Paris Shampoo &amp; Conditioner"),
        "clean",
    ),
    ("mojibake", row("mojibake", name="Coconut OilÂ\xa0500 ml Womenâ€™s"), "clean"),
    (
        "accents_and_brand_spaces",
        row("accents", name="Café Crème Coffee Mug", brand="  Café Noir  "),
        "clean",
    ),
    ("rupee_price", row("rupees", price="Rs. 999"), "clean"),
    ("missing_price", row("noprice", price=""), "clean"),
    (
        "title_as_category_leaf",
        row("leaf", category=f"Clothing >> Men's Clothing >> {GOOD_TITLE}"),
        "clean",
    ),
    (
        "truncated_category",
        row("trunc", category="Home & Furniture >> Living Room Fur..."),
        "clean",
    ),
    ("empty_title", row("notitle", name=""), "missing_title"),
    ("punctuation_title", row("punct", name="!!! ??? ..."), "missing_title"),
    ("long_title", row("long", name="Extra " * 100), "clean"),  # cut, not quarantined
    ("unparsable_price", row("badprice", price="call for price"), "unparsable_price"),
    ("negative_price", row("negprice", price="-49.99"), "negative_price"),
    ("huge_price", row("hugeprice", price="999999999999"), "price_out_of_range"),
    ("replacement_char", row("fffd", name="Broken \ufffd Title"), "invalid_encoding"),
    ("missing_id", row("", name="No Id Shirt"), "missing_product_id"),
    ("id_conflict", row("conflict", price="12.00"), "duplicate_id_conflict"),
    ("id_conflict", row("conflict", price="10.00"), "clean"),  # first by its fields' text
    ("id_conflict", row("conflict2", description=""), "duplicate_id_conflict"),
    ("id_conflict", row("conflict2"), "clean"),  # the most complete row is kept
    ("control_characters_in_id", row("esc\x1bid"), "invalid_product_id"),
    ("exact_duplicate", row("twice"), "clean"),
    ("exact_duplicate", row("twice"), "exact_duplicate"),
    ("exact_duplicate", row("twice"), "exact_duplicate"),
]
RAW_BAD_BYTES = b"badbytes,Bad \xff\xfe Bytes Title,d,b,Nike,A >> B,5.00,Blue,Cotton,M,0.1,en_US\n"
MALFORMED_LINE = (
    "malformed,Too Many Fields,d,b,Nike,A >> B,5.00,Blue,Cotton,M,0.1,en_US,extra,more\n"
)


def catalog_config(path: Path, workdir: Path, fmt: str = "csv", *overrides: str) -> Config:
    return load_config(
        overrides=[
            f"workdir={workdir}",
            "catalog.synthetic=null",
            f"catalog.path={path}",
            f"catalog.format={fmt}",
            *overrides,
        ]
    )


@pytest.fixture(scope="module")
def bad_catalog(spark, tmp_path_factory):
    """The bad-input catalog, cleaned once; tests read its outputs."""
    root = tmp_path_factory.mktemp("bad")
    path = root / "bad.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        writer.writerows(case for _, case, _ in CASES)
        handle.write(MALFORMED_LINE)
    with path.open("ab") as handle:
        handle.write(RAW_BAD_BYTES)
    config = catalog_config(path, root / "work")
    result = clean.run(spark, config)
    catalog = {r["product_id"]: r.asDict() for r in read_clean(spark, config).collect()}
    quarantine = spark.read.parquet(result.outputs["quarantine"]).collect()
    return result, catalog, quarantine


def test_row_invariant(bad_catalog):
    result, catalog, quarantine = bad_catalog
    rows = result.rows
    assert rows["in"] == len(CASES) + 2
    assert rows["in"] == rows["clean"] + rows["quarantined"] + rows["exact_duplicates"]
    assert rows["clean"] == len(catalog)
    assert rows["quarantined"] == len(quarantine)
    assert rows["exact_duplicates"] == 2


@pytest.mark.parametrize(
    ("defect", "case", "expected"),
    [case for case in CASES if case[2] not in ("clean", "exact_duplicate")],
    ids=[case[0] for case in CASES if case[2] not in ("clean", "exact_duplicate")],
)
def test_each_bad_row_has_its_reason(bad_catalog, defect, case, expected):
    _, _, quarantine = bad_catalog
    sku = case[0]
    matches = [q for q in quarantine if (q["product_id"] or "") == sku]
    assert matches, f"{sku!r} not quarantined"
    assert {q["reason"] for q in matches} == {expected}
    for q in matches:
        assert q["message"]
        assert (json.loads(q["source_row"])["name"] or "") == case[1]  # CSV reads "" as null
        assert q["source_file"].endswith("bad.csv")


def test_malformed_and_undecodable_rows_are_quarantined(bad_catalog):
    _, catalog, quarantine = bad_catalog
    reasons = {q["product_id"]: q["reason"] for q in quarantine}
    assert reasons.get("badbytes") == "invalid_encoding"
    malformed = [q for q in quarantine if q["reason"] == "malformed_record"]
    assert len(malformed) == 1
    assert "Too Many Fields" in malformed[0]["source_row"]
    assert "malformed" not in catalog and "badbytes" not in catalog


def test_clean_rows_are_normalised(bad_catalog):
    _, catalog, _ = bad_catalog
    assert catalog["ok1"]["title"] == "nike mens blue cotton t shirt xl"
    assert catalog["ok1"]["title_raw"] == GOOD_TITLE
    assert catalog["ok1"]["price"] == 1299.0 and catalog["ok1"]["currency"] == "USD"
    assert catalog["entity"]["title"] == "loreal paris shampoo conditioner"
    assert catalog["mojibake"]["title"] == "coconut oil 500 ml womens"
    assert catalog["accents"]["title"] == "cafe creme coffee mug"
    assert catalog["accents"]["brand"] == "cafe noir"
    assert catalog["rupees"]["price"] == 999.0 and catalog["rupees"]["currency"] == "INR"
    assert catalog["noprice"]["price"] is None and catalog["noprice"]["currency"] is None
    assert catalog["ok1"]["category_path"] == ["Clothing", "Men's Clothing", "T-Shirts"]
    assert catalog["leaf"]["category_path"] == ["Clothing", "Men's Clothing"]
    assert catalog["trunc"]["category_path"] == ["Home & Furniture"]
    assert catalog["ok1"]["product_group"] == "clothing"
    assert catalog["trunc"]["product_group"] == "home_furniture"
    assert catalog["ok1"]["description"] == "soft cotton tee"
    assert catalog["ok1"]["bullets"] == ["breathable", "machine wash"]
    assert catalog["ok1"]["attributes"] == {
        "color": "blue",
        "material": "cotton",
        "size": "xl",
        "weight_kg": "0.20",
    }
    assert catalog["twice"]["content_hash"] == catalog["ok1"]["content_hash"]
    assert catalog["long"]["title"] == ("extra " * 67)[:400].rstrip()  # max_title_chars 400
    assert catalog["long"]["title_raw"] == "Extra " * 100
    assert catalog["conflict"]["price"] == 10.0 and catalog["conflict2"]["description"]
    assert catalog["entity"]["content_hash"] != catalog["ok1"]["content_hash"]
    for product in catalog.values():
        assert product["title"].isascii() and product["source"] == "synthetic"


def test_content_hash_changes_with_what_a_model_reads_and_the_group(spark):
    """The hash decides what an incremental embed re-embeds: a product that moved to another
    product group is re-embedded (the per-group model serves it with another MRNet); a
    change no model reads (price) is not."""
    base = {
        "title": "blue shirt",
        "description": None,
        "bullets": ["cotton"],
        "brand": "acme",
        "keywords": None,
        "image_features": None,
        "product_group": "clothing",
        "price": 5.0,
    }
    variants = [base, {**base, "product_group": "sports"}, {**base, "price": 9.0}]
    variants += [{**base, "title": "red shirt"}, {**base, "keywords": ["summer"]}]
    frame = spark.createDataFrame(
        variants,
        "title string, description string, bullets array<string>, brand string, "
        "keywords array<string>, image_features array<float>, product_group string, price double",
    )
    hashes = [row[0] for row in frame.select(content_hash()).collect()]
    assert hashes[0] != hashes[1] and hashes[0] == hashes[2] and hashes[0] != hashes[3]
    assert hashes[4] != hashes[0]


def test_keywords_take_one_column_a_keyword_type(spark, tmp_path):
    """One column per keyword type (the paper's three), normalised, blanks left out; one
    column holding a list is split as bullets are (the same rule)."""
    path = tmp_path / "catalog.csv"
    _write_rows(path, [row("k1", material=" Linen "), row("k2", color="", material="")])
    config = catalog_config(
        path, tmp_path / "work", "csv", "catalog.columns.keywords=[color, material]"
    )
    keywords = {
        r["product_id"]: r["keywords"] for r in _published(spark, clean.run(spark, config))[0]
    }
    assert keywords == {"k1": ["blue", "linen"], "k2": []}


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_json_lines_and_parquet_catalogs(spark, tmp_path, fmt):
    frame = pd.DataFrame([case for _, case, _ in CASES], columns=HEADER)
    path = tmp_path / f"catalog.{fmt}"
    if fmt == "json":
        text = frame.to_json(orient="records", lines=True) + "{not json at all\n"
        path.write_text(text)
    else:
        frame.to_parquet(path)
    result = clean.run(spark, catalog_config(path, tmp_path / "work", fmt))
    corrupt = 1 if fmt == "json" else 0
    assert result.rows["in"] == len(CASES) + corrupt
    assert result.rows["clean"] == sum(outcome == "clean" for _, _, outcome in CASES)
    assert result.rows["exact_duplicates"] == 2
    quarantine = spark.read.parquet(result.outputs["quarantine"])
    assert quarantine.filter(F.col("reason") == "malformed_record").count() == corrupt


def test_missing_mapped_column_names_it_before_work(spark, tmp_path):
    path = tmp_path / "c.csv"
    pd.DataFrame([row("a")], columns=HEADER).drop(columns=["brand"]).to_csv(path, index=False)
    with pytest.raises(CatalogError, match=r"column 'brand' \(mapped to brand\) not found"):
        clean.run(spark, catalog_config(path, tmp_path / "work"))
    assert not (tmp_path / "work" / "synthetic" / "clean").exists()


def test_wrong_column_type_names_it(spark, tmp_path):
    path = tmp_path / "c.parquet"
    table = pa.table({column: [value] for column, value in zip(HEADER, row("a"))})
    table = table.set_column(HEADER.index("name"), "name", pa.array([{"en": "x"}]))
    pq.write_table(table, path)
    with pytest.raises(CatalogError, match=r"column 'name' \(mapped to title\) has type struct"):
        clean.run(spark, catalog_config(path, tmp_path / "work", "parquet"))


def test_missing_file_is_a_clear_error(spark, tmp_path):
    with pytest.raises(CatalogError, match="does not exist"):
        clean.run(spark, catalog_config(tmp_path / "nope.csv", tmp_path / "work"))


def test_synthetic_defects_land_where_expected(spark, tmp_path):
    frame = generate_catalog(rows=3000, seed=11, dirty_fraction=0.1)
    path = tmp_path / "synthetic.csv"
    write_catalog(frame, path, "csv")
    config = catalog_config(path, tmp_path / "work")
    result = clean.run(spark, config)
    assert result.rows["in"] == 3000
    assert (
        result.rows["in"]
        == result.rows["clean"] + result.rows["quarantined"] + result.rows["exact_duplicates"]
    )
    reasons = {
        r["product_id"]: r["reason"]
        for r in spark.read.parquet(result.outputs["quarantine"]).collect()
    }
    expected = {
        "missing_title": "missing_title",
        "bad_price": "unparsable_price",
        "negative_price": "negative_price",
        "invalid_encoding": "invalid_encoding",
        "id_conflict": "duplicate_id_conflict",
    }
    for defect, reason in expected.items():
        skus = frame.loc[frame["defect"] == defect, "sku"]
        assert len(skus) > 0, defect
        assert all(reasons.get(sku) == reason for sku in skus), defect
    cleaned_ids = {r["product_id"] for r in read_clean(spark, config).collect()}
    kept = frame.loc[frame["defect"].isin(["id_conflict", "long_title"]), "sku"]
    assert set(kept) <= cleaned_ids  # one row of each conflicting id; long titles cut
    repaired = frame.loc[
        frame["defect"].isin(["html_entity", "mojibake", "accents", "brand_spaces", "html_tags"]),
        "sku",
    ]
    cleaned = {r["product_id"]: r for r in read_clean(spark, config).collect()}
    assert all(sku in cleaned for sku in repaired)
    assert all(cleaned[sku]["title"].isascii() for sku in repaired)
    assert result.rows["exact_duplicates"] == (frame["defect"] == "exact_duplicate").sum()


# catalog: (rows in the file, least share of clean rows with a category, with a price).
# Amazon's sample has 86 rows without a category, Flipkart ~1.6% whose path is only the
# (truncated) title; Instacart has no prices at all.
REAL = {
    "flipkart": (20_000, 0.98, 0.99),
    "bigbasket": (27_555, 0.99, 0.99),
    "instacart": (49_688, 0.99, 0.0),
    "amazon2020": (1_000, 0.9, 0.9),
}


@pytest.mark.shared_data
@pytest.mark.parametrize("name", REAL)
def test_real_catalogs(spark, shared_data, tmp_path, name, monkeypatch):
    monkeypatch.setenv("PRODVEC_DATA", str(shared_data))
    config = load_config([name], [f"workdir={tmp_path}"])
    result = clean.run(spark, config)
    rows = result.rows
    expected_rows, with_category, with_price = REAL[name]
    assert rows["in"] == expected_rows
    assert rows["in"] == rows["clean"] + rows["quarantined"] + rows["exact_duplicates"]
    assert rows["clean"] >= 0.9 * rows["in"]
    products = read_clean(spark, config)
    bad_text = products.filter(
        F.col("title").rlike(r"[^a-z0-9. ]")
        | F.col("title").contains("&")
        | F.col("brand").rlike(r"^\s|\s$")
        | (F.size("category_path") > 3)
        | F.exists("category_path", lambda level: level.endswith("..."))
    )
    assert bad_text.count() == 0
    assert products.filter(F.size("category_path") >= 1).count() >= with_category * rows["clean"]
    assert products.filter(F.col("price").isNotNull()).count() >= with_price * rows["clean"]


# ---- incremental runs ------------------------------------------------------------------------


def _write_rows(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        writer.writerows(rows)
        handle.write(MALFORMED_LINE)  # always normalised: its row key covers the parsed fields


def _published(spark, result) -> tuple[list[dict], list[dict]]:
    """The written clean catalog and quarantine, as sorted plain rows."""

    def plain(row: dict) -> dict:
        return {key: dict(value) if key == "attributes" and value else value
                for key, value in row.items()}  # fmt: skip

    catalog = [plain(r.asDict()) for r in spark.read.parquet(result.outputs["catalog"]).collect()]
    quarantine = [r.asDict() for r in spark.read.parquet(result.outputs["quarantine"]).collect()]
    return (
        sorted(catalog, key=lambda r: r["product_id"]),
        sorted(quarantine, key=lambda r: (r["product_id"] or "", r["reason"], r["source_row"])),
    )


def _two_days(spark, tmp_path: Path):
    """Day 1 cleaned in full, then day 2 (rows changed, added, removed, duplicated, a new id
    conflict and a resolved one) cleaned incrementally and, for reference, in full:
    (catalog path, config, day 2's incremental result, day 2's full result)."""
    base = [case for _, case, _ in CASES] + [
        row(f"p{i}", name=f"Cotton Shirt {i}") for i in range(40)
    ]
    path = tmp_path / "catalog.csv"
    _write_rows(path, base)
    config = catalog_config(path, tmp_path / "work")
    first = clean.run(spark, config)
    assert first.metrics["incremental"] == 0.0
    assert first.rows["carried"] == 0
    assert first.rows["normalised"] == first.rows["in"] - first.rows["exact_duplicates"]

    day2 = [r for r in base if r[0] not in ("p2", "p3")]  # two products gone
    day2 = [r for r in day2 if not (r[0] == "conflict" and r[6] == "12.00")]  # conflict resolved
    day2 = [row("p0", name="Linen Shirt 0") if r[0] == "p0" else r for r in day2]  # changed
    day2 = [row("p1", price="7.50", name="Cotton Shirt 1") if r[0] == "p1" else r for r in day2]
    day2 += [row("p100", name="Wool Scarf"), row("p101", name="Silk Tie")]  # new
    day2 += [row("p4", name="Cotton Shirt 4")]  # an exact duplicate of a carried row
    day2 += [row("p5", name="Cotton Shirt 5", price="99.00")]  # a new conflict with p5
    _write_rows(path, day2)
    second = clean.run(spark, config)
    full = clean.run(
        spark, catalog_config(path, tmp_path / "full", "csv", "clean.incremental=false")
    )
    return path, config, second, full


def test_incremental_run_normalises_only_changed_rows_and_equals_a_full_run(spark, tmp_path):
    """The incremental day 2 writes what a full run writes, and normalises only the rows it
    has not seen (plus the ones it never carries: malformed and id-conflict rows)."""
    _, _, second, full = _two_days(spark, tmp_path)
    assert second.metrics["incremental"] == 1.0 and full.metrics["incremental"] == 0.0
    got, want = _published(spark, second), _published(spark, full)
    assert [r for r in got[1] if r not in want[1]] == [r for r in want[1] if r not in got[1]]
    assert got == want
    for key in ("in", "clean", "quarantined", "exact_duplicates"):
        assert second.rows[key] == full.rows[key], key
    # p0, p1 (changed), p100, p101 (new), p5's new variant, and the rows never carried: the
    # row conflict2 lost (quarantined for the conflict alone), the malformed line and the row
    # without a product_id (CSV reads "" as null). The kept row of `conflict` is carried.
    assert second.rows["normalised"] == 8
    assert second.rows["carried"] == second.rows["in"] - second.rows["exact_duplicates"] - 8
    catalog, quarantine = _published(spark, second)
    ids = {r["product_id"] for r in catalog}
    assert {"p0", "p1", "p100", "p101", "conflict", "p5"} <= ids and not {"p2", "p3"} & ids
    assert next(r for r in catalog if r["product_id"] == "p0")["title"] == "linen shirt 0"
    assert next(r for r in catalog if r["product_id"] == "p5")["price"] == 19.99  # kept first
    assert {r["reason"] for r in quarantine if r["product_id"] == "p5"} == {"duplicate_id_conflict"}


@pytest.mark.slow  # five clean runs
def test_an_unchanged_catalog_normalises_only_uncarried_rows_and_new_rules_all(spark, tmp_path):
    """After day 2, a run over the same catalog normalises only the rows never carried, and
    a run with other rules normalises every row again."""
    path, config, _, full = _two_days(spark, tmp_path)
    third = clean.run(spark, config)
    assert _published(spark, third) == _published(spark, full)
    assert third.rows["normalised"] == 4  # the two conflict losers, no id, the malformed line

    ruled = clean.run(spark, catalog_config(path, tmp_path / "work", "csv", "clean.max_price=50"))
    assert ruled.metrics["incremental"] == 0.0  # new rules: every row normalised again
    assert ruled.rows["normalised"] == ruled.rows["in"] - ruled.rows["exact_duplicates"]
