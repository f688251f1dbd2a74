"""Clean stage: any catalog (CSV, JSON lines, Parquet) -> one canonical Parquet catalog
plus a quarantine table, with nothing lost on the way.

Every input row ends in exactly one place: the clean catalog, the quarantine (with
a reason code and a message), or the count of exact duplicates. The stage checks
rows in = clean + quarantined + duplicates and fails loudly if it ever does not hold.
All per-row work is Spark SQL built-ins except the Unicode repair inside
`pipelines.data.text`, which only sees the rows that need it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from py4j.protocol import Py4JJavaError
from pyspark import StorageLevel
from pyspark.errors import PySparkException
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.core import faults
from pipelines.core.config import CatalogConfig, CleanConfig, Config, Lookup
from pipelines.core.errors import CatalogError
from pipelines.core.outputs import StageResult
from pipelines.data import text
from pipelines.data.catalog import CLEAN_SCHEMA, content_hash
from pipelines.data.synthetic import ensure_synthetic_catalog

__all__ = [
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
    "invalid_encoding",
    "missing_title",
    "title_too_long",
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
        list_ok = feeds in {"bullets", "image_features"} and isinstance(data_type, T.ArrayType)
        if not (scalar or list_ok):
            raise CatalogError(
                f"catalog '{catalog.name}': column '{source}' (mapped to {feeds}) has type "
                f"{data_type.simpleString()}, expected a scalar"
                + (" or an array" if feeds in {"bullets", "image_features"} else "")
            )


def _raw(frame: DataFrame, source: str | None) -> Column:
    """A mapped source column as a string (null when unmapped)."""
    return F.col(f"`{source}`").cast("string") if source else F.lit(None).cast("string")


def _blank(column: Column) -> Column:
    return column.isNull() | (F.trim(column) == "")


def _bullets(frame: DataFrame, catalog: CatalogConfig) -> Column:
    source = catalog.columns.bullets
    if source is None:
        return F.lit(None).cast("array<string>")
    if isinstance(frame.schema[source].dataType, T.ArrayType):
        items = F.transform(
            F.col(f"`{source}`"), lambda item: text.normalize_text(item.cast("string"))
        )
        return F.filter(items, lambda item: item != "")
    return text.split_list(_raw(frame, source), catalog.bullet_separator)


def _category(frame: DataFrame, catalog: CatalogConfig, clean: CleanConfig) -> Column:
    source = catalog.columns.category_path
    if source is None:
        return F.lit(None).cast("array<string>")
    if isinstance(source, list):
        levels = F.array(*[text.fold_text(_raw(frame, column)) for column in source])
        return F.slice(
            F.filter(levels, lambda level: level.isNotNull() & (level != "")),
            1,
            clean.max_category_levels,
        )
    return text.split_path(
        _raw(frame, source),
        catalog.category_separator,
        _raw(frame, catalog.columns.title),
        clean.max_category_levels,
    )


def _image_features(frame: DataFrame, catalog: CatalogConfig) -> tuple[Column, Column]:
    """(features array<float>, is_bad): arrays pass through; strings like "[0.1, 0.2]" parse."""
    source = catalog.columns.image_features
    if source is None:
        return F.lit(None).cast("array<float>"), F.lit(False)
    if isinstance(frame.schema[source].dataType, T.ArrayType):
        features = F.col(f"`{source}`").cast("array<float>")
        items = F.col(f"`{source}`").cast("array<string>")
    else:
        raw = F.regexp_replace(F.trim(_raw(frame, source)), r"^\[|\]$", "")
        items = F.when(_blank(raw), F.lit(None)).otherwise(F.split(F.trim(raw), r"[,\s]+"))
        features = F.transform(items, lambda item: item.try_cast("float"))
    is_bad = F.coalesce(
        F.exists(
            F.transform(items, lambda item: item.try_cast("float")), lambda value: value.isNull()
        ),
        F.lit(False),
    )
    return features, is_bad


def _attributes(frame: DataFrame, catalog: CatalogConfig) -> Column:
    if not catalog.attributes:
        return F.lit(None).cast("map<string,string>")
    pairs = []
    for name, source in catalog.attributes.items():
        pairs += [F.lit(name), text.normalize_text(_raw(frame, source))]
    return F.map_filter(F.create_map(*pairs), lambda _, value: value.isNotNull() & (value != ""))


def transform(frame: DataFrame, config: Config) -> DataFrame:
    """Source rows -> canonical columns + `_reason`/`_message` (null when clean) + `_duplicate`."""
    catalog, clean = config.catalog, config.clean
    columns = catalog.columns
    sources = list(dict.fromkeys(mapped_columns(catalog)))
    raw_row = F.to_json(
        F.struct(*[F.col(f"`{name}`") for name in sources]), {"ignoreNullFields": "false"}
    )
    source_row = F.when(
        F.col(CORRUPT).isNotNull(), F.to_json(F.struct(F.col(CORRUPT).alias(CORRUPT)))
    ).otherwise(raw_row)

    raw_title = _raw(frame, columns.title)
    raw_id = (
        F.trim(_raw(frame, columns.product_id))
        if columns.product_id
        else F.substring(F.sha2(raw_row, 256), 1, 24)
    )
    price = text.parse_price(_raw(frame, columns.price), catalog.currency)
    features, bad_features = _image_features(frame, catalog)
    encoding_bad = F.lit(False)
    for source in (columns.title, columns.description, columns.brand):
        if source:
            encoding_bad = encoding_bad | F.coalesce(
                text.has_invalid_encoding(_raw(frame, source)), F.lit(False)
            )

    staged = frame.select(
        raw_id.alias("product_id"),
        text.normalize_text(raw_title).alias("title"),
        raw_title.alias("title_raw"),
        F.substring(
            text.normalize_text(_raw(frame, columns.description)), 1, clean.max_description_chars
        ).alias("description"),
        _bullets(frame, catalog).alias("bullets"),
        F.nullif(text.normalize_text(_raw(frame, columns.brand)), F.lit("")).alias("brand"),
        _category(frame, catalog, clean).alias("category_path"),
        price.amount.alias("price"),
        F.when(
            price.amount.isNotNull(),
            F.coalesce(F.upper(F.trim(_raw(frame, columns.currency))), price.currency),
        ).alias("currency"),
        _raw(frame, columns.product_group).alias("_group_raw"),
        F.coalesce(F.trim(_raw(frame, columns.locale)), F.lit(catalog.locale)).alias("locale"),
        _attributes(frame, catalog).alias("attributes"),
        features.alias("image_features"),
        F.lit(catalog.name).alias("source"),
        source_row.alias("_source_row"),
        F.col("_source_file"),
        F.sha2(raw_row, 256).alias("_row_hash"),
        F.col(CORRUPT).isNotNull().alias("_malformed"),
        raw_title.isNull().alias("_title_null"),
        F.length(raw_title).alias("_title_chars"),
        price.error.alias("_price_error"),
        encoding_bad.alias("_encoding_bad"),
        bad_features.alias("_features_bad"),
    )
    group_source = F.coalesce(F.col("_group_raw"), F.try_element_at("category_path", F.lit(1)))
    group = F.regexp_replace(text.normalize_text(group_source), " ", "_")
    staged = staged.withColumn(
        "product_group", F.coalesce(F.nullif(group, F.lit("")), F.lit("unknown"))
    ).withColumn("content_hash", content_hash())

    # One shuffle serves both windows: (product_id, row hash) partitions are clustered by
    # product_id, and exact duplicates share both keys.
    by_id = Window.partitionBy("product_id")
    conflict = F.col("product_id").isNotNull() & (
        F.min("_row_hash").over(by_id) != F.max("_row_hash").over(by_id)
    )
    by_row = Window.partitionBy("product_id", "_row_hash").orderBy("_source_file")
    staged = staged.withColumn("_conflict", conflict).withColumn(
        "_duplicate", F.row_number().over(by_row) > 1
    )

    checks: list[tuple[str, Column, Column]] = [
        (
            "malformed_record",
            F.col("_malformed"),
            F.lit("the reader could not parse this record (wrong field count or quoting)"),
        ),
        ("missing_product_id", _blank(F.col("product_id")), F.lit("product_id is null or empty")),
        (
            "invalid_encoding",
            F.col("_encoding_bad"),
            F.lit("text holds U+FFFD or control characters (bytes were not valid UTF-8)"),
        ),
        (
            "missing_title",
            F.col("_title_null") | (F.col("title") == ""),
            F.lit("title is null, empty, or has no letters or digits"),
        ),
        (
            "title_too_long",
            F.col("_title_chars") > clean.max_title_chars,
            F.format_string(
                f"title has %d characters, limit {clean.max_title_chars}", F.col("_title_chars")
            ),
        ),
        (
            "unparsable_price",
            F.col("_price_error") == "unparsable_price",
            F.lit("price has no number in it"),
        ),
        (
            "negative_price",
            F.col("_price_error") == "negative_price",
            F.format_string("price %s is negative", F.col("price").cast("string")),
        ),
        (
            "price_out_of_range",
            F.col("price") > clean.max_price,
            F.format_string(
                f"price %s is above max_price {clean.max_price:g}", F.col("price").cast("string")
            ),
        ),
        (
            "bad_image_features",
            F.col("_features_bad"),
            F.lit("image_features has values that are not numbers"),
        ),
        (
            "duplicate_id_conflict",
            ~F.col("_duplicate") & F.col("_conflict"),
            F.lit("product_id appears on rows with different content"),
        ),
    ]
    assert tuple(code for code, _, _ in checks) == REASONS
    reason = F.coalesce(*[F.when(condition, F.lit(code)) for code, condition, _ in checks])
    message = F.coalesce(*[F.when(condition, text_) for _, condition, text_ in checks])
    return staged.withColumn("_reason", F.when(~F.col("_duplicate"), reason)).withColumn(
        "_message", F.when(~F.col("_duplicate"), message)
    )


def run(spark: SparkSession, config: Config) -> StageResult:
    """Read, check, transform, write the clean catalog and the quarantine, check the invariant."""
    source = read_catalog(spark, config)
    check_columns(source, config.catalog)
    rows_in = source.count()
    staged = faults.inject(transform(source, config), "clean").persist(StorageLevel.MEMORY_AND_DISK)
    try:
        outputs = config.outputs
        clean_rows = staged.filter(~F.col("_duplicate") & F.col("_reason").isNull())
        clean_rows.select([F.col(field.name) for field in CLEAN_SCHEMA.fields]).write.mode(
            "overwrite"
        ).parquet(str(outputs.clean_catalog))
        quarantined = staged.filter(F.col("_reason").isNotNull()).select(
            "product_id",
            F.col("_reason").alias("reason"),
            F.col("_message").alias("message"),
            F.col("_source_row").alias("source_row"),
            F.col("_source_file").alias("source_file"),
            "source",
        )
        quarantined.write.mode("overwrite").parquet(str(outputs.quarantine))
        outcome = (
            staged.groupBy(
                F.when(F.col("_duplicate"), "exact_duplicate")
                .otherwise(F.coalesce("_reason", F.lit("clean")))
                .alias("outcome")
            )
            .count()
            .collect()
        )
    finally:
        staged.unpersist()
    counts = {row["outcome"]: row["count"] for row in outcome}
    rows = {
        "in": rows_in,
        "clean": counts.pop("clean", 0),
        "exact_duplicates": counts.pop("exact_duplicate", 0),
    }
    rows["quarantined"] = sum(counts.values())
    if rows["in"] != rows["clean"] + rows["quarantined"] + rows["exact_duplicates"]:
        raise RuntimeError(f"clean stage lost rows: {rows} (bug: please report)")
    log.info("clean: %s; quarantine reasons %s", rows, counts)
    if mlflow.active_run():
        mlflow.log_dict(
            {reason: counts.get(reason, 0) for reason in REASONS}, "quarantine_reasons.json"
        )
        mlflow.log_metrics({f"quarantined_{reason}": counts.get(reason, 0) for reason in REASONS})
    return StageResult(
        rows=rows,
        outputs={
            "catalog": str(config.outputs.clean_catalog),
            "quarantine": str(config.outputs.quarantine),
        },
        metrics={"quarantine_fraction": rows["quarantined"] / max(rows_in, 1)},
    )
