"""Benchmark: the clean stage against plain pandas doing the same rules, in the same run.

The question a user asks is "how fast does `prodvec clean` turn a raw CSV export into the
canonical catalog, compared with what I would write myself in pandas?". So one run:

1. generates the synthetic catalog (1M rows, 3 % dirty, fixed seed) once and writes it as
   CSV under work/bench-clean/ (not timed; reused when already there);
2. starts a local[*] Spark session (not timed: start-up is once per process, not part of
   the stage), then times `pipelines.stages.clean.run` end to end as a user runs it: reading the
   CSV, every rule, and writing the clean catalog and the quarantine as Parquet;
3. times `pandas_clean` below, the same rules written as a competent pandas user would:
   `read_csv(dtype=str)`, vectorised `.str` methods with the very regexes of
   `pipelines.data.text`, `pipelines.data.text.fold_string` for the Unicode repair on the rows that
   need it (as the stage does), `duplicated` for exact duplicates, one pass over the
   product ids for id conflicts, the quarantine reasons in the same priority order,
   hashlib sha256 for the content hash (over the same JSON the stage hashes), and pyarrow
   to write both Parquet outputs. It computes only what it writes (messages and source
   rows for quarantined rows only, content hashes for clean rows only), which the stage
   does not: that favours pandas;
4. checks that both agree (row counts per outcome and reason, and the written clean
   catalogs column by column) and prints rows/s for each, wall clock, plus the CPU seconds
   of each side (this process and its children: the JVM and its Python workers), which
   say more than wall clock when the machine is shared, and the ratio of rows per
   CPU-second (`CPU ratio`);
5. the incremental case: the same catalog with a share of rows changed (2 %, every 50th
   row's title; not timed), cleaned incrementally after the full run above, against a full
   run on the changed catalog in a fresh workdir; both must write the same clean catalog.

The timed full run sets `clean.incremental=false`, so a previous bench's outputs in the
workdir are not reused.

Malformed CSV records: the synthetic catalog has none; pandas' C parser flags rows with too
few fields (as the stage does) but raises on rows with too many, where Spark quarantines.

The last line is `RESULT clean ratio=<stage rows/s / pandas rows/s>` (wall clock), higher
is better.

    .venv/bin/python bench/clean.py [--rows 1000000] [--changed 0.02] [--fresh]
"""

from __future__ import annotations

import argparse
import csv as csv_module
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import SparkSession

from pipelines.core.config import Config, load_config
from pipelines.core.outputs import StageResult
from pipelines.core.spark import get_spark
from pipelines.data import text
from pipelines.data.catalog import CLEAN_SCHEMA, quarantine_counts
from pipelines.data.synthetic import generate_catalog, write_catalog
from pipelines.stages import clean

WORKDIR = Path("work/bench-clean")
SEED, DIRTY_FRACTION = 7, 0.03


# ---------------------------------------------------------------------------
# The rules of pipelines.data.text, as Python regexes (the stage's Java ones, translated)
# ---------------------------------------------------------------------------


def _python_regex(java: str) -> re.Pattern[str]:
    """The stage's Java pattern in Python: `\\x{HHHH}` -> `\\UHHHHHHHH`; re.ASCII because
    Java's `\\s` and `(?i)` are ASCII-only, as Spark runs them."""
    python = re.sub(r"\\x\{([0-9A-Fa-f]+)\}", lambda m: f"\\U{int(m[1], 16):08X}", java)
    return re.compile(python, re.ASCII)


NEEDS_PYTHON = _python_regex(text._NEEDS_PYTHON)
SPACE_RUN = _python_regex(text._SPACE_RUN)
DELETE_IN_WORD = _python_regex(text._DELETE_IN_WORD)
NOT_TOKEN_RUN = _python_regex(text._NOT_TOKEN_RUN)
INVALID_ENCODING = _python_regex(text._INVALID_ENCODING)
CONTROL = clean.CONTROL_CHARACTERS  # the same pattern in Python's re
PATH_WRAPPER = _python_regex(text._PATH_WRAPPER)
PRICE = _python_regex(text._PRICE)
DECIMAL_COMMA = _python_regex(text._DECIMAL_COMMA)
BLANK = _python_regex(text._BLANK)
CURRENCIES = [(code, _python_regex(pattern)) for code, pattern in text._CURRENCY_PATTERNS]

CLEAN_ARROW = pa.schema(
    [
        pa.field("product_id", pa.string(), False),
        pa.field("title", pa.string(), False),
        pa.field("title_raw", pa.string(), False),
        pa.field("description", pa.string()),
        pa.field("bullets", pa.list_(pa.string())),
        pa.field("brand", pa.string()),
        pa.field("keywords", pa.list_(pa.string())),
        pa.field("category_path", pa.list_(pa.string())),
        pa.field("price", pa.float64()),
        pa.field("currency", pa.string()),
        pa.field("product_group", pa.string(), False),
        pa.field("locale", pa.string(), False),
        pa.field("attributes", pa.map_(pa.string(), pa.string())),
        pa.field("image_features", pa.list_(pa.float32())),
        pa.field("content_hash", pa.string(), False),
        pa.field("source", pa.string(), False),
    ]
)
assert CLEAN_ARROW.names == CLEAN_SCHEMA.names


def fold_text(values: pd.Series) -> pd.Series:
    """text.fold_text: Python repair only where needed, then tags/controls/space runs -> ' '."""
    needs = values.str.contains(NEEDS_PYTHON, na=False).to_numpy()
    if needs.any():
        array = values.to_numpy(copy=True)
        array[needs] = [text.fold_string(value) for value in array[needs]]
        values = pd.Series(array, index=values.index)
    return values.str.replace(SPACE_RUN, " ", regex=True).str.strip(" ")


def normalize_folded(values: pd.Series) -> pd.Series:
    """text._normalize_folded: lower, drop apostrophes and thousands commas, keep [a-z0-9.]."""
    values = values.str.lower().str.replace(DELETE_IN_WORD, "", regex=True)
    return values.str.replace(NOT_TOKEN_RUN, " ", regex=True).str.strip(" ")


def normalize_text(values: pd.Series) -> pd.Series:
    return normalize_folded(fold_text(values))


class Lists:
    """A list column held flat: `values[offsets[r]:offsets[r + 1]]` is row r's list; rows
    where `valid` is False are null. Built with numpy, written with pyarrow."""

    def __init__(self, rows: np.ndarray, values: pd.Series, valid: np.ndarray) -> None:
        self.rows, self.values, self.valid = rows, values.reset_index(drop=True), valid
        self.counts = np.bincount(rows, minlength=len(valid))
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])

    def where(self, keep: np.ndarray) -> Lists:
        return Lists(self.rows[keep], self.values[keep], self.valid)

    def first(self) -> pd.Series:
        """try_element_at(list, 1): the first item, NaN for null or empty lists."""
        has = self.counts > 0
        first = np.full(len(self.valid), np.nan, dtype=object)
        first[has] = self.values.to_numpy()[self.offsets[:-1][has]]
        return pd.Series(first)

    def to_arrow(self, rows: np.ndarray) -> pa.Array:
        """The list<string> column for `rows` (a selection of row numbers)."""
        counts = self.counts[rows]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        starts = np.repeat(self.offsets[:-1][rows], counts)
        within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], counts)
        values = pa.array(self.values.to_numpy()[starts + within], type=pa.string())
        return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~self.valid[rows]))

    def json(self, rows: np.ndarray) -> list[str | None]:
        """Each list as Spark's to_json writes it (items are [a-z0-9. ] only: no escaping)."""
        quoted = ('"' + self.values + '"').tolist()
        offsets, valid = self.offsets, self.valid
        return [
            "[" + ",".join(quoted[offsets[r] : offsets[r + 1]]) + "]" if valid[r] else None
            for r in rows
        ]


def split_folded(values: pd.Series, separator: str) -> tuple[np.ndarray, pd.Series]:
    """text._split_folded: split on the raw separator, fold the pieces. A piece without
    non-ASCII or '&' is returned as is by `fold_string`, so testing each piece for "needs
    Python" gives what testing the whole row gives. Returns (row number, piece)."""
    pieces = values.dropna().str.split(separator, regex=False).explode()
    rows = pieces.index.to_numpy()
    return rows, fold_text(pd.Series(pieces.to_numpy(), dtype=object))


def split_list(values: pd.Series, separator: str) -> Lists:
    """text.split_list: normalised, non-empty items."""
    rows, pieces = split_folded(values, separator)
    items = normalize_folded(pieces)
    keep = (items != "").to_numpy()
    return Lists(rows[keep], items[keep], values.notna().to_numpy())


def split_path(values: pd.Series, separator: str, title: pd.Series, max_levels: int) -> Lists:
    """text.split_path: folded levels, empty and truncated ones dropped, a leaf that repeats
    the (normalised) title dropped, at most `max_levels`."""
    values = values.str.replace(PATH_WRAPPER, r"\1", regex=True)
    rows, levels = split_folded(values, separator)
    keep = ((levels != "") & ~levels.str.endswith("...")).to_numpy()
    path = Lists(rows[keep], levels[keep], values.notna().to_numpy())
    has = np.flatnonzero(path.counts > 0)
    leaves = normalize_folded(pd.Series(path.values.to_numpy()[path.offsets[has + 1] - 1]))
    names = title.to_numpy()[has]
    leaf_is_title = np.array(
        [
            isinstance(name, str) and leaf != "" and name != ""
            and (name.startswith(leaf) or leaf.startswith(name))
            for leaf, name in zip(leaves.tolist(), names, strict=True)
        ],
        dtype=bool,
    )  # fmt: skip
    take = path.counts.copy()
    take[has] -= leaf_is_title
    take = np.minimum(take, max_levels)
    position = np.arange(len(path.rows)) - path.offsets[path.rows]
    return path.where(position < take[path.rows])


def parse_price(values: pd.Series, default_currency: str) -> pd.DataFrame:
    """text.parse_price: amount, currency, error ("unparsable_price", "negative_price")."""
    blank = values.str.contains(BLANK, na=True).to_numpy(dtype=bool)
    parts = values.str.extract(PRICE).fillna("")
    negative = (parts[0] != "").to_numpy()
    number = parts[1]
    decimal = number.str.contains(DECIMAL_COMMA).to_numpy()
    plain = np.where(
        decimal, number.str.replace(",", ".", regex=False), number.str.replace(",", "", regex=False)
    )
    magnitude = pd.to_numeric(pd.Series(plain).where(number != "")).to_numpy(dtype=float)
    amount = np.where(negative, -magnitude, magnitude)
    parsed = ~np.isnan(magnitude)
    currency = np.full(len(values), None, dtype=object)
    unset = parsed.copy()
    for code, pattern in CURRENCIES:  # first match wins
        hit = unset & values.str.contains(pattern, na=False).to_numpy()
        currency[hit], unset = code, unset & ~hit
    currency[unset] = default_currency
    error = np.full(len(values), None, dtype=object)
    error[~blank & negative] = "negative_price"
    error[~blank & ~parsed] = "unparsable_price"
    return pd.DataFrame({"amount": amount, "currency": currency, "error": error})


def java_double(value: float) -> str:
    """CAST(double AS STRING) as Spark writes it (for quarantine messages)."""
    if value == 0 or 1e-3 <= abs(value) < 1e7:
        return repr(value)
    scientific = np.format_float_scientific(value, unique=True, trim="0", exp_digits=1)
    return scientific.replace("e+", "E").replace("e", "E")


# The quarantine messages that carry no value (the stage's own texts).
MESSAGES = {
    "malformed_record": "the reader could not parse this record (wrong field count or quoting)",
    "missing_product_id": "product_id is null or empty",
    "invalid_encoding": "text holds U+FFFD or control characters (bytes were not valid UTF-8)",
    "missing_title": "title is null, empty, or has no letters or digits",
    "unparsable_price": "price has no number in it",
    "bad_image_features": "image_features has values that are not numbers",
    "invalid_product_id": "product_id holds control characters",
    "duplicate_id_conflict": (
        "product_id appears on rows with different content; the most complete row was kept"
    ),
}


def pandas_clean(csv: Path, out: Path, config: Config) -> dict[str, int]:
    """The clean stage's rules on `csv` in plain pandas; writes out/catalog.parquet and
    out/quarantine.parquet; returns the same row counts `clean.run` returns, plus reasons."""
    catalog, rules, columns = config.catalog, config.clean, config.catalog.columns
    assert not (columns.currency or columns.product_group or columns.image_features)
    assert isinstance(columns.category_path, str) and columns.product_id
    sources = list(dict.fromkeys(clean.mapped_columns(catalog)))

    raw = pd.read_csv(csv, dtype=str, keep_default_na=False)
    # The C parser raises on rows with too many fields; too few leave NaN at the end.
    malformed = raw.iloc[:, -1].isna().to_numpy()
    raw = raw.mask(raw == "")  # Spark's CSV reader reads empty fields as null
    n = len(raw)

    title_raw = raw[columns.title]
    product_id = raw[columns.product_id].str.strip(" ")
    title = normalize_text(title_raw).str.slice(0, rules.max_title_chars).str.rstrip(" ")
    description = normalize_text(raw[columns.description]).str.slice(0, rules.max_description_chars)
    bullets = split_list(raw[columns.bullets], catalog.bullet_separator)
    brand = normalize_text(raw[columns.brand])
    brand = brand.mask(brand == "")
    path = split_path(
        raw[columns.category_path], catalog.category_separator, title, rules.max_category_levels
    )
    price = parse_price(raw[columns.price], catalog.currency)
    group = normalize_text(path.first()).str.replace(" ", "_", regex=False)
    group = group.mask(group == "").fillna("unknown")
    locale = raw[columns.locale].str.strip(" ").fillna(catalog.locale)
    names = list(catalog.attributes)
    attribute_values = np.column_stack(
        [normalize_text(raw[source]).to_numpy() for source in catalog.attributes.values()]
    )
    present = pd.notna(attribute_values) & (attribute_values != "")

    # Exact duplicates: the same mapped source fields (the stage hashes them, sha256 of the
    # JSON). Every first occurrence is a distinct row, so an id has different contents
    # exactly when it has more than one first occurrence (= groupby(id) nunique > 1).
    duplicate = raw.duplicated(subset=sources, keep="first").to_numpy()
    firsts = product_id[~duplicate & product_id.notna().to_numpy()]
    conflict = np.zeros(n, dtype=bool)
    conflict[firsts.index.to_numpy()] = firsts.duplicated(keep=False).to_numpy()
    # Of an id's different rows the stage keeps the most complete, then the first by its
    # fields' text (one source file here).
    ranked = raw.loc[conflict, sources].assign(
        _id=product_id[conflict], _filled=-raw.loc[conflict, sources].notna().sum(axis=1)
    )
    ranked = ranked.sort_values(["_id", "_filled", *sources], na_position="first", kind="stable")
    conflict[ranked.drop_duplicates("_id").index.to_numpy()] = False

    encoding_bad = np.zeros(n, dtype=bool)
    for source in (columns.title, columns.description, columns.brand):
        encoding_bad |= raw[source].str.contains(INVALID_ENCODING, na=False).to_numpy()
    amount, error = price["amount"].to_numpy(), price["error"].to_numpy()
    checks = {  # clean.REASONS, in priority order
        "malformed_record": malformed,
        "missing_product_id": (product_id.isna() | (product_id == "")).to_numpy(),
        "invalid_product_id": product_id.str.contains(CONTROL, na=False).to_numpy(),
        "invalid_encoding": encoding_bad,
        "missing_title": (title_raw.isna() | (title == "")).to_numpy(),
        "unparsable_price": error == "unparsable_price",
        "negative_price": error == "negative_price",
        "price_out_of_range": amount > rules.max_price,
        "bad_image_features": np.zeros(n, dtype=bool),
        "duplicate_id_conflict": ~duplicate & conflict,
    }
    assert tuple(checks) == clean.REASONS
    first_reason = np.select(list(checks.values()), range(len(checks)), default=-1)
    first_reason[duplicate] = -1
    kept = np.flatnonzero(~duplicate & (first_reason < 0))
    held = np.flatnonzero(first_reason >= 0)

    # The clean catalog; content_hash = sha256 of the JSON the stage hashes.
    content = ('{"title":"' + title.iloc[kept] + '"').to_numpy(dtype=object)
    content += (',"description":"' + description.iloc[kept] + '"').fillna("").to_numpy()
    content += np.array(
        ["" if item is None else ',"bullets":' + item for item in bullets.json(kept)], dtype=object
    )
    content += (',"brand":"' + brand.iloc[kept] + '"').fillna("").to_numpy()
    content += (',"product_group":"' + group.iloc[kept] + '"}').to_numpy()
    hashes = [hashlib.sha256(item.encode()).hexdigest() for item in content]
    keys = np.tile(np.array(names, dtype=object), len(kept))
    chosen = present[kept]
    counts = chosen.sum(axis=1)
    attributes = pa.MapArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)),
        pa.array(keys[chosen.ravel()], type=pa.string()),
        pa.array(attribute_values[kept][chosen], type=pa.string()),
    )
    amount_kept = amount[kept]

    def strings(values: pd.Series | np.ndarray) -> pa.Array:
        array = values.to_numpy() if isinstance(values, pd.Series) else values
        return pa.array(array, type=pa.string(), from_pandas=True)

    table = pa.table(
        [
            strings(product_id.iloc[kept]),
            strings(title.iloc[kept]),
            strings(title_raw.iloc[kept]),
            strings(description.iloc[kept]),
            bullets.to_arrow(kept),
            strings(brand.iloc[kept]),
            pa.nulls(len(kept), pa.list_(pa.string())),  # the synthetic catalog has no keywords
            path.to_arrow(kept),
            pa.array(amount_kept, type=pa.float64(), mask=np.isnan(amount_kept)),
            strings(price["currency"].to_numpy()[kept]),
            strings(group.iloc[kept]),
            strings(locale.iloc[kept]),
            attributes,
            pa.nulls(len(kept), pa.list_(pa.float32())),
            pa.array(hashes, type=pa.string()),
            pa.array([catalog.name] * len(kept), type=pa.string()),
        ],
        schema=CLEAN_ARROW,
    )
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "catalog.parquet")

    # The quarantine: reason, message and the source row as JSON, for the held rows only.
    reasons = np.array(clean.REASONS, dtype=object)[first_reason[held]]
    messages = []
    for reason, row in zip(reasons, held, strict=True):
        if reason == "negative_price":
            messages.append(f"price {java_double(amount[row])} is negative")
        elif reason == "price_out_of_range":
            value = java_double(amount[row])
            messages.append(f"price {value} is above max_price {rules.max_price:g}")
        else:
            messages.append(MESSAGES[reason])
    source_rows = [
        json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        for record in raw[sources].iloc[held].astype(object).where(lambda f: f.notna(), None)
        .to_dict("records")
    ]  # fmt: skip
    quarantine = pa.table(
        {
            "product_id": strings(product_id.iloc[held]),
            "reason": pa.array(reasons, type=pa.string()),
            "message": pa.array(messages, type=pa.string()),
            "source_row": pa.array(source_rows, type=pa.string()),
            "source_file": pa.array([csv.resolve().as_uri()] * len(held), type=pa.string()),
            "source": pa.array([catalog.name] * len(held), type=pa.string()),
        }
    )
    pq.write_table(quarantine, out / "quarantine.parquet")

    result = {"in": n, "clean": len(kept), "exact_duplicates": int(duplicate.sum())}
    result["quarantined"] = len(held)
    if result["in"] != result["clean"] + result["quarantined"] + result["exact_duplicates"]:
        raise RuntimeError(f"pandas clean lost rows: {result}")
    result.update(pd.Series(reasons).value_counts().to_dict())
    return result


# ---------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------


def ensure_catalog(rows: int, fresh: bool) -> Path:
    """The synthetic catalog as CSV, generated once (not timed)."""
    path = WORKDIR / "raw" / f"catalog-{rows}-{SEED}-{DIRTY_FRACTION}.csv"
    if path.exists() and not fresh:
        print(f"reusing {path}")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    partial = path.with_name(f".{path.name}.tmp")
    write_catalog(generate_catalog(rows, SEED, DIRTY_FRACTION), partial, "csv")
    os.replace(partial, path)
    print(f"generated {path} in {time.perf_counter() - started:.1f} s (not timed)")
    return path


def changed_catalog(path: Path, share: float) -> Path:
    """A copy of the catalog with every (1/share)-th row's title changed (not timed)."""
    changed = path.with_name(f"{path.stem}-changed-{share}.csv")
    if changed.exists():
        return changed
    every = max(1, round(1 / share))
    partial = changed.with_name(f".{changed.name}.tmp")
    with (
        path.open(newline="", encoding="utf-8") as source,
        partial.open("w", newline="", encoding="utf-8") as target,
    ):
        reader, writer = csv_module.reader(source), csv_module.writer(target, lineterminator="\n")
        header = next(reader)
        writer.writerow(header)
        title = header.index("name")
        for number, record in enumerate(reader):
            if number % every == 0 and len(record) > title:
                record[title] += " Edition 2"
            writer.writerow(record)
    os.replace(partial, changed)
    return changed


def timed_clean(spark: SparkSession, config: Config) -> tuple[StageResult, float, float]:
    """`clean.run`, with its wall-clock and CPU seconds."""
    started, cpu = time.perf_counter(), cpu_seconds()
    result = clean.run(spark, config)
    return result, time.perf_counter() - started, cpu_seconds() - cpu


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and all its descendants, the Spark JVM and
    its Python workers included, read from /proc (NaN where there is no /proc)."""
    if not Path("/proc/self/stat").exists():
        return float("nan")
    usage: dict[int, int] = {}
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3 of proc(5)
        pid = int(entry.name)
        children[int(fields[1])].append(pid)
        usage[pid] = sum(int(ticks) for ticks in fields[11:15])  # utime stime cutime cstime
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += usage.get(pid, 0)
        todo += children.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


def compare_catalogs(spark_dir: Path, pandas_file: Path) -> list[str]:
    """Column-by-column comparison of the two clean catalogs (sorted by product_id, which
    is unique in a clean catalog); returns the columns that differ, with how many rows."""
    ours = pq.read_table(spark_dir).sort_by("product_id")
    theirs = pq.read_table(pandas_file).sort_by("product_id")
    if len(ours) != len(theirs):
        return [f"row count {len(ours)} vs {len(theirs)}"]
    differ = []
    for name in CLEAN_ARROW.names:
        a, b = ours[name].combine_chunks(), theirs[name].combine_chunks()
        if a.type == b.type and a.equals(b):
            continue
        left, right = a.to_pylist(), b.to_pylist()
        if name == "attributes":  # a map reads back as a list of (key, value) pairs
            left = [None if m is None else dict(m) for m in left]
            right = [None if m is None else dict(m) for m in right]
        mismatches = sum(x != y for x, y in zip(left, right, strict=True))
        if mismatches:
            differ.append(f"{name}: {mismatches} rows")
    return differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="synthetic products")
    parser.add_argument("--fresh", action="store_true", help="regenerate the catalog CSV")
    parser.add_argument(
        "--changed", type=float, default=0.02, help="share of rows changed for the incremental case"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    csv = ensure_catalog(args.rows, args.fresh)
    overrides = [f"workdir={WORKDIR}", "catalog.synthetic=null", f"catalog.path={csv.resolve()}"]
    config = load_config(["local"], [*overrides, "clean.incremental=false"])
    spark = get_spark(config.spark)  # session start-up: not part of the stage, not timed
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start; "
        f"Spark {spark.version} {spark.sparkContext.master} "
        f"(parallelism {spark.sparkContext.defaultParallelism}), pandas {pd.__version__}, "
        f"pyarrow {pa.__version__}"
    )

    result, stage_seconds, stage_cpu = timed_clean(spark, config)
    ours = result.rows
    print(f"clean stage: {stage_seconds:.1f} s, {ours}")
    reasons = quarantine_counts(spark, config)
    full_catalog = WORKDIR / "full-catalog"  # kept for the comparison below
    shutil.rmtree(full_catalog, ignore_errors=True)
    shutil.copytree(result.outputs["catalog"], full_catalog)

    # The incremental case: 2 % of the rows changed, cleaned after the full run above, against
    # a full run of the changed catalog in a workdir of its own.
    changed = changed_catalog(csv, args.changed)
    incremental, incremental_seconds, incremental_cpu = timed_clean(
        spark, load_config(["local"], [*overrides[:2], f"catalog.path={changed.resolve()}"])
    )
    refreshed = load_config(
        ["local"],
        [f"workdir={WORKDIR / 'changed'}", *overrides[1:2], f"catalog.path={changed.resolve()}",
         "clean.incremental=false"],
    )  # fmt: skip
    rerun, rerun_seconds, rerun_cpu = timed_clean(spark, refreshed)
    spark.stop()
    same = compare_catalogs(Path(incremental.outputs["catalog"]), Path(rerun.outputs["catalog"]))
    print(
        f"incremental ({args.changed:.0%} of rows changed): {incremental_seconds:.1f} s, "
        f"{incremental_cpu:.1f} CPU s, {incremental.rows}; full run of the same catalog: "
        f"{rerun_seconds:.1f} s, {rerun_cpu:.1f} CPU s; clean catalogs: "
        + ("identical, every column" if not same else "; ".join(same))
    )

    pandas_out = WORKDIR / "pandas"
    shutil.rmtree(pandas_out, ignore_errors=True)
    text.fold_string.cache_clear()  # no head start from anything run in this process
    started, cpu = time.perf_counter(), cpu_seconds()
    theirs = pandas_clean(csv, pandas_out, config)
    pandas_seconds, pandas_cpu = time.perf_counter() - started, cpu_seconds() - cpu
    print(f"pandas: {pandas_seconds:.1f} s, {theirs}")
    load = os.getloadavg()

    # Agreement (not timed): outcome counts, reasons, and the written clean catalogs.
    for key in ("in", "clean", "quarantined", "exact_duplicates"):
        print(f"  {key:<22} stage {ours[key]:>9,}  pandas {theirs[key]:>9,}")
    for reason in clean.REASONS:
        if reasons.get(reason, 0) or theirs.get(reason, 0):
            print(f"  {reason:<22} stage {reasons.get(reason, 0):>9,}  "
                  f"pandas {theirs.get(reason, 0):>9,}")  # fmt: skip
    differ = compare_catalogs(full_catalog, pandas_out / "catalog.parquet")
    print("clean catalogs: " + ("identical, every column" if not differ else "; ".join(differ)))
    if any(ours[key] != theirs[key] for key in ("in", "clean", "quarantined", "exact_duplicates")):
        print("WARNING: the two sides disagree on the counts above")

    rows = ours["in"]
    ours_rate, pandas_rate = rows / stage_seconds, rows / pandas_seconds
    print()
    print(f"{'':<22}{'rows':>10}{'seconds':>10}{'rows/s':>10}{'CPU s':>10}{'rows/CPU s':>12}")
    for name, count, seconds, cpu in (
        ("clean stage (full)", rows, stage_seconds, stage_cpu),
        ("pandas", theirs["in"], pandas_seconds, pandas_cpu),
        ("clean, incremental", incremental.rows["in"], incremental_seconds, incremental_cpu),
        ("clean, full (changed)", rerun.rows["in"], rerun_seconds, rerun_cpu),
    ):
        print(f"{name:<22}{count:>10,}{seconds:>10.1f}{count / seconds:>10,.0f}{cpu:>10.1f}"
              f"{count / cpu:>12,.0f}")  # fmt: skip
    print(f"{os.cpu_count()} cores; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          "after the timed runs; Spark session start-up not included")  # fmt: skip
    print(
        f"incremental / full seconds: {incremental_seconds / rerun_seconds:.2f} "
        f"(CPU {incremental_cpu / rerun_cpu:.2f}); normalised {incremental.rows['normalised']:,} "
        f"of {incremental.rows['in']:,} rows"
    )
    print(f"CPU ratio={(rows / stage_cpu) / (theirs['in'] / pandas_cpu):.2f} (rows per CPU-second)")
    print(f"RESULT clean ratio={ours_rate / pandas_rate:.2f}")


if __name__ == "__main__":
    main()
