"""Clean stage: any catalog (CSV, JSON lines, Parquet) -> one canonical Parquet catalog
plus a quarantine table, with nothing lost on the way.

Every input row ends in exactly one place: the clean catalog, the quarantine (with
a reason code and a message), or the count of exact duplicates. The stage checks
rows in = clean + quarantined + duplicates and fails loudly if it ever does not hold.
All per-row work is Spark SQL built-ins except the Unicode repair inside
`pipelines.data.text`, which only sees the fields that need it.

A run keeps, beside its outputs, a hash of each source row and what it made of the row
(`Outputs.row_hashes`). With `clean.incremental` (the default) the next run normalises only
rows whose hash is new, carries the others from the previous clean catalog, and drops the
vanished ones; duplicates and id conflicts are decided again over all rows, so the outputs
equal a full run's. New rules (settings or code) or a catalog written by anything else make
it a full run.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import sys
import uuid
from pathlib import Path

import mlflow
from py4j.protocol import Py4JJavaError
from pyspark import StorageLevel
from pyspark.errors import PySparkException
from pyspark.sql import Column, DataFrame, Observation, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.core import faults
from pipelines.core.config import CatalogConfig, Config, Lookup
from pipelines.core.errors import CatalogError
from pipelines.core.outputs import StageResult, publish_folder
from pipelines.data import catalog as catalog_module
from pipelines.data import text
from pipelines.data.catalog import (
    CLEAN_SCHEMA,
    TEXT_LISTS,
    clean_files_stamp,
    content_hash,
    read_clean,
    seal_catalog,
)
from pipelines.data.synthetic import ensure_synthetic_catalog

__all__ = [
    "CONTROL_CHARACTERS",
    "CORRUPT",
    "QUARANTINE_SCHEMA",
    "REASONS",
    "check_columns",
    "mapped_columns",
    "read_catalog",
    "run",
    "transform",
]

log = logging.getLogger(__name__)

CORRUPT = "_corrupt_record"
CONTROL_CHARACTERS = "[\\x00-\\x1f\\x7f-\\x9f]"  # Unicode Cc: NUL, tabs, escapes... in ids
QUARANTINE_SCHEMA = T.StructType(
    [
        T.StructField("product_id", T.StringType(), True),
        T.StructField("reason", T.StringType(), False),
        T.StructField("message", T.StringType(), False),
        T.StructField("source_row", T.StringType(), False),
        T.StructField("source_file", T.StringType(), True),
        T.StructField("source", T.StringType(), False),
    ]
)

# Quarantine reasons in priority order: a row carries the first that applies.
REASONS = (
    "malformed_record",
    "missing_product_id",
    "invalid_product_id",
    "invalid_encoding",
    "missing_title",
    "unparsable_price",
    "negative_price",
    "price_out_of_range",
    "bad_image_features",
    "duplicate_id_conflict",
)

_READER_DEFAULTS = {
    # multiLine stays off unless a catalog needs it: Spark's multi-line parser folds the
    # record after a malformed one into the malformed one's text.
    "csv": {
        "header": "true",
        "multiLine": "false",
        "escape": '"',
        "mode": "PERMISSIVE",
        "encoding": "UTF-8",
        "columnNameOfCorruptRecord": CORRUPT,
    },
    "json": {
        "primitivesAsString": "true",
        "mode": "PERMISSIVE",
        "columnNameOfCorruptRecord": CORRUPT,
    },
    "parquet": {},
}
_SCALAR_TYPES = (T.StringType, T.NumericType, T.BooleanType, T.DateType, T.TimestampType)


def _read(spark: SparkSession, fmt: str, path: str, options: dict[str, str]) -> DataFrame:
    """Read one file or folder; CSV is read all-string with a corrupt-record column."""
    if not Path(path).exists() and "://" not in path:
        raise CatalogError(f"catalog file {path} does not exist")
    reader = spark.read.options(**{**_READER_DEFAULTS[fmt], **options})
    try:  # every reader looks at the files here (header, schema inference, footers)
        if fmt == "csv":
            header = spark.read.options(**{**_READER_DEFAULTS[fmt], **options}).csv(path).columns
            fields = [T.StructField(name, T.StringType()) for name in header if name != CORRUPT]
            return reader.schema(
                T.StructType([*fields, T.StructField(CORRUPT, T.StringType())])
            ).csv(path)
        if fmt == "json":
            return reader.json(path)
        return reader.parquet(path)
    except (PySparkException, Py4JJavaError) as err:
        reason = str(err).strip().splitlines()[0][:300]
        raise CatalogError(f"catalog file {path} cannot be read as {fmt}: {reason}") from None


def _join_lookups(spark: SparkSession, frame: DataFrame, lookups: list[Lookup]) -> DataFrame:
    """Left-join small dimension tables; a non-unique key would multiply rows, so refuse it."""
    for lookup in lookups:
        table = _read(spark, lookup.format, lookup.path, {}).drop(CORRUPT)
        if lookup.key not in table.columns or lookup.key not in frame.columns:
            raise CatalogError(f"lookup {lookup.path}: key column '{lookup.key}' missing")
        duplicated = table.groupBy(lookup.key).count().filter("count > 1").limit(1).collect()
        if duplicated:
            raise CatalogError(
                f"lookup {lookup.path}: key '{lookup.key}' is not unique "
                f"(value {duplicated[0][lookup.key]!r} repeats)"
            )
        frame = frame.join(F.broadcast(table), on=lookup.key, how="left")
    return frame


def read_catalog(spark: SparkSession, config: Config) -> DataFrame:
    """The source rows as read, plus lookups, the corrupt-record text and the source file."""
    catalog = config.catalog
    if catalog.synthetic is not None:
        path = str(ensure_synthetic_catalog(catalog.synthetic, config.outputs.raw_catalog))
    else:
        path = str(catalog.path)
    frame = _read(spark, catalog.format, path, catalog.options)
    if CORRUPT not in frame.columns:
        frame = frame.withColumn(CORRUPT, F.lit(None).cast("string"))
    frame = frame.withColumn("_source_file", F.col("_metadata.file_path"))
    return _join_lookups(spark, frame, catalog.lookups)


def mapped_columns(catalog: CatalogConfig) -> dict[str, str]:
    """Source column -> the canonical field (or attribute) it feeds, for error messages."""
    used: dict[str, str] = {}
    for field, source in catalog.columns.model_dump().items():
        for name in [source] if isinstance(source, str) else source or []:
            used[name] = field
    for attribute, source in catalog.attributes.items():
        used[source] = f"attributes.{attribute}"
    return used


def check_columns(frame: DataFrame, catalog: CatalogConfig) -> None:
    """Fail before any work if a mapped column is missing or has an unusable type."""
    types = {field.name: field.dataType for field in frame.schema.fields}
    for source, feeds in mapped_columns(catalog).items():
        if source not in types:
            known = [name for name in frame.columns if not name.startswith("_")]
            raise CatalogError(
                f"catalog '{catalog.name}': column '{source}' (mapped to {feeds}) not found; "
                f"columns are {known}"
            )
        data_type = types[source]
        scalar = isinstance(data_type, _SCALAR_TYPES)
        list_ok = feeds in _LIST_FIELDS and isinstance(data_type, T.ArrayType)
        if not (scalar or list_ok):
            raise CatalogError(
                f"catalog '{catalog.name}': column '{source}' (mapped to {feeds}) has type "
                f"{data_type.simpleString()}, expected a scalar"
                + (" or an array" if feeds in _LIST_FIELDS else "")
            )


_LIST_FIELDS = {*TEXT_LISTS, "image_features"}  # may come from an array column
_RAW = "_raw:"  # prefix of the mapped source fields, as read
_TODO = "_todo"  # whether this run normalises the row (not a carried row or a duplicate)
_KEY = ("_h1", "_h2")
_PREV = "_prev_"  # prefix of the previous run's columns in an incremental run
_CONFLICT_MESSAGE = (
    "product_id appears on rows with different content; the most complete row was kept"
)
_RULES_FILE = "_rules.json"  # beside the row hashes: which rules and which catalog they match
_RULE_MODULES = (text, sys.modules[__name__], catalog_module)


def _value(source: str) -> Column:
    """A mapped source field as read, null on rows this run does not normalise: every rule
    then short-cuts on null for them."""
    return F.when(F.col(_TODO), F.col(f"`{_RAW}{source}`"))


def _field(source: str | None) -> Column:
    """A mapped source field as a string (null when unmapped or not normalised)."""
    if source is None:
        return F.lit(None).cast("string")
    return _value(source).cast("string")


def _blank(column: Column) -> Column:
    return column.isNull() | (F.trim(column) == "")


def _text_list(
    types: dict[str, T.DataType], catalog: CatalogConfig, source: str | list[str] | None
) -> Column:
    """Bullets or keywords: an array column's items, a string column split on
    `bullet_separator`, or (keywords) one item per column; normalised, empty items left out."""
    if source is None:
        return F.lit(None).cast("array<string>")
    if isinstance(source, list):
        items = F.array(*[text.normalize_text(_field(column)) for column in source])
        return F.filter(items, lambda item: item.isNotNull() & (item != ""))
    if isinstance(types[source], T.ArrayType):
        items = F.transform(_value(source), lambda item: text.normalize_text(item.cast("string")))
        return F.filter(items, lambda item: item != "")
    return text.split_list(_field(source), catalog.bullet_separator)


def _category_levels(catalog: CatalogConfig) -> Column:
    """The folded category levels before the title leaf and the level limit."""
    source = catalog.columns.category_path
    if source is None:
        return F.lit(None).cast("array<string>")
    if isinstance(source, list):
        levels = F.array(*[text.fold_text(_field(column)) for column in source])
        return F.filter(levels, lambda level: level.isNotNull() & (level != ""))
    return text.path_levels(_field(source), catalog.category_separator)


def _image_features(types: dict[str, T.DataType], catalog: CatalogConfig) -> tuple[Column, Column]:
    """(features array<float>, is_bad): arrays pass through; strings like "[0.1, 0.2]" parse."""
    source = catalog.columns.image_features
    if source is None:
        return F.lit(None).cast("array<float>"), F.lit(False)
    if isinstance(types[source], T.ArrayType):
        features = _value(source).cast("array<float>")
        items = _value(source).cast("array<string>")
    else:
        raw = F.regexp_replace(F.trim(_field(source)), r"^\[|\]$", "")
        items = F.when(_blank(raw), F.lit(None)).otherwise(F.split(F.trim(raw), r"[,\s]+"))
        features = F.transform(items, lambda item: item.try_cast("float"))
    is_bad = F.coalesce(
        F.exists(
            F.transform(items, lambda item: item.try_cast("float")), lambda value: value.isNull()
        ),
        F.lit(False),
    )
    return features, is_bad


def _attributes(catalog: CatalogConfig) -> Column:
    if not catalog.attributes:
        return F.lit(None).cast("map<string,string>")
    pairs = []
    for name, source in catalog.attributes.items():
        pairs += [F.lit(name), text.normalize_text(_field(source))]
    return F.map_filter(F.create_map(*pairs), lambda _, value: value.isNotNull() & (value != ""))


def _keyed(frame: DataFrame, catalog: CatalogConfig) -> DataFrame:
    """One row per source row: product_id, the row key, the mapped fields as read (a struct),
    the corrupt-record text and the source file. The key is two 64-bit xxhash64 chains over
    the mapped fields and their null flags (so ("a", null) and (null, "a") differ): 128 bits,
    no collision to expect in any catalog, at a fraction of SHA-256 over JSON."""
    sources = list(dict.fromkeys(mapped_columns(catalog)))
    fields = [F.col(f"`{name}`") for name in sources]
    if catalog.columns.product_id:
        product_id = F.trim(fields[sources.index(catalog.columns.product_id)].cast("string"))
    else:  # an id from the content, stable across runs and versions: readers join on it
        raw_row = F.to_json(F.struct(*fields), {"ignoreNullFields": "false"})
        product_id = F.substring(F.sha2(raw_row, 256), 1, 24)
    flagged = [item for field in fields for item in (field, field.isNull())]
    return frame.select(
        product_id.alias("product_id"),
        F.xxhash64(*flagged).alias(_KEY[0]),
        F.xxhash64(F.lit("prodvec"), *flagged).alias(_KEY[1]),
        *[field.alias(_RAW + name) for field, name in zip(fields, sources, strict=True)],
        F.col(CORRUPT).alias("_corrupt"),
        F.col("_source_file"),
    )


def _with_duplicates(keyed: DataFrame) -> DataFrame:
    """`_duplicate`: a copy of an earlier row (same product_id and key; the first by source
    file stays); `_conflict`: the product_id has rows of different content and this row is
    not the one kept. The kept row is the most complete (most mapped fields set), then the
    one from the last source file, then the first by its fields' text: deterministic, so the
    product keeps an embedding and reruns keep the same row. One shuffle by product_id serves
    every window."""
    raw = [F.col(f"`{name}`").cast("string") for name in keyed.columns if name.startswith(_RAW)]
    filled = sum((F.when(field.isNotNull(), 1).otherwise(0) for field in raw), F.lit(0))
    by_id = Window.partitionBy("product_id")
    by_row = Window.partitionBy("product_id", *_KEY).orderBy("_source_file")
    preferred = by_id.orderBy(
        filled.desc(), F.desc("_source_file"), *[field.asc_nulls_first() for field in raw]
    )
    differ = [F.min(key).over(by_id) != F.max(key).over(by_id) for key in _KEY]
    kept = [F.first(key).over(preferred) == F.col(key) for key in _KEY]
    return keyed.withColumn("_duplicate", F.row_number().over(by_row) > 1).withColumn(
        "_conflict",
        F.col("product_id").isNotNull() & (differ[0] | differ[1]) & ~(kept[0] & kept[1]),
    )


def _normalised(frame: DataFrame, config: Config, types: dict[str, T.DataType]) -> DataFrame:
    """The canonical columns and the row's own quarantine reason and message
    (`_local_reason`, `_local_message`: every check but the id conflict), from `_in`.

    Three projections, each reading the one before: Spark does not share an expression that
    holds a lambda (category levels, bullets) between the places that read it, so each
    intermediate is a column of its own. All Unicode repair of a row's raw fields is one
    Python step, fed only the fields that need it."""
    catalog, clean = config.catalog, config.clean
    columns = catalog.columns
    title_raw = _field(columns.title)
    price = text.parse_price(_field(columns.price), catalog.currency)
    features, bad_features = _image_features(types, catalog)
    encoding_bad = F.lit(False)
    for source in (columns.title, columns.description, columns.brand):
        if source:
            encoding_bad = encoding_bad | F.coalesce(
                text.has_invalid_encoding(_field(source)), F.lit(False)
            )
    frame = frame.select(
        "*",
        F.rtrim(F.substring(text.normalize_text(title_raw), 1, clean.max_title_chars)).alias(
            "title"
        ),  # cut, not quarantined: title_raw keeps the whole
        title_raw.alias("title_raw"),
        F.substring(
            text.normalize_text(_field(columns.description)), 1, clean.max_description_chars
        ).alias("description"),
        _text_list(types, catalog, columns.bullets).alias("bullets"),
        F.nullif(text.normalize_text(_field(columns.brand)), F.lit("")).alias("brand"),
        _text_list(types, catalog, columns.keywords).alias("keywords"),
        _category_levels(catalog).alias("_levels"),
        price.alias("_price"),
        F.upper(F.trim(_field(columns.currency))).alias("_currency"),
        text.normalize_text(_field(columns.product_group)).alias("_group"),
        F.coalesce(F.trim(_field(columns.locale)), F.lit(catalog.locale)).alias("locale"),
        _attributes(catalog).alias("attributes"),
        features.alias("image_features"),
        F.lit(catalog.name).alias("source"),
        encoding_bad.alias("_encoding_bad"),
        bad_features.alias("_features_bad"),
    )
    price_error, amount = F.col("_price.error"), F.col("_price.amount")
    checks: list[tuple[str, Column, Column]] = [
        (
            "malformed_record",
            F.col("_corrupt").isNotNull(),
            F.lit("the reader could not parse this record (wrong field count or quoting)"),
        ),
        ("missing_product_id", _blank(F.col("product_id")), F.lit("product_id is null or empty")),
        (
            "invalid_product_id",
            F.col("product_id").rlike(CONTROL_CHARACTERS),
            F.lit("product_id holds control characters"),
        ),
        (
            "invalid_encoding",
            F.col("_encoding_bad"),
            F.lit("text holds U+FFFD or control characters (bytes were not valid UTF-8)"),
        ),
        (
            "missing_title",
            F.col("title_raw").isNull() | (F.col("title") == ""),
            F.lit("title is null, empty, or has no letters or digits"),
        ),
        (
            "unparsable_price",
            price_error == "unparsable_price",
            F.lit("price has no number in it"),
        ),
        (
            "negative_price",
            price_error == "negative_price",
            F.format_string("price %s is negative", amount.cast("string")),
        ),
        (
            "price_out_of_range",
            amount > clean.max_price,
            F.format_string(
                f"price %s is above max_price {clean.max_price:g}", amount.cast("string")
            ),
        ),
        (
            "bad_image_features",
            F.col("_features_bad"),
            F.lit("image_features has values that are not numbers"),
        ),
    ]
    assert tuple(code for code, _, _ in checks) == REASONS[:-1]
    frame = frame.select(
        "*",
        text.trim_path(F.col("_levels"), F.col("title"), clean.max_category_levels).alias(
            "category_path"
        ),
        amount.alias("price"),
        F.when(amount.isNotNull(), F.coalesce("_currency", "_price.currency")).alias("currency"),
        F.coalesce(*[F.when(condition, F.lit(code)) for code, condition, _ in checks]).alias(
            "_local_reason"
        ),
        F.coalesce(*[F.when(condition, message) for _, condition, message in checks]).alias(
            "_local_message"
        ),
    )
    # The first category level is folded already: normalising it needs no Python step.
    first_level = text.normalize_folded(F.try_element_at("category_path", F.lit(1)))
    group = F.regexp_replace(F.coalesce("_group", first_level), " ", "_")
    return frame.withColumn(
        "product_group", F.coalesce(F.nullif(group, F.lit("")), F.lit("unknown"))
    ).withColumn("content_hash", content_hash())


def _outcome(frame: DataFrame, carried: Column | None) -> DataFrame:
    """Final columns: the clean ones (carried from the previous run where `carried`), the
    row's own reason and message, then `_reason`/`_message` with the id conflict, null for
    clean rows and duplicates, and `_source_row` (JSON) for quarantined rows only."""

    def pick(name: str) -> Column:
        if carried is None:
            return F.col(name)
        return F.when(carried, F.col(_PREV + name)).otherwise(F.col(name)).alias(name)

    local_reason, local_message = pick("_local_reason"), pick("_local_message")
    reason = F.when(
        ~F.col("_duplicate"),
        F.coalesce(local_reason, F.when(F.col("_conflict"), F.lit("duplicate_id_conflict"))),
    )
    message = F.when(
        ~F.col("_duplicate"),
        F.coalesce(local_message, F.when(F.col("_conflict"), F.lit(_CONFLICT_MESSAGE))),
    )
    raw = [
        F.col(f"`{name}`").alias(name[len(_RAW) :])
        for name in frame.columns
        if name.startswith(_RAW)
    ]
    source_row = F.when(
        F.col("_corrupt").isNotNull(), F.to_json(F.struct(F.col("_corrupt").alias(CORRUPT)))
    ).otherwise(F.to_json(F.struct(*raw), {"ignoreNullFields": "false"}))
    return frame.select(
        *[
            F.col(field.name) if field.name in ("product_id", "source") else pick(field.name)
            for field in CLEAN_SCHEMA.fields
        ],
        *_KEY,
        "_duplicate",
        F.col("_corrupt").isNotNull().alias("_malformed"),
        (F.lit(True) if carried is None else ~carried).alias("_normalised"),
        local_reason.alias("_local_reason"),
        local_message.alias("_local_message"),
        reason.alias("_reason"),
        message.alias("_message"),
        F.when(reason.isNotNull(), source_row).alias("_source_row"),
        "_source_file",
    )


def transform(frame: DataFrame, config: Config) -> DataFrame:
    """Source rows -> canonical columns + `_reason`/`_message` (null when clean) + `_duplicate`
    + `_source_row` (JSON, quarantined rows only) + `_source_file`; every row normalised."""
    types = {field.name: field.dataType for field in frame.schema.fields}
    settled = _with_duplicates(_keyed(frame, config.catalog))
    staged = settled.withColumn(_TODO, F.lit(True))
    return _outcome(_normalised(staged, config, types), None)


def _incremental(frame: DataFrame, previous: DataFrame, config: Config) -> tuple[DataFrame, Column]:
    """The source rows joined to what the previous run made of the same rows (same
    product_id and key), normalising only the others. The join is on product_id alone (the
    key is a residual condition), so its shuffle is also the one the duplicate windows need."""
    types = {field.name: field.dataType for field in frame.schema.fields}
    keyed = _keyed(frame, config.catalog)
    prev = previous.select([F.col(name).alias(_PREV + name) for name in previous.columns])
    same_key = F.coalesce(
        (F.col(_KEY[0]) == F.col(_PREV + _KEY[0])) & (F.col(_KEY[1]) == F.col(_PREV + _KEY[1])),
        F.lit(False),
    )
    joined = keyed.join(
        prev, (F.col("product_id") == F.col(_PREV + "product_id")) & same_key, "left"
    )
    carried = (
        F.col(_PREV + _KEY[0]).isNotNull()
        & F.col("_corrupt").isNull()
        & (F.col(_PREV + "_local_reason").isNotNull() | F.col(_PREV + "title").isNotNull())
    )
    settled = _with_duplicates(joined).withColumn("_carried", carried)
    staged = settled.withColumn(_TODO, ~F.col("_duplicate") & ~F.col("_carried"))
    return _normalised(staged, config, types), F.col("_carried")


def _rules_digest(config: Config) -> str:
    """What a carried row's normalisation depends on besides the row: the catalog settings
    (not its path: the next export lands elsewhere), the clean settings and the code of the
    rules. Rows hashed under another digest are normalised again."""
    catalog = config.catalog.model_dump(mode="json", exclude={"path", "synthetic"})
    rules = config.clean.model_dump(mode="json", exclude={"incremental"})
    digest = hashlib.sha256(json.dumps([catalog, rules], sort_keys=True).encode())
    for module in _RULE_MODULES:  # getsource: also inside the zip spark-submit ships
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()


def _previous(spark: SparkSession, config: Config, rules: str) -> tuple[DataFrame | None, str]:
    """What the last run made of each source row, when it can be reused under `rules` (this
    run's `_rules_digest`): (product_id, key, its own reason and message, and for clean rows
    the clean columns), and why (not)."""
    outputs = config.outputs
    stamp = outputs.row_hashes / _RULES_FILE
    if not stamp.is_file():
        return None, "no row hashes from a previous run"
    written = json.loads(stamp.read_text())
    if written["rules"] != rules:
        return None, "the rules changed since the previous run"
    if written["catalog_files"] != clean_files_stamp(outputs.clean_catalog):
        return None, "the clean catalog is not the one the row hashes were written with"
    rows = spark.read.schema(_ROWS_SCHEMA).parquet(str(outputs.row_hashes))
    catalog = read_clean(spark, config, featured=False)
    previous = rows.select(
        "product_id",
        *_KEY,
        F.col("reason").alias("_local_reason"),
        F.col("message").alias("_local_message"),
    ).join(catalog, "product_id", "left")
    return previous, "row hashes of the previous run"


_ROWS_SCHEMA = T.StructType(
    [
        T.StructField("product_id", T.StringType(), False),
        T.StructField(_KEY[0], T.LongType(), False),
        T.StructField(_KEY[1], T.LongType(), False),
        T.StructField("reason", T.StringType(), True),
        T.StructField("message", T.StringType(), True),
    ]
)


def _write(frame: DataFrame, target: Path) -> Path:
    """Write `frame` as Parquet beside `target` (published later, with the others)."""
    staging = target.with_name(f".{target.name}-staging-{uuid.uuid4().hex[:8]}")
    frame.write.parquet(str(staging))
    return staging


def run(spark: SparkSession, config: Config) -> StageResult:
    """Read, check, transform (incrementally when the previous run's row hashes allow), write
    the clean catalog, the quarantine and the row hashes, check the invariant."""
    source = read_catalog(spark, config)
    check_columns(source, config.catalog)
    rules = _rules_digest(config)
    previous, why = (
        _previous(spark, config, rules) if config.clean.incremental else (None, "full run")
    )
    rows_in = Observation("clean_rows_in")
    source = source.observe(rows_in, F.count(F.lit(1)).alias("rows"))
    if previous is None:
        staged = transform(source, config)
    else:
        normalised, carried = _incremental(source, previous, config)
        staged = _outcome(normalised, carried)
    mode = "full" if previous is None else "incremental"
    log.info("clean: %s run (%s)", mode, why)
    staged = faults.inject(staged, "clean").persist(StorageLevel.MEMORY_AND_DISK)
    outputs = config.outputs
    try:
        catalog = _write(
            staged.filter(~F.col("_duplicate") & F.col("_reason").isNull()).select(
                [F.col(field.name) for field in CLEAN_SCHEMA.fields]
            ),
            outputs.clean_catalog,
        )
        quarantine = _write(
            staged.filter(F.col("_reason").isNotNull()).select(
                "product_id",
                F.col("_reason").alias("reason"),
                F.col("_message").alias("message"),
                F.col("_source_row").alias("source_row"),
                F.col("_source_file").alias("source_file"),
                "source",
            ),
            outputs.quarantine,
        )
        # A row can be carried next time if the run knows all it needs about it: its own
        # reason, or its clean columns (in the catalog). Id conflicts are decided again.
        reusable = (
            ~F.col("_duplicate")
            & ~F.col("_malformed")
            & F.col("product_id").isNotNull()
            & (F.col("_reason").isNull() | F.col("_local_reason").isNotNull())
        )
        hashes = _write(
            staged.filter(reusable).select(
                "product_id",
                *_KEY,
                F.col("_local_reason").alias("reason"),
                F.col("_local_message").alias("message"),
            ),
            outputs.row_hashes,
        )
        outcome = (
            staged.groupBy(
                F.when(F.col("_duplicate"), "exact_duplicate")
                .otherwise(F.coalesce("_reason", F.lit("clean")))
                .alias("outcome"),
                (~F.col("_duplicate") & F.col("_normalised")).alias("normalised"),
            )
            .count()
            .collect()
        )
    finally:
        staged.unpersist()
    counts: dict[str, int] = {}
    for row in outcome:
        counts[row["outcome"]] = counts.get(row["outcome"], 0) + row["count"]
    normalised = sum(row["count"] for row in outcome if row["normalised"])
    rows = {
        "in": rows_in.get["rows"],
        "clean": counts.pop("clean", 0),
        "exact_duplicates": counts.pop("exact_duplicate", 0),
    }
    rows["quarantined"] = sum(counts.values())
    if rows["in"] != rows["clean"] + rows["quarantined"] + rows["exact_duplicates"]:
        raise RuntimeError(f"clean stage lost rows: {rows} (bug: please report)")
    rows["normalised"] = normalised
    rows["carried"] = rows["in"] - rows["exact_duplicates"] - normalised
    seal_catalog(catalog, rows["clean"], config)
    publish_folder(catalog, outputs.clean_catalog)
    publish_folder(quarantine, outputs.quarantine)
    (hashes / _RULES_FILE).write_text(
        json.dumps(
            {
                "rules": rules,
                "catalog_files": clean_files_stamp(outputs.clean_catalog),
            }
        )
    )
    publish_folder(hashes, outputs.row_hashes)
    log.info("clean: %s; quarantine reasons %s", rows, counts)
    if mlflow.active_run():
        mlflow.log_dict(
            {reason: counts.get(reason, 0) for reason in REASONS}, "quarantine_reasons.json"
        )
        mlflow.log_metrics({f"quarantined_{reason}": counts.get(reason, 0) for reason in REASONS})
    return StageResult(
        rows=rows,
        outputs={
            "catalog": str(outputs.clean_catalog),
            "quarantine": str(outputs.quarantine),
            "row_hashes": str(outputs.row_hashes),
        },
        metrics={
            "quarantine_fraction": rows["quarantined"] / max(rows["in"], 1),
            "incremental": float(previous is not None),
        },
    )
