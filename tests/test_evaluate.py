"""The evaluate stage: probes against TF-IDF, head reports, pictures and drift, on the shared
trained pipeline (2,000 synthetic products) and on small tables built directly."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from gensim.models import KeyedVectors
from mlflow import MlflowClient
from sklearn.metrics import f1_score, top_k_accuracy_score

from pipelines.analysis.drift import embedding_drift, table_drift
from pipelines.analysis.probes import (
    encode_labels,
    plan_probe,
    relative_differences,
    run_probes,
    trained_on,
    trained_sources,
)
from pipelines.analysis.retrieval import category_retrieval
from pipelines.analysis.sample import Sample
from pipelines.core.config import EvaluateConfig, load_config
from pipelines.core.errors import ConfigError, EvaluateError
from pipelines.stages.registry import run_stage
from pipelines.table import EmbeddingTable
from pipelines.tasks.contract import TaskSpec
from pipelines.training.loader import make_loader

PROBES = [
    {"name": "top_category", "kind": "multiclass", "source": "category_path[0]", "top_n": 20},
    {"name": "expensive", "kind": "binary", "source": "price", "threshold": 60},
]


@pytest.fixture(scope="module")
def evaluated(embedded_pipeline):
    """The evaluate stage once over the shared pipeline's table, sized for the test budget."""
    config, _ = embedded_pipeline
    settings = EvaluateConfig(
        probes=[TaskSpec(**spec) for spec in PROBES],
        folds=3,
        small_train_rows=300,
        forest_trees=20,
        tsne_rows=300,
        neighbour_queries=5,
        neighbours=4,
        tfidf_max_features=2000,
        retrieval_queries=30,
    )
    config = config.model_copy(update={"evaluate": settings})
    return config, run_stage("evaluate", config)


def test_probes_score_every_model_feature_and_setting(evaluated):
    _, result = evaluated
    scores = pd.read_csv(result.outputs["probes"], sep="\t")
    assert set(scores["task"]) == {"top_category", "expensive"}
    combos = scores.groupby("task")[["setting", "model", "features"]].apply(
        lambda part: set(map(tuple, part.to_numpy()))
    )
    expected = {
        (s, m, f)
        for s in ("full", "small")
        for m in ("logreg", "forest")
        for f in ("embedding", "tfidf")
    }
    assert all(found == expected for found in combos)
    assert (scores.loc[scores.setting == "small", "train_rows"] == 300).all()
    assert (scores["folds"] == 3).all() and scores["accuracy"].between(0, 1).all()
    # top-level category is written all over the titles: both features learn it well past
    # the majority class
    majority = scores.loc[scores.task == "top_category", "classes"].iloc[0]
    top = scores[(scores.task == "top_category") & (scores.setting == "full")]
    assert (top["accuracy"] > 1.5 / majority).all()
    relative = pd.read_csv(result.outputs["probes_relative"], sep="\t")
    row = relative[
        (relative.task == "top_category")
        & (relative.setting == "full")
        & (relative.model == "logreg")
        & (relative.metric == "accuracy")
    ].iloc[0]
    emb, tfidf = (
        top[(top.model == "logreg") & (top.features == f)]["accuracy"].iloc[0]
        for f in ("embedding", "tfidf")
    )
    assert row.relative == pytest.approx((emb - tfidf) / tfidf)
    # the synthetic training tasks read the whole category path and the price
    assert set(scores["trained_on"]) == {"category", "price"}


def test_head_reports_match_sklearn_on_the_test_split(evaluated):
    config, result = evaluated
    heads = pd.read_csv(result.outputs["heads"], sep="\t").set_index("task")
    assert {"subcategory", "item_type", "brand", "high_value", "leather"} <= set(heads.index)
    multiclass = heads[heads.kind == "multiclass"]
    assert (multiclass.accuracy <= multiclass.top3_accuracy).all()
    assert (multiclass.top3_accuracy <= multiclass.top5_accuracy).all()
    assert (multiclass.top5_accuracy > 5 / multiclass.outputs).all()  # heads beat guessing
    # every kind of head is reported with its own metrics
    assert heads.loc["category", "kind"] == "multilabel" and 0 < heads.loc["category", "micro_f1"]
    assert heads.loc["price", "rmse"] > 0 and np.isfinite(heads.loc["title_tfidf", "loss"])
    # the same numbers computed independently with scikit-learn from the registered model
    report = json.loads(Path(result.outputs["report"]).read_text())
    module = mlflow.pytorch.load_model(report["model_uri"], map_location="cpu")
    outputs, targets = [], []
    with torch.inference_mode():
        for batch in make_loader(config.outputs.shards, "test", 64, shuffle=False):
            mask = batch["subcategory_mask"].bool()
            outputs.append(module.mrnet(batch, tasks=["subcategory"])["subcategory"][mask])
            targets.append(batch["subcategory"][mask])
    scores, truth = torch.cat(outputs).numpy(), torch.cat(targets).numpy()
    row = heads.loc["subcategory"]
    assert row.test_rows == len(truth)
    labels = np.arange(scores.shape[1])
    for k, key in ((1, "accuracy"), (3, "top3_accuracy"), (5, "top5_accuracy")):
        assert row[key] == pytest.approx(top_k_accuracy_score(truth, scores, k=k, labels=labels))
    assert row.macro_f1 == pytest.approx(f1_score(truth, scores.argmax(1), average="macro"))


def test_pictures_neighbours_and_mlflow_artifacts(evaluated):
    config, result = evaluated
    assert Path(result.outputs["tsne"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    neighbours = pd.read_csv(result.outputs["neighbours"], sep="\t")
    assert len(neighbours) == 5 * 4 and (neighbours.query_id != neighbours.neighbour_id).all()
    assert neighbours.groupby("query_id")["cosine"].apply(lambda c: c.is_monotonic_decreasing).all()
    report = json.loads(Path(result.outputs["report"]).read_text())
    assert report["drift"] is None and "drift: the table has one version" in report["skipped"]
    mlflow.set_tracking_uri(f"sqlite:///{config.workdir / 'mlflow.db'}")
    run = MlflowClient().search_runs(
        [mlflow.get_experiment_by_name(config.tracking.experiment).experiment_id],
        "tags.`prodvec.stage` = 'evaluate'",
        order_by=["attributes.start_time DESC"],
    )[0]
    logged = {item.path for item in MlflowClient().list_artifacts(run.info.run_id, "evaluate")}
    assert {
        "evaluate/tsne.png",
        "evaluate/probes.tsv",
        "evaluate/heads.tsv",
        "evaluate/neighbours.tsv",
        "evaluate/report.json",
    } <= logged
    assert run.data.metrics["probe_top_category_full_logreg_embedding_accuracy"] == pytest.approx(
        result.metrics["probe_top_category_full_logreg_embedding_accuracy"]
    )


def test_retrieval_is_reported_for_embeddings_and_tfidf(evaluated):
    _, result = evaluated
    retrieval = json.loads(Path(result.outputs["report"]).read_text())["retrieval"]
    assert retrieval["queries"] == 30 and retrieval["k"] == 10
    assert len(set(retrieval["query_ids"])) == 30
    for features in ("embedding", "tfidf"):
        assert 0 < retrieval[f"mar_at_k_{features}"] <= 1
        assert result.metrics[f"retrieval_mar_at_k_{features}"] == retrieval[f"mar_at_k_{features}"]


def _retrieval_sample(vectors_follow_category: bool, titles_follow_category: bool) -> Sample:
    """6 leaf categories x 10 products; vectors and titles either carry the category (one
    cluster / one word each) or ignore it (noise / a word shared by all)."""
    rng = np.random.default_rng(3)
    leaf = np.repeat([f"leaf{c}" for c in range(6)], 10)
    centres = rng.normal(size=(6, 8)) * 10
    codes = np.repeat(np.arange(6), 10)
    vectors = (centres[codes] if vectors_follow_category else 0) + rng.normal(size=(60, 8))
    titles = np.array(
        [f"w{c} thing" if titles_follow_category else f"thing v{i}" for i, c in enumerate(codes)],
        dtype=object,
    )
    return Sample(
        np.array([f"p{i}" for i in range(60)], dtype=object),
        titles,
        leaf.astype(object),
        leaf.astype(object),
        {},
        vectors.astype(np.float32),
    )


def _title_words(sample: Sample) -> KeyedVectors:
    """Random 8-d vectors for every word of the sample's titles."""
    words = sorted({word for title in sample.titles for word in title.split()})
    vectors = KeyedVectors(vector_size=8)
    vectors.add_vectors(words, np.random.default_rng(5).normal(size=(len(words), 8)))
    return vectors


def _retrieval(sample: Sample, vectors: np.ndarray, queries: int = 12):
    return category_retrieval(
        vectors,
        sample.titles,
        sample.leaf_category,
        words=_title_words(sample),
        queries=queries,
        k=5,
        seed=0,
        tfidf_max_features=100,
    )


def test_retrieval_queries_are_the_titles_choice_spread_over_leaf_categories():
    """eProduct 3.1: the same queries whichever embeddings are judged (k-means++ over the
    titles' word vectors), dealt evenly over the leaf categories."""
    sample = _retrieval_sample(True, True)
    chosen = []
    for seed in (1, 2):
        vectors = np.random.default_rng(seed).normal(size=sample.vectors.shape)
        report, reason = _retrieval(sample, vectors.astype(np.float32))
        assert reason is None
        chosen.append(report["query_rows"])
    assert chosen[0] == chosen[1] and len(set(chosen[0])) == 12
    per_leaf = pd.Series(sample.leaf_category[chosen[0]]).value_counts()
    assert len(per_leaf) == 6 and set(per_leaf) == {2}


@pytest.mark.parametrize(
    "vectors_follow, titles_follow, embedding, tfidf",
    [
        (True, False, 1.0, "low"),
        (False, True, "low", 1.0),
    ],
)
def test_category_retrieval_scores_what_carries_the_category(
    vectors_follow, titles_follow, embedding, tfidf
):
    sample = _retrieval_sample(vectors_follow, titles_follow)
    report, reason = _retrieval(sample, sample.vectors)
    assert reason is None and report["queries"] == 12 and report["k"] == 5
    for features, expected in (("embedding", embedding), ("tfidf", tfidf)):
        value = report[f"mar_at_k_{features}"]
        assert value == pytest.approx(1.0) if expected == 1.0 else value < 0.5, (features, value)


def test_category_retrieval_needs_shared_categories():
    sample = _retrieval_sample(True, True)
    unique = Sample(
        sample.product_ids,
        sample.titles,
        sample.top_category,
        np.array([f"only{i}" for i in range(60)], dtype=object),
        {},
        sample.vectors,
    )
    report, reason = _retrieval(unique, unique.vectors, queries=10)
    assert report is None and "0 sampled products share a leaf category" in reason


# ---- drift -----------------------------------------------------------------------------


def _rotation(dims: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dims, dims)))
    return q


BASE = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)


@pytest.mark.parametrize(
    "new, cosine_mean, overlap_mean",
    [
        (BASE, 1.0, 1.0),  # unchanged
        (BASE * 3.0, 1.0, 1.0),  # rescaled: same directions
        (BASE @ _rotation(16, 1), None, 1.0),  # rotated: neighbours kept, vectors moved
        (np.random.default_rng(5).normal(size=(300, 16)), None, None),  # a different model
        (BASE[:, :8], "skipped", None),  # new dimension: overlap only
    ],
    ids=["same", "scaled", "rotated", "unrelated", "new-dims"],
)
def test_embedding_drift(new, cosine_mean, overlap_mean):
    report = embedding_drift(BASE, new.astype(np.float32), k=10)
    assert report["compared"] == 300 and report["k"] == 10
    if cosine_mean == "skipped":
        assert (
            report["cosine"] is None and "dimensions differ (16 -> 8)" in report["cosine_skipped"]
        )
    elif cosine_mean is not None:
        assert report["cosine"]["mean"] == pytest.approx(cosine_mean, abs=1e-5)
    else:
        assert report["cosine"]["mean"] < 0.5
    if overlap_mean is not None:
        assert report["overlap"]["mean"] == pytest.approx(overlap_mean)
    else:
        assert report["overlap"]["mean"] < 0.5
    assert report["overlap"]["p1"] <= report["overlap"]["p50"] <= report["overlap"]["p99"]


def test_embedding_drift_needs_aligned_rows():
    with pytest.raises(EvaluateError, match="aligned rows: 300 old, 10 new"):
        embedding_drift(BASE, BASE[:10], k=10)


def _commit(spark, table: EmbeddingTable, ids: list[str], vectors: np.ndarray, app: str):
    frame = spark.createDataFrame(
        [(pid, f"h-{pid}", vector.tolist()) for pid, vector in zip(ids, vectors, strict=True)],
        "product_id string, content_hash string, embedding array<float>",
    )
    table.commit(
        frame,
        app_id=app,
        run_id=app,
        mode="full",
        model_uri=f"models:/m/{app}",
        model_name="m",
        model_version=app,
        config_hash="c",
        dimension=vectors.shape[1],
    )


def test_table_drift_counts_products_and_compares_the_shared(spark, tmp_path):
    table = EmbeddingTable(tmp_path / "table")
    ids = [f"p{i:04d}" for i in range(300)]
    _commit(spark, table, ids[:250], BASE[:250], "1")
    moved = BASE @ _rotation(16, 2)
    _commit(spark, table, ids[50:], moved[50:], "2")  # 50 gone, 50 new, 200 shared
    report = table_drift(spark, table, 0, 1, k=5, max_rows=120, seed=3)
    assert (report["shared"], report["only_old"], report["only_new"]) == (200, 50, 50)
    assert report["compared"] == 120 and report["overlap"]["mean"] == pytest.approx(1.0)
    assert report["cosine"]["p99"] < 0.9
    with pytest.raises(EvaluateError, match="has no version 2"):
        table_drift(spark, table, 0, 2)


# ---- probe mechanics on tiny data --------------------------------------------------------


def _sample(labels: list[str | None], seed: int = 0) -> Sample:
    n = len(labels)
    words = np.array(["red shoe", "blue lamp", "green mug"])
    return Sample(
        np.array([f"p{i}" for i in range(n)], dtype=object),
        np.array([words[i % 3] for i in range(n)], dtype=object),
        np.array(["a"] * n, dtype=object),
        np.array(["a"] * n, dtype=object),
        {"t": np.array(labels, dtype=object)},
        np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32),
    )


@pytest.mark.parametrize(
    "labels, top_n, expect_rows, expect_labels, rare",
    [
        (["a", "a", "b", "b", None], 5, [0, 1, 2, 3], ["a", "a", "b", "b"], 0),
        (["a", "a", "b", "c", "c"], 5, [0, 1, 3, 4], ["a", "a", "c", "c"], 1),  # b alone
        (["a", "a", "a", "b", "c"], 1, [0, 1, 2, 3, 4], ["a"] * 3 + ["other"] * 2, 0),  # top 1
    ],
)
def test_encode_labels(labels, top_n, expect_rows, expect_labels, rare):
    task = TaskSpec(name="t", kind="multiclass", source="brand", top_n=top_n)
    rows, encoded, left_out = encode_labels(np.array(labels, dtype=object), task)
    assert rows.tolist() == expect_rows and encoded.tolist() == expect_labels
    assert left_out == rare


@pytest.mark.parametrize(
    "labels, folds, rows, left_out, reasons",
    [
        (["x", "y", "z"] * 3, 3, 9, 0, ["3 folds, not 5", "no small-training-set variant"]),
        (["x"] * 6 + ["y"] * 6 + ["z"] * 2, 5, 12, 2, ["no small-training-set variant"]),  # z out
        (["x"] * 6 + ["y"] * 2 + [None], 2, 8, 0, ["2 folds, not 5", "no small-training-set"]),
    ],
)
def test_plan_probe_keeps_the_folds_and_leaves_out_rare_classes(
    labels, folds, rows, left_out, reasons
):
    settings = EvaluateConfig(folds=5, small_train_rows=10, forest_trees=5)
    task = TaskSpec(name="t", kind="multiclass", source="brand", top_n=5)
    plan, skipped = plan_probe(_sample(labels), task, settings, 0, None)
    assert (plan.folds, len(plan.rows), plan.left_out) == (folds, rows, left_out)
    assert list(plan.splits) == ["full"] and len(plan.splits["full"]) == folds
    assert len(skipped) == len(reasons)
    assert all(reason in said for reason, said in zip(reasons, skipped, strict=True))


def test_plan_probe_with_one_class_says_so():
    task = TaskSpec(name="t", kind="multiclass", source="brand", top_n=5)
    plan, skipped = plan_probe(_sample(["x"] * 4 + [None]), task, EvaluateConfig(), 0, None)
    assert plan is None and "1 class(es) among 4 labelled products" in skipped[0]


def test_probe_fits_on_spark_equal_the_fits_run_here(spark):
    settings = EvaluateConfig(folds=3, small_train_rows=20, forest_trees=5, tfidf_max_features=50)
    task = TaskSpec(name="t", kind="multiclass", source="brand", top_n=5)
    sample = _sample(["x", "y", "z"] * 20, seed=1)  # the title names the class
    plan, _ = plan_probe(sample, task, settings, 0, None)
    here = run_probes([plan], sample, settings, 0)
    on_spark = run_probes([plan], sample, settings, 0, spark)
    assert len(here) == 2 * 2 * 2  # settings x models x features
    assert pd.DataFrame(on_spark).equals(pd.DataFrame(here))
    full = {(row["model"], row["features"]): row for row in here if row["setting"] == "full"}
    assert full["logreg", "tfidf"]["accuracy"] == 1.0  # the titles carry the label
    assert full["logreg", "embedding"]["accuracy"] < 0.7  # random vectors do not
    assert full["logreg", "tfidf"]["rows"] == 60 and full["logreg", "tfidf"]["folds"] == 3


def test_relative_difference_is_the_papers():
    scores = pd.DataFrame(
        [
            {
                "task": "t",
                "setting": "full",
                "model": "logreg",
                "features": f,
                "accuracy": a,
                "macro_f1": m,
            }
            for f, a, m in (("embedding", 0.9, 0.6), ("tfidf", 0.75, 0.8))
        ]
    )
    relative = relative_differences(scores).set_index("metric")["relative"]
    assert relative["accuracy"] == pytest.approx(0.2)
    assert relative["macro_f1"] == pytest.approx(-0.25)


@pytest.mark.parametrize(
    "source, train_tasks, expected",
    [
        ("category_path[0]", [], "category"),  # the multilabel task reads every level
        ("category_path[0]", ["brand"], None),
        ("attributes.color", [], "color"),
        ("locale", [], None),
    ],
)
def test_trained_on_names_the_task_reading_the_probe(source, train_tasks, expected):
    config = load_config(overrides=[f"train.tasks={json.dumps(train_tasks)}"])
    probe_task = TaskSpec(name="p", kind="multiclass", source=source, top_n=3)
    assert trained_on(probe_task, trained_sources(config)) == expected


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "evaluate.probes=[{name: w, kind: regression, source: price}]",
            "probes are tasks of kinds \\['binary', 'multiclass'\\]",
        ),
        ("evaluate.top_k=[0, 3]", "top_k must be >= 1"),
        ("evaluate.folds=1", "folds"),
    ],
)
def test_bad_evaluate_config_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_no_table_is_a_clear_error(spark, tmp_path, shared_tracking):
    config = load_config(overrides=[f"workdir={tmp_path}", shared_tracking])
    with pytest.raises(EvaluateError, match="no embedding table at .*run `prodvec embed`"):
        run_stage("evaluate", config, spark)


# ---- a real catalog --------------------------------------------------------------------------


@pytest.mark.shared_data
def test_flipkart_embeddings_carry_the_categories_they_were_not_trained_on(
    spark, shared_data, tmp_path
):
    """MRNet Table 2 on a real catalog: the default MRNet (subword bag, contrastive objective
    beside the heads; 8 epochs here) trained on brand, price and title decoding only, then the
    evaluate stage probes category level 1, which the model never saw, retrieves by leaf
    category and finds perturbed copies (the README's figures: the same setup, 20 epochs, 5
    folds, three levels)."""
    config = load_config(
        ["flipkart"],
        [
            f"workdir={tmp_path}",
            f"catalog.path={shared_data / 'flipkart/flipkart_products.csv'}",
            "train.distributed=false",
            "train.epochs=8",
            "train.tasks=[brand, high_value, price, title_tfidf]",
            "evaluate.probes=[{name: level1, kind: multiclass, source: 'category_path[1]', top_n: 100}]",
            "evaluate.folds=3",
            "evaluate.forest_trees=20",
            "evaluate.tsne_rows=0",
            "evaluate.retrieval_queries=100",
            "evaluate.neighbour_queries=0",
        ],
    )
    for stage in ("clean", "corpus", "shard", "train", "embed"):
        run_stage(stage, config, spark)
    result = run_stage("evaluate", config, spark)
    report = json.loads(Path(result.outputs["report"]).read_text())
    scores = pd.DataFrame(report["probes"]).set_index(["setting", "model", "features"])
    assert (scores["trained_on"] == "").all()  # a held-out task
    classes = scores["classes"].iloc[0]
    logreg = scores.loc[("full", "logreg", "embedding")]
    small = {
        features: scores.loc[("small", "logreg", features)] for features in ("embedding", "tfidf")
    }
    print(
        f"flipkart level 1 ({classes} classes): logreg accuracy {logreg.accuracy:.3f}; "
        f"1,500 labels: macro-F1 embedding {small['embedding'].macro_f1:.3f} vs TF-IDF "
        f"{small['tfidf'].macro_f1:.3f}; retrieval MAR@10 "
        f"{report['retrieval']['mar_at_k_embedding']:.3f} vs "
        f"{report['retrieval']['mar_at_k_tfidf']:.3f}"
    )
    assert logreg.accuracy > 0.7  # the most frequent class holds about a fifth
    assert small["embedding"].macro_f1 > small["tfidf"].macro_f1  # dense wins with few labels
    assert report["retrieval"]["mar_at_k_embedding"] > 0.5
    matching = report["matching"]
    print(f"perturbed copies found at 10: embedding {matching['embedding']['recall_at_k']:.3f} "
          f"vs TF-IDF {matching['tfidf']['recall_at_k']:.3f}")  # fmt: skip
    # The product's promise: the table finds the same product at least as often as TF-IDF.
    assert matching["embedding"]["recall_at_k"] >= matching["tfidf"]["recall_at_k"]
