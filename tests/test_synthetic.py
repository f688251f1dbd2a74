"""The embedded synthetic catalog: deterministic, learnable, and dirty in known, labelled ways."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipelines.core.config import SyntheticConfig
from pipelines.data import synthetic
from pipelines.data.synthetic import (
    ACCENTED_BRANDS,
    COLUMNS,
    DEFECT_KINDS,
    ensure_synthetic_catalog,
    generate_catalog,
    write_catalog,
)

REPO = Path(__file__).resolve().parent.parent
ROWS, SEED, DIRTY = 5000, 7, 0.05


@pytest.fixture(scope="module")
def catalog() -> pd.DataFrame:
    return generate_catalog(ROWS, SEED, DIRTY)


@pytest.fixture(scope="module")
def clean(catalog: pd.DataFrame) -> pd.DataFrame:
    return catalog[catalog["defect"] == ""]


def parse_price(text: str) -> float | None:
    """What a lenient cleaner accepts: "12.99", "$1,299.00", "USD 1299", "1,299"."""
    digits = text.strip().removeprefix("$").removeprefix("USD ").replace(",", "")
    try:
        return float(digits)
    except ValueError:
        return None


def csv_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, lineterminator="\n")
    return buffer.getvalue().encode()


def test_same_arguments_give_the_same_catalog_and_another_seed_another(catalog):
    again = generate_catalog(ROWS, SEED, DIRTY)
    pd.testing.assert_frame_equal(again, catalog)
    assert csv_bytes(again) == csv_bytes(catalog)
    other = generate_catalog(ROWS, SEED + 1, DIRTY)
    assert (other["name"] != catalog["name"]).mean() > 0.9


def test_same_bytes_in_a_fresh_interpreter_with_another_hash_seed():
    script = (
        "import hashlib, io; from pipelines.data.synthetic import generate_catalog; "
        "b = io.StringIO(); generate_catalog(2000, 11, 0.1).to_csv(b, index=False, "
        "lineterminator='\\n'); print(hashlib.sha256(b.getvalue().encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    here = hashlib.sha256(csv_bytes(generate_catalog(2000, 11, 0.1))).hexdigest()
    assert done.stdout.strip() == here


@pytest.mark.parametrize(("rows", "dirty"), [(10, 0.0), (10, 0.5), (997, 0.03), (5000, 0.2)])
def test_exact_row_count_and_all_text_columns(rows, dirty):
    frame = generate_catalog(rows, 3, dirty)
    assert len(frame) == rows
    assert list(frame.columns) == [*COLUMNS, "defect"]
    assert all(isinstance(v, str) for column in frame.columns for v in frame[column])
    assert (frame["defect"] != "").sum() == round(rows * dirty)


def test_clean_catalog_has_unique_skus():
    frame = generate_catalog(3000, 5, 0.0)
    assert (frame["defect"] == "").all()
    assert frame["sku"].is_unique
    assert frame["sku"].str.fullmatch(r"SKU\d{7}").all()


def test_every_defect_kind_present_and_evenly_spread(catalog):
    counts = catalog["defect"].value_counts()
    assert counts.drop("").sum() == round(ROWS * DIRTY)
    per_kind = counts.reindex(DEFECT_KINDS, fill_value=0)
    assert per_kind.min() >= 1 and per_kind.max() - per_kind.min() <= 1, per_kind.to_dict()
    # Besides copies of clean rows, only duplicates and conflicts share a sku.
    copied = catalog["defect"].isin(["exact_duplicate", "id_conflict"]).sum()
    assert catalog["sku"].duplicated().sum() == copied


def rows_of(catalog: pd.DataFrame, kind: str) -> pd.DataFrame:
    rows = catalog[catalog["defect"] == kind]
    assert len(rows) > 0, kind
    return rows


def test_text_defects_look_as_described(catalog):
    entity = re.compile(r"&(#\d+|[a-z]+);")
    assert rows_of(catalog, "html_entity")["name"].map(lambda t: bool(entity.search(t))).all()

    tagged = rows_of(catalog, "html_tags")["description"]
    assert tagged.str.startswith("<p>").all() and tagged.str.endswith("</p><br/>").all()
    assert (tagged.str.len() > len("<p></p><br/>")).all()

    for title in rows_of(catalog, "mojibake")["name"]:
        assert "Â" in title or "â€" in title
        repaired = title.encode("cp1252").decode("utf-8")  # the damage is reversible
        assert "\xa0" in repaired and "Â" not in repaired

    for _, row in rows_of(catalog, "accents").iterrows():
        assert row["brand"] in ACCENTED_BRANDS and row["brand"] in row["name"]
        folded = unicodedata.normalize("NFKD", row["name"]).encode("ascii", "ignore").decode()
        assert folded != row["name"] and folded.isascii()

    brands = rows_of(catalog, "brand_spaces")["brand"]
    assert (brands != brands.str.strip()).all() and (brands.str.strip() != "").all()
    assert (rows_of(catalog, "missing_title")["name"] == "").all()
    assert (rows_of(catalog, "long_title")["name"].str.len() > 600).all()
    assert rows_of(catalog, "invalid_encoding")["name"].str.contains("\ufffd").all()


def test_price_defects_do_not_parse_or_are_negative(catalog):
    bad = rows_of(catalog, "bad_price")["price"]
    assert (bad != "").all() and bad.map(parse_price).isna().all()
    negative = rows_of(catalog, "negative_price")["price"].map(parse_price)
    assert (negative < 0).all()


def test_duplicates_copy_a_row_and_conflicts_change_it(catalog):
    content = [c for c in COLUMNS if c != "sku"]
    for index, row in rows_of(catalog, "exact_duplicate").iterrows():
        twins = catalog[(catalog["sku"] == row["sku"]) & (catalog.index != index)]
        assert len(twins) == 1 and twins.iloc[0]["defect"] == ""
        assert twins.iloc[0][list(COLUMNS)].equals(row[list(COLUMNS)])
    for index, row in rows_of(catalog, "id_conflict").iterrows():
        others = catalog[(catalog["sku"] == row["sku"]) & (catalog.index != index)]
        assert len(others) == 1 and others.iloc[0]["defect"] == ""
        assert not others.iloc[0][content].equals(row[content])
        assert (others.iloc[0]["name"], others.iloc[0]["price"]) != (row["name"], row["price"])


def test_clean_rows_have_titles_and_parseable_prices(clean):
    titles = clean["name"]
    assert (titles != "").all() and titles.map(str.isascii).all()
    assert titles.str.len().max() <= 200
    assert not titles.str.contains(r"&\w+;|<|\ufffd|\s{2}|^\s|\s$|,,|\(\)").any()
    assert (clean["brand"] == clean["brand"].str.strip()).all()
    prices = clean["price"]
    missing = prices == ""
    assert 0 < missing.mean() < 0.05  # a few missing prices, as real exports have
    parsed = prices[~missing].map(parse_price)
    assert parsed.notna().all() and (parsed > 0).all()


def test_price_formats_vary_but_are_mostly_plain(clean):
    prices = clean["price"]
    patterns = {
        "plain": r"\d+\.\d{2}",
        "dollar": r"\$\d{1,3}(,\d{3})*\.\d{2}",
        "usd": r"USD \d+",
        "grouped": r"\d{1,3}(,\d{3})*",
    }
    shares = {name: prices.str.fullmatch(p).mean() for name, p in patterns.items()}
    assert shares["plain"] > 0.6 and all(share > 0.02 for share in shares.values()), shares
    assert prices.str.fullmatch("|".join([*patterns.values(), ""])).all()
    assert prices.str.contains(",").any()  # some prices reach the thousands


def product_types(clean: pd.DataFrame) -> pd.Series:
    """Level 3 of the category path, where the path is not truncated."""
    levels = clean["category"].str.split(" >> ")
    whole = ~clean["category"].str.endswith("...") & (levels.str.len() >= 3)
    return levels[whole].str[2]


def test_price_is_explained_by_product_type(clean):
    kind = product_types(clean)
    price = clean.loc[kind.index, "price"].map(parse_price)
    known = price.notna()
    log_price = np.log(price[known].astype(float))
    means = log_price.groupby(kind[known]).transform("mean")
    explained = 1 - ((log_price - means) ** 2).sum() / ((log_price - log_price.mean()) ** 2).sum()
    assert explained > 0.6, explained
    by_type = price[known].groupby(kind[known]).mean()
    assert by_type.max() / by_type.min() > 20, by_type.sort_values()


def test_attributes_usually_appear_in_the_title(clean):
    def share(column: str) -> float:
        has = clean[clean[column] != ""]
        return np.mean([word in title for word, title in zip(has[column], has["name"])])

    assert 0.75 < share("color") < 0.95
    assert 0.6 < share("material") < 0.95
    assert 0.55 < share("size") < 0.9


def test_brands_belong_to_one_group_and_types_to_one_category(clean):
    group = clean["category"].str.split(" >> ").str[0]
    assert 6 <= group.nunique() <= 8
    assert (group.groupby(clean["brand"]).nunique() == 1).all()
    kind = product_types(clean)
    level2 = clean.loc[kind.index, "category"].str.split(" >> ").str[1]
    assert (level2.groupby(kind).nunique() == 1).all()
    # Co-occurring words co-occur consistently: "Running Shoes" only ever under Footwear.
    running_shoes = clean["name"].str.contains("Running Shoes")
    assert running_shoes.any() and (group[running_shoes] == "Footwear").all()


def test_category_paths_mostly_three_levels_some_with_title_or_truncated(clean):
    path = clean["category"]
    levels = path.str.split(" >> ")
    truncated = path.str.endswith("...")
    with_title = (levels.str.len() == 4) & ~truncated
    assert 0.01 < truncated.mean() < 0.06
    assert 0.05 < with_title.mean() < 0.15
    assert (levels[with_title].str[3] == clean.loc[with_title, "name"]).all()
    assert (levels[~truncated].str.len() >= 3).all()


def test_descriptions_and_bullets_are_sometimes_empty(clean):
    description, bullets = clean["description"], clean["bullets"]
    assert 0.02 < (description == "").mean() < 0.2
    assert 0.02 < (bullets == "").mean() < 0.2
    phrases = bullets[bullets != ""].str.count(r" \| ") + 1
    assert phrases.between(2, 4).all() and set(phrases) == {2, 3, 4}
    sentences = description[description != ""].str.count(r"(?<!Dr)\.( |$)")  # not "Dr. Martens"
    assert sentences.between(1, 3).all() and set(sentences) == {1, 2, 3}


def test_csv_round_trips_through_pandas(catalog, tmp_path):
    frame = catalog.copy()
    frame.loc[0, "name"] = 'The "Classic" Mug, 12 oz'  # quotes and commas must be escaped
    path = tmp_path / "catalog.csv"
    write_catalog(frame, path, "csv")
    back = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(back.columns) == list(COLUMNS)
    pd.testing.assert_frame_equal(back, frame.drop(columns="defect"))
    assert '"The ""Classic"" Mug, 12 oz"' in path.read_text(encoding="utf-8")


def test_json_lines_and_parquet_keep_every_value_as_text(catalog, tmp_path):
    write_catalog(catalog, tmp_path / "c.json", "json", keep_defect=True)
    lines = (tmp_path / "c.json").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == catalog.to_dict("records")

    write_catalog(catalog, tmp_path / "c.parquet", "parquet")
    table = pq.read_table(tmp_path / "c.parquet")
    assert table.column_names == list(COLUMNS)
    assert all(str(field.type) == "string" for field in table.schema)
    pd.testing.assert_frame_equal(table.to_pandas(), catalog.drop(columns="defect"))


def test_bad_arguments_are_refused(tmp_path, catalog):
    with pytest.raises(ValueError, match="rows"):
        generate_catalog(0, 1, 0.0)
    with pytest.raises(ValueError, match="dirty_fraction"):
        generate_catalog(100, 1, 0.6)
    with pytest.raises(ValueError, match="xml"):
        write_catalog(catalog, tmp_path / "c.xml", "xml")


def test_ensure_synthetic_catalog_writes_once_then_reuses(tmp_path, monkeypatch):
    config = SyntheticConfig(rows=300, seed=3, dirty_fraction=0.05)
    directory = tmp_path / "synthetic"
    path = ensure_synthetic_catalog(config, directory)
    assert path == directory / "catalog-300-3-0.05.csv"
    assert [p.name for p in directory.iterdir()] == [path.name]  # no temporary left behind
    written = path.read_bytes()
    header = written.split(b"\n", 1)[0].decode()
    assert header.split(",") == list(COLUMNS)  # no defect column in a "real" catalog
    assert len(pd.read_csv(path, dtype=str, keep_default_na=False)) == 300

    def must_not_regenerate(*args: object) -> pd.DataFrame:
        raise AssertionError("an existing catalog was generated again")

    monkeypatch.setattr(synthetic, "generate_catalog", must_not_regenerate)
    assert ensure_synthetic_catalog(config, directory) == path
    assert path.read_bytes() == written


def test_ensure_synthetic_catalog_leaves_nothing_when_generation_fails(tmp_path, monkeypatch):
    def broken_writer(*args: object, **kwargs: object) -> None:
        Path(args[1]).write_text("half a catalog")
        raise OSError("disk full")

    monkeypatch.setattr(synthetic, "write_catalog", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        ensure_synthetic_catalog(SyntheticConfig(rows=50), tmp_path)
    assert list(tmp_path.iterdir()) == []
