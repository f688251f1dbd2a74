"""The evaluate stage: how good the embeddings of one table version are, and how far they
moved since the previous version.

1. Probes (MRNet Table 2): logistic regression and random forest on the embeddings against
   the same models on TF-IDF of titles, for `evaluate.probes` (tasks the embedding model
   should not have been trained on; a probe whose source a trained task reads is reported
   with `trained_on`), k-fold cross-validated, plus a small-training-set variant
   (`small_train_rows` labels per fold), where dense vectors should win. The paper's
   relative difference (emb - tfidf) / tfidf is reported per model and metric. TF-IDF is
   fitted inside each fold, so the baseline never sees its test titles. Every (probe,
   setting, model, features, fold) is an independent fit, run as one Spark task each over
   a single broadcast of the sample and folds, so a cluster spreads them over executors.
2. Reports of the trained heads on the shards' test split: top-k accuracy and macro-F1 from
   `pipelines.training.TaskMetrics` (the numbers validation computes during training).
3. Retrieval: eProduct's MAR@k (`pipelines.index.mean_average_recall`) with the leaf
   category as ground truth, for diverse query products of the sample (eProduct 3.1's
   k-means++ sampling), retrieved by exact cosine over the sample with the embeddings and
   with TF-IDF of titles (the same baseline as the probes). How close a faiss index comes to
   exact search is the index stage's recall@10.
4. Pictures: a t-SNE of a sample coloured by top-level category (PNG) and a nearest-neighbour
   table of sample products (TSV).
5. Drift between the previous version and this one (`table_drift`, also a library call):
   cosine(old, new) per shared product when dimensions match, neighbour overlap@k always.

The embeddings are joined to the clean catalog in Spark; only a product_id hash sample of
`max_rows` reaches the driver, through Arrow. Every part that cannot run on the data it got
(too few rows or classes, per-group models) is skipped with its reason in `report.json`,
never a crash, so `prodvec run` on a tiny catalog finishes.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from sklearn.ensemble import RandomForestClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import TSNE
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from models.encoders import TitleEncoder
from models.losses import task_loss
from pipelines.clean import read_clean
from pipelines.config import Config, EvaluateConfig, TaskSpec
from pipelines.delta import EmbeddingTable
from pipelines.embed import default_model_uri
from pipelines.errors import ProdvecError
from pipelines.index import (
    diverse_queries,
    exact_neighbours,
    list_vectors,
    mean_average_recall,
)
from pipelines.loader import make_loader
from pipelines.shard import binary_label, check_sources, load_manifest, raw_label, shard_sets
from pipelines.stages import StageResult
from pipelines.training import TaskMetrics

log = logging.getLogger(__name__)

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
OTHER = "other"


class EvaluateError(ProdvecError):
    """The evaluate stage has nothing to evaluate (no table, no version) or a bad request."""


# ---- the driver's sample -------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """A product_id hash sample of one table version joined to the clean catalog."""

    product_ids: np.ndarray  # [n] object
    titles: np.ndarray  # [n] object
    top_category: np.ndarray  # [n] object, None where a product has no category
    leaf_category: np.ndarray  # [n] object, the deepest category node (None: no category)
    labels: dict[str, np.ndarray]  # probe name -> [n] object (string label or None)
    vectors: np.ndarray  # [n, d] float32


def hash_sample(frame: DataFrame, rows: int, seed: int) -> DataFrame:
    """`rows` products chosen by a seeded hash of product_id: the same products on every
    run and for every version (so drift compares like with like), one top-k in Spark."""
    return frame.orderBy(F.xxhash64(F.col("product_id"), F.lit(seed))).limit(rows)


def probe_label(task: TaskSpec) -> F.Column:
    """The probe's raw label as a string (binary probes: 'true'/'false'), null when absent."""
    raw = raw_label(task)
    return binary_label(task, raw).cast("string") if task.kind == "binary" else raw


def collect_sample(spark: SparkSession, config: Config, version: int) -> tuple[Sample, int]:
    """(the joined sample, embedded products of the version that the clean catalog lacks)."""
    settings = config.evaluate
    check_sources(list(settings.probes))
    embeddings = EmbeddingTable.from_config(config).read_spark(spark, version) \
        .select("product_id", "embedding")
    catalog = read_clean(spark, config).select(
        "product_id", "title", F.try_element_at("category_path", F.lit(1)).alias("top_category"),
        F.try_element_at("category_path", F.lit(-1)).alias("leaf_category"),
        *[probe_label(task).alias(f"probe_{task.name}") for task in settings.probes])
    joined = embeddings.join(catalog, "product_id", "left")
    missing = joined.filter(F.col("title").isNull()).count()
    if missing:
        log.warning("evaluate: %d embedded products of version %d are not in the clean catalog "
                    "(left out of probes and pictures)", missing, version)
    table = hash_sample(joined.filter(F.col("title").isNotNull()), settings.max_rows,
                        config.seed).toArrow()
    sample = Sample(
        product_ids=table["product_id"].to_numpy(),
        titles=table["title"].to_numpy(),
        top_category=table["top_category"].to_numpy(),
        leaf_category=table["leaf_category"].to_numpy(),
        labels={task.name: table[f"probe_{task.name}"].to_numpy() for task in settings.probes},
        vectors=list_vectors(table["embedding"], f"table version {version}"),
    )
    return sample, missing


# ---- probes (MRNet Table 2) ----------------------------------------------------------------


def trained_sources(config: Config) -> dict[str, str]:
    """Sources the embedding model was trained on: source -> training task name."""
    chosen = set(config.train.tasks)
    return {task.source: task.name for task in config.shard.tasks
            if not chosen or task.name in chosen}


def trained_on(probe: TaskSpec, sources: dict[str, str]) -> str | None:
    """The trained task that reads the probe's labels, if any (the whole category path
    covers each of its levels up to the task's depth)."""
    if probe.source in sources:
        return sources[probe.source]
    if probe.source.startswith("category_path[") and "category_path" in sources:
        return sources["category_path"]
    return None


def encode_labels(values: np.ndarray, task: TaskSpec) -> tuple[np.ndarray, np.ndarray, int]:
    """(row indices with a usable label, their labels, rows left out of a class of one).

    Multiclass: the `top_n` most frequent values, the rest 'other' (as the shard stage);
    a class seen once cannot be both trained and tested on, so its rows are left out and
    counted."""
    labelled = np.flatnonzero(pd.notna(values))
    labels = values[labelled].astype(str)
    if task.kind == "multiclass" and task.top_n is not None:
        top = pd.Series(labels).value_counts().index[: task.top_n]
        labels = np.where(np.isin(labels, top), labels, OTHER)
    counts = pd.Series(labels).value_counts()
    keep = np.isin(labels, counts.index[counts >= 2])
    return labelled[keep], labels[keep], int((~keep).sum())


def fold_splits(labels: np.ndarray, folds: int, train_rows: int | None,
                seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold (train, test) index pairs; with `train_rows`, each fold's train part
    is cut to a random `train_rows` of it (the small-training-set variant)."""
    rng = np.random.default_rng(seed)
    splits = []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(
            np.zeros(len(labels)), labels):
        if train_rows is not None:
            train = np.sort(rng.choice(train, size=train_rows, replace=False))
        splits.append((train, test))
    return splits


def probe_models(settings: EvaluateConfig, seed: int) -> dict[tuple[str, str], Any]:
    """(model, features) -> an unfitted sklearn estimator; TF-IDF is part of the estimator,
    so it is fitted on each fold's training titles only. One core each: the fits themselves
    run in parallel (`run_probes`)."""
    def tfidf() -> TfidfVectorizer:
        return TfidfVectorizer(max_features=settings.tfidf_max_features, sublinear_tf=True)

    def forest() -> RandomForestClassifier:
        return RandomForestClassifier(settings.forest_trees, n_jobs=1, random_state=seed)

    def logistic() -> LogisticRegression:
        return LogisticRegression(max_iter=2000)

    return {
        ("logreg", "embedding"): make_pipeline(StandardScaler(), logistic()),
        ("logreg", "tfidf"): make_pipeline(tfidf(), logistic()),
        ("forest", "embedding"): forest(),
        ("forest", "tfidf"): make_pipeline(tfidf(), forest()),
    }


@dataclass(frozen=True)
class ProbePlan:
    """One probe's labelled sample rows and its folds per setting ('full', 'small')."""

    task: TaskSpec
    trained_on: str  # the trained task that reads the same labels, or ""
    rows: np.ndarray  # sample rows with a usable label
    labels: np.ndarray
    left_out: int  # labelled rows of classes too small to cross-validate
    folds: int
    splits: dict[str, list[tuple[np.ndarray, np.ndarray]]]


@dataclass(frozen=True)
class Fit:
    """One independent unit of probe work: a (setting, model, features) on one fold."""

    task: str
    setting: str
    model: str
    features: str
    fold: int


def plan_probe(sample: Sample, task: TaskSpec, settings: EvaluateConfig, seed: int,
               trained: str | None) -> tuple[ProbePlan | None, list[str]]:
    """The probe's folds, or None, and why any part of it cannot run on this sample.

    Classes with fewer products than `folds` are left out (counted in `rare_rows_left_out`)
    so that one rare class does not cut the folds of all; only when fewer than two classes
    are that large do the folds shrink, to the second-largest class's size."""
    rows, labels, rare = encode_labels(sample.labels[task.name], task)
    where = f"probe '{task.name}' ({task.source})"
    counts = pd.Series(labels).value_counts()
    if len(counts) < 2:
        return None, [f"{where}: {len(counts)} class(es) among {len(rows)} labelled products"]
    skipped = []
    folds = settings.folds
    if (counts >= folds).sum() < 2:
        folds = max(2, int(counts.iloc[1]))
        skipped.append(f"{where}: {folds} folds, not {settings.folds}: fewer than two classes "
                       f"have {settings.folds} products")
    keep = np.isin(labels, counts.index[counts >= folds])
    rows, labels, rare = rows[keep], labels[keep], rare + int((~keep).sum())
    settings_rows: dict[str, int | None] = {"full": None}
    smallest_train = len(rows) - math.ceil(len(rows) / folds)
    if smallest_train > settings.small_train_rows:
        settings_rows["small"] = settings.small_train_rows
    else:
        skipped.append(f"{where}: no small-training-set variant: folds train on at most "
                       f"{smallest_train} products, not more than {settings.small_train_rows}")
    splits = {setting: fold_splits(labels, folds, train_rows, seed)
              for setting, train_rows in settings_rows.items()}
    return ProbePlan(task, trained or "", rows, labels, rare, folds, splits), skipped


def score_fit(fit: Fit, plans: dict[str, ProbePlan], vectors: np.ndarray, titles: np.ndarray,
              settings: EvaluateConfig, seed: int) -> tuple[Fit, float, float]:
    """(the fit, accuracy, macro-F1) of one model trained and tested on one fold."""
    plan = plans[fit.task]
    train, test = plan.splits[fit.setting][fit.fold]
    inputs = (vectors if fit.features == "embedding" else titles)[plan.rows]
    estimator = probe_models(settings, seed)[(fit.model, fit.features)]
    estimator.fit(inputs[train], plan.labels[train])
    predicted = estimator.predict(inputs[test])
    return (fit, float(accuracy_score(plan.labels[test], predicted)),
            float(f1_score(plan.labels[test], predicted, average="macro")))


def run_probes(plans: list[ProbePlan], sample: Sample, settings: EvaluateConfig, seed: int,
               spark: SparkSession | None = None) -> list[dict[str, Any]]:
    """Every fold of every (probe, setting, model, features), each fit a Spark task when a
    session is given (the sample and folds broadcast once), else one after another here;
    then the fold means, one row per (probe, setting, model, features)."""
    by_task = {plan.task.name: plan for plan in plans}
    fits = [Fit(plan.task.name, setting, model, features, fold)
            for plan in plans for setting, splits in plan.splits.items()
            for model, features in probe_models(settings, seed)
            for fold in range(len(splits))]
    if not fits:
        return []
    shared = (by_task, sample.vectors, sample.titles, settings, seed)
    if spark is None:
        results = [score_fit(fit, *shared) for fit in fits]
    else:
        broadcast = spark.sparkContext.broadcast(shared)
        try:
            results = spark.sparkContext.parallelize(fits, len(fits)).map(
                lambda fit: score_fit(fit, *broadcast.value)).collect()
        finally:
            broadcast.destroy()
    frame = pd.DataFrame([{**vars(fit), "accuracy": accuracy, "macro_f1": macro_f1}
                          for fit, accuracy, macro_f1 in results])
    means = frame.groupby(["task", "setting", "model", "features"], sort=False)[
        ["accuracy", "macro_f1"]].mean().reset_index()
    scores = []
    for row in means.itertuples(index=False):
        plan = by_task[row.task]
        scores.append({
            "task": row.task, "source": plan.task.source, "trained_on": plan.trained_on,
            "setting": row.setting, "model": row.model, "features": row.features,
            "accuracy": float(row.accuracy), "macro_f1": float(row.macro_f1),
            "folds": plan.folds, "train_rows": len(plan.splits[row.setting][0][0]),
            "rows": len(plan.rows), "classes": len(set(plan.labels)),
            "rare_rows_left_out": plan.left_out,
        })
    return scores


def relative_differences(scores: pd.DataFrame) -> pd.DataFrame:
    """The paper's (embedding - tfidf) / tfidf per task, setting, model and metric."""
    if scores.empty:
        return pd.DataFrame(columns=["task", "setting", "model", "metric", "embedding", "tfidf",
                                     "relative"])
    long = scores.melt(id_vars=["task", "setting", "model", "features"],
                       value_vars=["accuracy", "macro_f1"], var_name="metric")
    wide = long.pivot_table(index=["task", "setting", "model", "metric"], columns="features",
                            values="value").reset_index()
    wide["relative"] = (wide["embedding"] - wide["tfidf"]) / wide["tfidf"]
    return wide[["task", "setting", "model", "metric", "embedding", "tfidf", "relative"]]


# ---- the trained heads ---------------------------------------------------------------------


def head_reports(config: Config, model_uri: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Top-k accuracy and macro-F1 of every classification head of the registered model
    on the shards' test split (binary heads: top-1 only)."""
    shard_dir = config.stage_dir("shard")
    if not (shard_dir / "manifest.json").is_file():
        return [], [f"heads: no shards at {shard_dir} (run `prodvec shard`)"]
    if None not in shard_sets(shard_dir):
        return [], ["heads: per-group models have one head set per group; reported for the "
                    + "single MRNet only"]
    module = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    if not isinstance(module, TitleEncoder):
        return [], [f"heads: {type(module).__name__} has no task heads to report on"]
    manifest = load_manifest(shard_dir)
    if manifest["splits"]["test"] == 0:
        return [], ["heads: the test split is empty"]
    heads = [task for task in module.mrnet.tasks if task.kind in ("multiclass", "binary")]
    states = {task.name: TaskMetrics(task, torch.device("cpu")) for task in heads}
    hits = {task.name: np.zeros(len(config.evaluate.top_k)) for task in heads}
    module.eval()
    with torch.inference_mode():
        for batch in make_loader(shard_dir, "test", config.evaluate.head_batch_size,
                                 shuffle=False):
            outputs = module.mrnet(batch, tasks=list(states))
            for task in heads:
                output, target = outputs[task.name], batch[task.name]
                mask = batch[f"{task.name}_mask"].to(torch.bool)
                states[task.name].update(output, target, mask, task_loss(output, target, mask,
                                                                         task))
                if task.kind == "multiclass":
                    ranked = output.topk(min(max(config.evaluate.top_k), task.num_outputs),
                                         dim=1).indices[mask]
                    found = ranked == target[mask].long()[:, None]
                    hits[task.name] += [found[:, :k].any(dim=1).sum().item()
                                        for k in config.evaluate.top_k]
    reports = []
    for task in heads:
        metrics = states[task.name].compute()
        if not metrics:
            continue
        labelled = int(states[task.name].stats[1].item())
        row: dict[str, Any] = {"task": task.name, "kind": task.kind, "classes": task.num_outputs
                               if task.kind == "multiclass" else 2, "test_rows": labelled,
                               "macro_f1": metrics["macro_f1"]}
        if task.kind == "multiclass":
            row.update({f"top{k}": hits[task.name][i] / labelled
                        for i, k in enumerate(config.evaluate.top_k)})
        else:
            row["top1"] = metrics["accuracy"]
        reports.append(row)
    return reports, []


# ---- retrieval ---------------------------------------------------------------------------


def category_retrieval(sample: Sample, queries: int, k: int, seed: int,
                       tfidf_max_features: int) -> tuple[dict[str, Any] | None, str | None]:
    """(MAR@k of the embeddings and of TF-IDF with the leaf category as ground truth, or
    why it could not run). A query's matches are the other sampled products of its leaf
    category; queries are drawn among products whose category has another sampled member."""
    leaves = pd.Series(sample.leaf_category)
    sizes = leaves.map(leaves.value_counts())
    eligible = np.flatnonzero(leaves.notna().to_numpy() & (sizes >= 2).to_numpy())
    k = min(k, len(sample.vectors) - 1)
    if len(eligible) < 2 or k < 1:
        return None, (f"retrieval: {len(eligible)} sampled products share a leaf category "
                      "with another (needs 2)")
    picked = eligible[diverse_queries(sample.vectors[eligible], min(queries, len(eligible)),
                                      seed=seed)]
    members = leaves.groupby(leaves).indices
    relevant = [set(members[leaves.iloc[row]].tolist()) - {row} for row in picked]
    _, by_embedding = exact_neighbours(sample.vectors, sample.vectors[picked], k + 1)
    titles = TfidfVectorizer(max_features=tfidf_max_features, sublinear_tf=True).fit_transform(
        sample.titles.astype(str))
    scores = (titles[picked] @ titles.T).toarray()  # rows are L2-normalised: cosine
    by_tfidf = np.argsort(-scores, axis=1, kind="stable")[:, : k + 1]
    report = {"queries": len(picked), "k": k, "ground_truth": "leaf category", **{
        f"mar_at_k_{features}": mean_average_recall(others(found, picked, k)[0], relevant, k)
        for features, found in (("embedding", by_embedding), ("tfidf", by_tfidf))}}
    report["relative"] = ((report["mar_at_k_embedding"] - report["mar_at_k_tfidf"])
                          / report["mar_at_k_tfidf"] if report["mar_at_k_tfidf"] else None)
    return report, None


# ---- pictures ------------------------------------------------------------------------------


def tsne_figure(vectors: np.ndarray, categories: np.ndarray, seed: int,
                legend: int = 12) -> Figure:
    """t-SNE of the vectors coloured by top-level category (the `legend` largest named,
    the rest grey); Figure API, so no pyplot global state."""
    perplexity = min(30.0, (len(vectors) - 1) / 3)
    points = TSNE(perplexity=perplexity, init="pca", random_state=seed).fit_transform(vectors)
    names = pd.Series(categories).fillna("(none)")
    largest = names.value_counts().index[:legend]
    figure = Figure(figsize=(9, 7), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    rest = ~names.isin(largest).to_numpy()
    axes.scatter(points[rest, 0], points[rest, 1], s=4, c="lightgrey", label="other")
    colours = colormaps["tab20"]
    for index, name in enumerate(largest):
        chosen = (names == name).to_numpy()
        axes.scatter(points[chosen, 0], points[chosen, 1], s=4, label=str(name)[:30],
                     color=colours(index % 20))
    axes.set_title(f"t-SNE of {len(vectors):,} product embeddings by top-level category")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend(markerscale=3, fontsize=7, loc="best")
    figure.tight_layout()
    return figure


def neighbour_table(sample: Sample, queries: int, k: int, seed: int) -> pd.DataFrame:
    """Sample products and their k nearest other products of the sample, with titles."""
    k = min(k, len(sample.vectors) - 1)
    picked = np.random.default_rng(seed).choice(len(sample.vectors), size=queries,
                                                replace=False)
    scores, indices = exact_neighbours(sample.vectors, sample.vectors[picked], k + 1)
    indices, scores = others(indices, picked, k, scores)
    return pd.DataFrame({
        "query_id": np.repeat(sample.product_ids[picked], k),
        "query_title": np.repeat(sample.titles[picked], k),
        "rank": np.tile(np.arange(1, k + 1), len(picked)),
        "neighbour_id": sample.product_ids[indices.ravel()],
        "neighbour_title": sample.titles[indices.ravel()],
        "cosine": scores.ravel().round(4),
    })


def others(indices: np.ndarray, queries: np.ndarray, k: int,
           scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """From k + 1 neighbours of rows that are themselves searched, the k that are not the
    query row (wherever it ranked among equal vectors; the last when it is absent)."""
    order = np.argsort(indices == queries[:, None], axis=1, kind="stable")[:, :k]
    picked = np.take_along_axis(indices, order, axis=1)
    return picked, None if scores is None else np.take_along_axis(scores, order, axis=1)


# ---- drift ---------------------------------------------------------------------------------


def embedding_drift(old: np.ndarray, new: np.ndarray, k: int) -> dict[str, Any]:
    """Drift of one set of products (row i of `old` and `new` is the same product): cosine
    (old, new) statistics when the dimensions match, and the mean overlap of each product's
    k nearest other products in the old space and in the new."""
    if len(old) != len(new):
        raise EvaluateError(f"drift needs aligned rows: {len(old)} old, {len(new)} new")
    report: dict[str, Any] = {"compared": len(old), "k": min(k, len(old) - 1)}
    if old.shape[1] == new.shape[1]:
        a = old / np.maximum(np.linalg.norm(old, axis=1, keepdims=True), 1e-12)
        b = new / np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
        cosine = (a * b).sum(axis=1)
        report["cosine"] = {"mean": float(cosine.mean()), **{
            f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(cosine, PERCENTILES),
                                              strict=True)}}
    else:
        report["cosine"] = None
        report["cosine_skipped"] = (f"dimensions differ ({old.shape[1]} -> {new.shape[1]}): "
                                    "cosine(old, new) is undefined")
    if report["k"] < 1:
        report["overlap"] = None
        report["overlap_skipped"] = f"{len(old)} shared product(s): no neighbours to compare"
        return report
    rows = np.arange(len(old))
    kk = report["k"]
    before, _ = others(exact_neighbours(old, old, kk + 1)[1], rows, kk)
    after, _ = others(exact_neighbours(new, new, kk + 1)[1], rows, kk)
    overlap = (before[:, :, None] == after[:, None, :]).any(axis=2).mean(axis=1)
    report["overlap"] = {"mean": float(overlap.mean()), **{
        f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(overlap, PERCENTILES),
                                          strict=True)}}
    return report


def table_drift(spark: SparkSession, table: EmbeddingTable, old_version: int,
                new_version: int, *, k: int = 10, max_rows: int = 20_000,
                seed: int = 0) -> dict[str, Any]:
    """Drift between two versions of an embedding table, for downstream teams deciding
    whether to re-index. Counts are over the whole versions; cosine and overlap over a
    product_id hash sample of `max_rows` shared products (neighbours within that sample)."""
    for version in (old_version, new_version):
        if version > (table.version() or 0) or version < 0:
            raise EvaluateError(f"{table.uri} has no version {version} "
                                f"(latest: {table.version()})")
    old = table.read_spark(spark, old_version).select(
        "product_id", F.col("embedding").alias("old"))
    new = table.read_spark(spark, new_version).select(
        "product_id", F.col("embedding").alias("new"))
    counts = old.join(new, "product_id", "full_outer").select(
        F.count_if(F.col("old").isNotNull() & F.col("new").isNotNull()).alias("shared"),
        F.count_if(F.col("new").isNull()).alias("only_old"),
        F.count_if(F.col("old").isNull()).alias("only_new")).first()
    report: dict[str, Any] = {"old_version": old_version, "new_version": new_version,
                              **counts.asDict()}
    if counts["shared"] == 0:
        report["skipped"] = "no product is in both versions"
        return report
    joined = hash_sample(old.join(new, "product_id"), max_rows, seed).toArrow()
    where = f"{table.uri} versions {old_version}/{new_version}"
    report.update(embedding_drift(list_vectors(joined["old"], where),
                                  list_vectors(joined["new"], where), k))
    return report


# ---- the stage -----------------------------------------------------------------------------


def _write_tsv(frame: pd.DataFrame, path: Path) -> str:
    frame.to_csv(path, sep="\t", index=False)
    return str(path)


def _metric_name(*parts: Any) -> str:
    return "_".join(str(part) for part in parts)


def run(spark: SparkSession, config: Config) -> StageResult:
    settings = config.evaluate
    table = EmbeddingTable.from_config(config)
    latest = table.version() if table.exists() else None
    if latest is None:
        raise EvaluateError(f"no embedding table at {table.uri}: run `prodvec embed` first")
    version = latest if settings.version is None else settings.version
    if version > latest:
        raise EvaluateError(f"evaluate.version {version}: {table.uri} has versions 0-{latest}")
    out = config.stage_dir("evaluate") / f"v{version}"
    out.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    metrics: dict[str, float] = {}
    outputs: dict[str, str] = {}

    sample, not_in_catalog = collect_sample(spark, config, version)
    rows = {"sample": len(sample.product_ids), "not_in_catalog": not_in_catalog}
    log.info("evaluate: version %d, %d products sampled", version, rows["sample"])

    sources = trained_sources(config)
    plans = []
    for task in settings.probes:
        trained = trained_on(task, sources)
        if trained:
            log.warning("evaluate: probe '%s' reads %s, which trained task '%s' also reads: "
                        "not a held-out task", task.name, task.source, trained)
        plan, task_skipped = plan_probe(sample, task, settings, config.seed, trained)
        plans += [plan] if plan else []
        skipped += task_skipped
    scores = run_probes(plans, sample, settings, config.seed, spark)
    probe_frame = pd.DataFrame(scores)
    relative = relative_differences(probe_frame)
    if scores:
        outputs["probes"] = _write_tsv(probe_frame, out / "probes.tsv")
        outputs["probes_relative"] = _write_tsv(relative, out / "probes_relative.tsv")
        for row in scores:
            for metric in ("accuracy", "macro_f1"):
                metrics[_metric_name("probe", row["task"], row["setting"], row["model"],
                                     row["features"], metric)] = row[metric]
        for row in relative.itertuples():
            metrics[_metric_name("probe", row.task, row.setting, row.model, row.metric,
                                 "relative")] = row.relative
    elif not settings.probes:
        skipped.append("probes: evaluate.probes is empty")

    model_uri = table.commit_info(version).get("model_uri") or default_model_uri(config)
    heads, heads_skipped = head_reports(config, model_uri)
    skipped += heads_skipped
    if heads:
        outputs["heads"] = _write_tsv(pd.DataFrame(heads), out / "heads.tsv")
        for row in heads:
            metrics.update({_metric_name("head", row["task"], key): row[key] for key in row
                            if key.startswith("top") or key == "macro_f1"})
        rows["head_test"] = max(row["test_rows"] for row in heads)

    retrieval = None
    if settings.retrieval_queries:
        retrieval, reason = category_retrieval(sample, settings.retrieval_queries,
                                               settings.retrieval_k, config.seed,
                                               settings.tfidf_max_features)
        if reason:
            skipped.append(reason)
        else:
            metrics.update({f"retrieval_{key}": value for key, value in retrieval.items()
                            if key.startswith("mar_at_k")
                            or (key == "relative" and value is not None)})
    else:
        skipped.append("retrieval: evaluate.retrieval_queries is 0")

    tsne_rows = min(settings.tsne_rows, len(sample.vectors))
    if tsne_rows >= 10:
        figure = tsne_figure(sample.vectors[:tsne_rows], sample.top_category[:tsne_rows],
                             config.seed)
        outputs["tsne"] = str(out / "tsne.png")
        figure.savefig(outputs["tsne"])
    else:
        skipped.append(f"t-SNE: {tsne_rows} products sampled (needs 10; evaluate.tsne_rows)")
    queries = min(settings.neighbour_queries, len(sample.vectors))
    if queries and len(sample.vectors) >= 2:
        outputs["neighbours"] = _write_tsv(
            neighbour_table(sample, queries, settings.neighbours, config.seed),
            out / "neighbours.tsv")
    else:
        skipped.append("neighbour table: fewer than 2 products or no queries asked")

    drift = None
    if version >= 1:
        drift = table_drift(spark, table, version - 1, version, k=settings.drift_k,
                            max_rows=settings.drift_max_rows, seed=config.seed)
        (out / "drift.json").write_text(json.dumps(drift, indent=1))
        outputs["drift"] = str(out / "drift.json")
        rows["drift_shared"] = drift["shared"]
        for part in ("cosine", "overlap"):
            if drift.get(part):
                metrics.update({f"drift_{part}_{key}": value
                                for key, value in drift[part].items()})
    else:
        skipped.append("drift: the table has one version")

    report = {"table": table.uri, "version": version, "model_uri": model_uri, "rows": rows,
              "probes": scores, "relative": relative.to_dict("records"), "heads": heads,
              "retrieval": retrieval,
              "drift": drift, "skipped": skipped}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    outputs["report"] = str(out / "report.json")
    for reason in skipped:
        log.info("evaluate: skipped %s", reason)
    if mlflow.active_run() is not None:
        mlflow.log_artifacts(str(out), "evaluate")
        mlflow.set_tags({"prodvec.evaluate.table_version": str(version)})
    return StageResult(rows=rows, outputs=outputs,
                       metrics={key: float(value) for key, value in metrics.items()})

