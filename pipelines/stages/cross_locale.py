"""Cross-locale stage (MRNet section 5): one embedding space for products of two locales.

The paper trains one MRNet per language-region and an autoencoder on products known in both:
input [x_a, x_b], a d-dim tanh hidden layer, output [y_a, y_b], trained on the three pairings
[a, 0] -> [0, b], [0, b] -> [a, 0], [a, b] -> [a, b] (`models.autoencoders`), and uses it to
project a product of locale b into locale a's space, where its nearest locale-a products are
found. The output table is that one space: locale a's embeddings as they are, locale b's
projected (both at unit length). The hidden layer is no common space: [a, 0] and [0, b] are
trained towards different outputs, and there a held-out product's partner was never the
nearest (README, "Two locales, one space").

How it runs:
1. The embedding table's latest version (whatever model made it: one model over both locales,
   or per-locale MRNets as the per-group model) joined with the clean catalog's `locale`. The
   table must come from the current clean catalog (`prodvec embed` first).
2. Pairs of the same product in both locales: a CSV whose header names the two locales, or
   the products of both locales that share a value of `cross_locale.pair_attribute`. A file
   row the stage cannot use (an empty cell, an id not in the table, an id of another locale,
   a repeated pair) goes to `rejected_pairs` with its reason: file rows = `pairs` + rows
   rejected.
3. A seeded `holdout` of the pairs stays out of training. The autoencoder trains in the driver
   on the unit-length embeddings of the others (at most `max_pairs`) and is registered in
   MLflow (`prodvec-cross-locale-<catalog>`).
4. The report: for each held-out pair, is the locale-b product's partner the nearest locale-a
   product (recall@1, @10 among the held-out ones), in the table's own space and with locale
   b projected.
5. Every product of the two locales gets its embedding in locale a's space (numpy on the
   executors, two matrix products per Arrow batch), committed as one full version of the
   cross-locale table. A run whose source version and configuration already committed does
   nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlflow
import numpy as np
import pyarrow as pa
import torch
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from models.autoencoders import CrossLocaleAutoencoder
from pipelines.core.config import Config, CrossLocaleConfig
from pipelines.core.devices import torch_threads
from pipelines.core.errors import CrossLocaleError
from pipelines.core.outputs import StageResult
from pipelines.data.catalog import clean_written_at, read_clean
from pipelines.table import EmbeddingTable
from pipelines.table.contract import vector_array
from pipelines.table.refresh import CATALOG_STAMP
from pipelines.training.publish import log_and_register

__all__ = ["MIN_TRAINING_PAIRS", "REPORT_PAIRS", "Projection", "partner_recall", "run", "unit"]

log = logging.getLogger(__name__)

MIN_TRAINING_PAIRS = 10
REPORT_PAIRS = 5_000  # held-out pairs in the recall report (an all-pairs matrix)
RECALL_AT = (1, 10)
_SCHEMA = T.StructType(
    [
        T.StructField("product_id", T.StringType(), False),
        T.StructField("content_hash", T.StringType(), False),
        T.StructField("embedding", T.ArrayType(T.FloatType(), containsNull=False), False),
    ]
)


@dataclass(frozen=True)
class Projection:
    """The trained autoencoder's path from locale b into locale a's space ([0, x_b] in, the
    locale-a half of the output out) as numpy: a few d x d arrays, so it travels inside the
    executor function."""

    encoder: np.ndarray  # [d, d]: the encoder's columns that read locale b
    encoder_bias: np.ndarray
    decoder: np.ndarray  # [d, d]: the decoder's rows that write locale a
    decoder_bias: np.ndarray

    @classmethod
    def of(cls, model: CrossLocaleAutoencoder) -> Projection:
        def array(tensor: torch.Tensor) -> np.ndarray:
            return tensor.detach().cpu().numpy().astype(np.float32).copy()

        d = model.dim
        return cls(
            array(model.encoder.weight[:, d:]),
            array(model.encoder.bias),
            array(model.decoder.weight[:d]),
            array(model.decoder.bias[:d]),
        )

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        """[n, d] embeddings of locale b -> their estimate in locale a's space."""
        hidden = np.tanh(unit(embeddings) @ self.encoder.T + self.encoder_bias)
        return hidden @ self.decoder.T + self.decoder_bias


def unit(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (zero rows stay zero): the autoencoder's input scale, whatever
    model made the table."""
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)


def partner_recall(queries: np.ndarray, candidates: np.ndarray) -> dict[int, float]:
    """Row i of `candidates` is the partner of row i of `queries`: the share of queries whose
    partner is among their k nearest candidates by cosine (ties count against), per k."""
    scores = unit(queries) @ unit(candidates).T
    ahead = (scores > np.diag(scores)[:, None]).sum(axis=1)
    return {k: float((ahead < k).mean()) for k in RECALL_AT}


# ---- pairing ----------------------------------------------------------------------------------


def _source_version(config: Config, table: EmbeddingTable) -> tuple[int, int]:
    """The table's latest version and the clean-catalog stamp its commit recorded, which must
    be the current clean catalog's."""
    version = table.version()
    if version is None:
        raise CrossLocaleError(f"{table.uri} has no version yet: run `prodvec embed` first")
    stamp = table.commit_info(version).get(CATALOG_STAMP)
    current = clean_written_at(config.outputs.clean_catalog)
    if stamp != current:
        raise CrossLocaleError(
            f"{table.uri} version {version} was embedded from another clean catalog (written at "
            f"{stamp}, the current one at {current}): run `prodvec embed` first"
        )
    return version, current


def _products(
    spark: SparkSession, config: Config, table: EmbeddingTable, version: int
) -> DataFrame:
    """The table's `version` with each product's locale (and pairing key)."""
    key = config.cross_locale.pair_attribute
    catalog = read_clean(spark, config).select(
        "product_id",
        "locale",
        (F.col("attributes")[key] if key else F.lit(None).cast("string")).alias("pair_key"),
    )
    embeddings = table.read_spark(spark, version).select("product_id", "content_hash", "embedding")
    return embeddings.join(catalog, "product_id")


def _pairs_from_attribute(products: DataFrame, locales: tuple[str, str]) -> DataFrame:
    """(a_id, b_id) for every two products of the two locales with one pairing key."""
    sides = [
        products.filter((F.col("locale") == locale) & F.col("pair_key").isNotNull()).select(
            "pair_key", F.col("product_id").alias(name)
        )
        for locale, name in zip(locales, ("a_id", "b_id"), strict=True)
    ]
    return sides[0].join(sides[1], "pair_key").select("a_id", "b_id")


def _pairs_from_file(
    spark: SparkSession, path: str, products: DataFrame, locales: tuple[str, str]
) -> tuple[DataFrame, DataFrame]:
    """The file's usable pairs (a_id, b_id) and its other rows with their reason."""
    raw = spark.read.csv(path, header=True)
    if missing := [locale for locale in locales if locale not in raw.columns]:
        raise CrossLocaleError(
            f"{path}: no column for locale(s) {missing}; its header names {raw.columns} (one "
            f"column per locale of cross_locale.locales, product ids in the rows)"
        )
    ids = products.select("product_id", "locale")
    a, b = (
        ids.select(
            F.col("product_id").alias(f"{side}_id"),
            F.col("locale").alias(f"{side}_locale"),
        )
        for side in ("a", "b")
    )
    rows = raw.select(
        F.trim(F.col(f"`{locales[0]}`")).alias("a_id"),
        F.trim(F.col(f"`{locales[1]}`")).alias("b_id"),
    )
    first = Window.partitionBy("a_id", "b_id").orderBy(F.monotonically_increasing_id())
    checked = (
        rows.join(a, "a_id", "left")
        .join(b, "b_id", "left")
        .withColumn(
            "reason",
            F.when(
                (F.coalesce("a_id", F.lit("")) == "") | (F.coalesce("b_id", F.lit("")) == ""),
                F.lit("missing_id"),
            )
            .when(
                F.col("a_locale").isNull() | F.col("b_locale").isNull(),
                F.lit("unknown_product"),
            )
            .when(
                (F.col("a_locale") != locales[0]) | (F.col("b_locale") != locales[1]),
                F.lit("wrong_locale"),
            )
            .when(F.row_number().over(first) > 1, F.lit("duplicate_pair")),
        )
    )
    return (
        checked.filter(F.col("reason").isNull()).select("a_id", "b_id"),
        checked.filter(F.col("reason").isNotNull()).select("a_id", "b_id", "reason"),
    )


@dataclass(frozen=True)
class PairedEmbeddings:
    """Both locales' unit-length embeddings of the pairs, row by row."""

    a: np.ndarray
    b: np.ndarray

    @classmethod
    def collect(cls, frame: DataFrame) -> PairedEmbeddings:
        table = frame.select("a_embedding", "b_embedding").toArrow()
        a, b = (
            np.stack(table.column(name).to_numpy(zero_copy_only=False)).astype(np.float32)
            if table.num_rows
            else np.zeros((0, 0), np.float32)
            for name in ("a_embedding", "b_embedding")
        )
        return cls(unit(a), unit(b))

    def __len__(self) -> int:
        return len(self.a)


def _split(
    pairs: DataFrame, products: DataFrame, settings: CrossLocaleConfig, seed: int
) -> tuple[PairedEmbeddings, PairedEmbeddings]:
    """(training, held-out) pairs with their embeddings; each pair's side by a seeded hash,
    so a rerun keeps it; training capped at `max_pairs` by a second seeded hash."""
    embedding = products.select("product_id", "embedding")
    a = embedding.select(F.col("product_id").alias("a_id"), F.col("embedding").alias("a_embedding"))
    b = embedding.select(F.col("product_id").alias("b_id"), F.col("embedding").alias("b_embedding"))
    scale = 1_000_000
    drawn = (
        pairs.join(a, "a_id")
        .join(b, "b_id")
        .withColumn("draw", F.pmod(F.xxhash64("a_id", "b_id", F.lit(seed)), F.lit(scale)))
        .withColumn("order", F.xxhash64("a_id", "b_id", F.lit(seed + 1)))
    )
    held = drawn.filter(F.col("draw") < settings.holdout * scale)
    training = drawn.filter(F.col("draw") >= settings.holdout * scale)
    return (
        PairedEmbeddings.collect(training.orderBy("order").limit(settings.max_pairs)),
        PairedEmbeddings.collect(held.orderBy("order").limit(REPORT_PAIRS)),
    )


# ---- training and the report -------------------------------------------------------------------


def train(
    pairs: PairedEmbeddings, settings: CrossLocaleConfig, seed: int
) -> CrossLocaleAutoencoder:
    """The section-5 autoencoder over the three pairings of every training pair, shuffled."""
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    model = CrossLocaleAutoencoder(pairs.a.shape[1])
    inputs, targets = model.training_pairs(torch.from_numpy(pairs.a), torch.from_numpy(pairs.b))
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
    for epoch in range(settings.epochs):
        total = 0.0
        for batch in torch.randperm(len(inputs), generator=order).split(settings.batch_size):
            loss = model.loss(inputs[batch], targets[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
        log.info("cross_locale: epoch %d loss %.5f", epoch + 1, total / len(inputs))
    return model.eval()


def report(model: CrossLocaleAutoencoder, held: PairedEmbeddings) -> dict[str, float]:
    """Held-out partner recall of locale b's products among locale a's: in the table's own
    space, and with locale b projected into locale a's (the stage's output)."""
    if len(held) == 0:
        return {}
    with torch.inference_mode():
        inputs, targets = model.training_pairs(torch.from_numpy(held.a), torch.from_numpy(held.b))
        metrics = {"holdout_loss": float(model.loss(inputs, targets))}
    spaces = {"own": held.b, "projected": Projection.of(model)(held.b)}
    for name, queries in spaces.items():
        for k, recall in partner_recall(queries, held.a).items():
            metrics[f"holdout_recall_at_{k}_{name}"] = recall
    return metrics


def _projected_batches(
    projection: Projection, locale_a: str
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The executor function: each Arrow batch's embeddings in locale a's space, unit length."""

    def batches(source: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in source:
            rows = batch.num_rows
            flat = batch.column("embedding").flatten().to_numpy(zero_copy_only=False)
            embeddings = flat.reshape(rows, projection.encoder.shape[1])
            in_a = batch.column("locale").to_numpy(zero_copy_only=False) == locale_a
            out = np.empty((rows, projection.decoder.shape[0]), np.float32)
            out[in_a] = unit(embeddings[in_a])
            out[~in_a] = unit(projection(embeddings[~in_a]))
            yield pa.RecordBatch.from_arrays(
                [batch.column("product_id"), batch.column("content_hash"), vector_array(out, rows)],
                names=_SCHEMA.names,
            )

    return batches


# ---- the stage -------------------------------------------------------------------------------


def run(spark: SparkSession, config: Config) -> StageResult:
    """Pair, train, report, and commit the locale-agnostic embeddings as one table version."""
    settings = config.cross_locale
    if settings.locales is None:
        raise CrossLocaleError("cross_locale.locales names the two locales to bring together")
    locales = settings.locales
    seed = config.seed if settings.seed is None else settings.seed
    source = EmbeddingTable.from_config(config)
    target = EmbeddingTable(
        config.outputs.cross_locale_table,
        rows_per_file=config.embed.rows_per_file,
        writer=config.embed.writer,
    )
    version, stamp = _source_version(config, source)
    products = _products(spark, config, source, version)
    app_id = f"cross_locale-{config.catalog.name}-v{version}-{config.digest()}"
    outputs = {"table": target.uri, "source_version": str(version)}
    if target.committed(app_id):
        log.info("cross_locale: %s already committed for version %s", target.uri, version)
        return StageResult(rows={}, outputs={**outputs, "skipped": "already committed"})
    per_locale: dict[str, int] = dict(products.groupBy("locale").count().collect())
    rows = {
        "in": sum(per_locale.values()),
        "locale_a": per_locale.get(locales[0], 0),
        "locale_b": per_locale.get(locales[1], 0),
    }
    rows["other_locales"] = rows["in"] - rows["locale_a"] - rows["locale_b"]
    if settings.pairs is not None:
        pairs, rejected = _pairs_from_file(spark, settings.pairs, products, locales)
        rejected.write.mode("overwrite").parquet(str(config.outputs.rejected_pairs))
        written = spark.read.parquet(str(config.outputs.rejected_pairs))
        for reason, count in written.groupBy("reason").count().collect():
            rows[f"pairs_rejected_{reason}"] = count
        outputs["rejected_pairs"] = str(config.outputs.rejected_pairs)
    else:
        pairs = _pairs_from_attribute(products, locales)
    pairs = pairs.persist()  # counted, then joined twice in _split: one pairing, not three
    try:
        rows["pairs"] = pairs.count()
        training, held = _split(pairs, products, settings, seed)
    finally:
        pairs.unpersist()
    # At most max_pairs train and REPORT_PAIRS are scored: the rest of `pairs` is left out.
    rows.update({"training_pairs": len(training), "holdout_pairs": len(held)})
    if len(training) < MIN_TRAINING_PAIRS:
        raise CrossLocaleError(
            f"{len(training)} training pairs of {locales[0]} and {locales[1]} products (at least "
            f"{MIN_TRAINING_PAIRS} needed): check cross_locale.locales and the pairing"
        )
    with torch_threads(1):  # a d x 2d autoencoder: one thread is the fastest
        model = train(training, settings, seed)
        metrics = report(model, held)
    model_name = f"prodvec-cross-locale-{config.catalog.name}"
    model_uri, model_version = log_and_register(
        model,
        np.zeros((1, 2 * model.dim), np.float32),
        model_name,
        [],
        {
            "locales": list(locales),
            "source_table": source.uri,
            "source_version": version,
        },
    )
    embeddings = products.filter(F.col("locale").isin(*locales)).select(
        "product_id", "content_hash", "locale", "embedding"
    )
    projected = embeddings.mapInArrow(_projected_batches(Projection.of(model), locales[0]), _SCHEMA)
    active = mlflow.active_run()
    run_id = active.info.run_id if active is not None else "no-mlflow-run"
    result = target.commit(
        projected,
        app_id=app_id,
        run_id=run_id,
        model_uri=model_uri,
        model_name=model_name,
        model_version=str(model_version),
        config_hash=config.digest(),
        mode="full",
        dimension=model.dim,
        catalog_stamp=stamp,
    )
    rows["table"] = result.rows
    log.info("cross_locale: %s version %s, %s", target.uri, result.version, metrics)
    return StageResult(
        rows=rows,
        outputs={**outputs, "version": str(result.version), "model_uri": model_uri},
        metrics=metrics,
    )
