"""MRNet Table 2 probes: logistic regression and random forest on the embeddings against the
same models on TF-IDF of titles, k-fold cross-validated, plus a small-training-set variant
(`small_train_rows` labels per fold), where dense vectors should win. The paper's relative
difference (emb - tfidf) / tfidf is reported per model and metric. TF-IDF is fitted inside
each fold, so the baseline never sees its test titles. Every (probe, setting, model,
features, fold) is an independent fit, run as one Spark task each over a single broadcast of
the sample and folds, so a cluster spreads them over executors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession
from sklearn.ensemble import RandomForestClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipelines.analysis.sample import Sample
from pipelines.core.config import Config, EvaluateConfig
from pipelines.core.workers import settle
from pipelines.tasks import kind_of
from pipelines.tasks.contract import TaskSpec

__all__ = [
    "OTHER",
    "Fit",
    "ProbePlan",
    "encode_labels",
    "fold_splits",
    "plan_probe",
    "probe_models",
    "relative_differences",
    "run_probes",
    "score_fit",
    "trained_on",
    "trained_sources",
]

OTHER = "other"


def trained_sources(config: Config) -> dict[str, str]:
    """Sources the embedding model was trained on: source -> training task name."""
    chosen = set(config.train.tasks)
    return {
        task.source: task.name for task in config.shard.tasks if not chosen or task.name in chosen
    }


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
    labels = kind_of(task.kind).probe_values(task, labels)
    counts = pd.Series(labels).value_counts()
    keep = np.isin(labels, counts.index[counts >= 2])
    return labelled[keep], labels[keep], int((~keep).sum())


def fold_splits(
    labels: np.ndarray, folds: int, train_rows: int | None, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold (train, test) index pairs; with `train_rows`, each fold's train part
    is cut to a random `train_rows` of it (the small-training-set variant)."""
    rng = np.random.default_rng(seed)
    splits = []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(
        np.zeros(len(labels)), labels
    ):
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


def plan_probe(
    sample: Sample, task: TaskSpec, settings: EvaluateConfig, seed: int, trained: str | None
) -> tuple[ProbePlan | None, list[str]]:
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
        skipped.append(
            f"{where}: {folds} folds, not {settings.folds}: fewer than two classes "
            f"have {settings.folds} products"
        )
    keep = np.isin(labels, counts.index[counts >= folds])
    rows, labels, rare = rows[keep], labels[keep], rare + int((~keep).sum())
    settings_rows: dict[str, int | None] = {"full": None}
    smallest_train = len(rows) - math.ceil(len(rows) / folds)
    if smallest_train > settings.small_train_rows:
        settings_rows["small"] = settings.small_train_rows
    else:
        skipped.append(
            f"{where}: no small-training-set variant: folds train on at most "
            f"{smallest_train} products, not more than {settings.small_train_rows}"
        )
    splits = {
        setting: fold_splits(labels, folds, train_rows, seed)
        for setting, train_rows in settings_rows.items()
    }
    return ProbePlan(task, trained or "", rows, labels, rare, folds, splits), skipped


def score_fit(
    fit: Fit,
    plans: dict[str, ProbePlan],
    vectors: np.ndarray,
    titles: np.ndarray,
    settings: EvaluateConfig,
    seed: int,
) -> tuple[Fit, float, float]:
    """(the fit, accuracy, macro-F1) of one model trained and tested on one fold."""
    plan = plans[fit.task]
    train, test = plan.splits[fit.setting][fit.fold]
    inputs = (vectors if fit.features == "embedding" else titles)[plan.rows]
    estimator = probe_models(settings, seed)[(fit.model, fit.features)]
    estimator.fit(inputs[train], plan.labels[train])
    predicted = estimator.predict(inputs[test])
    return (
        fit,
        float(accuracy_score(plan.labels[test], predicted)),
        float(f1_score(plan.labels[test], predicted, average="macro")),
    )


def run_probes(
    plans: list[ProbePlan],
    sample: Sample,
    settings: EvaluateConfig,
    seed: int,
    spark: SparkSession | None = None,
) -> list[dict[str, Any]]:
    """Every fold of every (probe, setting, model, features), each fit a Spark task when a
    session is given (the sample and folds broadcast once), else one after another here;
    then the fold means, one row per (probe, setting, model, features)."""
    by_task = {plan.task.name: plan for plan in plans}
    fits = [
        Fit(plan.task.name, setting, model, features, fold)
        for plan in plans
        for setting, splits in plan.splits.items()
        for model, features in probe_models(settings, seed)
        for fold in range(len(splits))
    ]
    if not fits:
        return []
    shared = (by_task, sample.vectors, sample.titles, settings, seed)
    if spark is None:
        results = [score_fit(fit, *shared) for fit in fits]
    else:
        broadcast = spark.sparkContext.broadcast(shared)

        def score_task(fit: Fit) -> tuple[Fit, float, float]:
            scored = score_fit(fit, *broadcast.value)
            settle()
            return scored

        try:
            results = spark.sparkContext.parallelize(fits, len(fits)).map(score_task).collect()
        finally:
            broadcast.destroy()
    frame = pd.DataFrame(
        [
            {**vars(fit), "accuracy": accuracy, "macro_f1": macro_f1}
            for fit, accuracy, macro_f1 in results
        ]
    )
    means = (
        frame.groupby(["task", "setting", "model", "features"], sort=False)[
            ["accuracy", "macro_f1"]
        ]
        .mean()
        .reset_index()
    )
    scores = []
    for row in means.itertuples(index=False):
        plan = by_task[row.task]
        scores.append(
            {
                "task": row.task,
                "source": plan.task.source,
                "trained_on": plan.trained_on,
                "setting": row.setting,
                "model": row.model,
                "features": row.features,
                "accuracy": float(row.accuracy),
                "macro_f1": float(row.macro_f1),
                "folds": plan.folds,
                "train_rows": len(plan.splits[row.setting][0][0]),
                "rows": len(plan.rows),
                "classes": len(set(plan.labels)),
                "rare_rows_left_out": plan.left_out,
            }
        )
    return scores


def relative_differences(scores: pd.DataFrame) -> pd.DataFrame:
    """The paper's (embedding - tfidf) / tfidf per task, setting, model and metric."""
    if scores.empty:
        return pd.DataFrame(
            columns=["task", "setting", "model", "metric", "embedding", "tfidf", "relative"]
        )
    long = scores.melt(
        id_vars=["task", "setting", "model", "features"],
        value_vars=["accuracy", "macro_f1"],
        var_name="metric",
    )
    wide = long.pivot_table(
        index=["task", "setting", "model", "metric"], columns="features", values="value"
    ).reset_index()
    wide["relative"] = (wide["embedding"] - wide["tfidf"]) / wide["tfidf"]
    return wide[["task", "setting", "model", "metric", "embedding", "tfidf", "relative"]]
