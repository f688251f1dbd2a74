"""Evaluate stage: how good the embeddings of one table version are, and how far they moved
since the previous version. The analyses live in `pipelines.analysis`; this stage runs them on
one sample and writes `report.json`, TSVs and pictures under `Outputs.evaluation(version)`.

1. Probes (MRNet Table 2, `analysis.probes`): classifiers on the embeddings against the same
   classifiers on TF-IDF of titles, for `evaluate.probes` (tasks the model should not have
   been trained on; a probe whose source a trained task reads is reported with `trained_on`).
2. Reports of every trained head on the shards' test split, whatever the model type and the
   head's kind: the metrics validation computes during training (`pipelines.tasks`).
3. Retrieval (`analysis.retrieval`): eProduct's MAR@k with the leaf category as ground truth,
   embeddings against TF-IDF of titles, on queries chosen as eProduct 3.1 chose them (the
   corpus stage's word vectors averaged over each title, k-means++ within each leaf
   category): the same queries whichever model is judged (`retrieval.query_ids`).
4. Pictures (`analysis.pictures`): a t-SNE of the sample and a nearest-neighbour table.
5. Drift (`analysis.drift`) between the previous version and this one.

Only a product_id hash sample of `max_rows` reaches the driver (`analysis.sample`). Every part
that cannot run on the data it got (too few rows or classes, per-group models) is skipped
with its reason in `report.json`, never a crash, so `prodvec run` on a tiny catalog finishes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from gensim.models import KeyedVectors
from pyspark.sql import SparkSession

from models.mrnet import TaskHead
from pipelines.analysis.drift import table_drift
from pipelines.analysis.matching import anisotropy, match_report, perturb
from pipelines.analysis.pictures import neighbour_table, tsne_figure
from pipelines.analysis.probes import (
    plan_probe,
    relative_differences,
    run_probes,
    trained_on,
    trained_sources,
)
from pipelines.analysis.retrieval import category_retrieval
from pipelines.analysis.sample import Sample, collect_sample
from pipelines.core.config import Config
from pipelines.core.errors import CorpusError, EvaluateError
from pipelines.core.outputs import StageResult, check_corpus
from pipelines.data.catalog import mapped_tasks
from pipelines.data.shards import MANIFEST, load_manifest, shard_sets
from pipelines.model_types.registry import model_type_of
from pipelines.model_types.serving import (
    default_model_uri,
    embed_batch,
    input_columns,
    prepare_model,
)
from pipelines.table import EmbeddingTable
from pipelines.tasks import TaskMetrics, task_loss
from pipelines.training.loader import make_loader

__all__ = ["head_reports", "run"]

log = logging.getLogger(__name__)


def head_reports(config: Config, model_uri: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Every task head of the registered model on the shards' test split, with the metrics
    its kind computes in validation (accuracy, macro-F1 and top-k for multiclass, micro- and
    macro-F1 for multilabel, RMSE for regression...)."""
    shard_dir = config.outputs.shards
    if not (shard_dir / MANIFEST).is_file():
        return [], [f"heads: no shards at {shard_dir} (run `prodvec shard`)"]
    if None not in shard_sets(shard_dir):
        return [], ["heads: per-group models have one head set per group"]
    module = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    served = model_type_of(module)
    network = served.heads(module) if served is not None else None
    if network is None:
        return [], [f"heads: {type(module).__name__} has no single set of task heads"]
    if load_manifest(shard_dir)["splits"]["test"] == 0:
        return [], ["heads: the test split is empty"]
    top_k = tuple(config.evaluate.top_k)
    heads = cast(Sequence[TaskHead], network.tasks)
    states = [TaskMetrics(head, torch.device("cpu"), top_k) for head in heads]
    network.eval()
    with torch.inference_mode():
        for batch in make_loader(shard_dir, "test", config.evaluate.head_batch_size, shuffle=False):
            outputs = network(batch)
            for state in states:
                name = state.head.name
                output, target, mask = outputs[name], batch[name], batch[f"{name}_mask"]
                state.update(output, target, mask, task_loss(output, target, mask, state.head))
    reports = []
    for state in states:
        metrics = state.compute()
        if metrics:
            reports.append(
                {
                    "task": state.head.name,
                    "kind": state.head.kind,
                    "outputs": state.head.num_outputs,
                    "test_rows": state.labelled,
                    **metrics,
                }
            )
    return reports, []


def matching_report(config: Config, sample: Sample, model_uri: str
                    ) -> tuple[dict[str, Any] | None, str | None]:  # fmt: skip
    """The matching report over the sample (`analysis.matching`), or why it cannot run: the
    perturbed titles go through the registered model here, as the embed stage feeds it."""
    settings = config.evaluate
    queries = min(settings.matching_queries, len(sample.titles))
    if queries < 1 or len(sample.titles) < 2:
        return None, "matching: evaluate.matching_queries is 0 or the sample is too small"
    spec = prepare_model(model_uri, config.outputs.model_cache)
    if input_columns(spec) != ["title"]:
        return None, (f"matching: the model reads {input_columns(spec)}; the report perturbs "
                      "titles alone (title-only models)")  # fmt: skip
    picked = np.random.default_rng(config.seed + 17).choice(len(sample.titles), queries,
                                                           replace=False)  # fmt: skip
    perturbed = perturb(
        [str(t) for t in sample.titles[picked]],
        config.seed + 29,
        settings.matching_word_dropout,
        settings.matching_char_noise,
    )
    vectors = embed_batch(spec, pa.RecordBatch.from_pydict({"title": perturbed}),
                          torch.device("cpu"), config.embed.batch_size)  # fmt: skip
    report = match_report(sample.titles, sample.vectors, picked, vectors, perturbed,
                          settings.retrieval_k)  # fmt: skip
    report["perturbation"] = {
        "word_dropout": settings.matching_word_dropout,
        "char_noise": settings.matching_char_noise,
    }
    return report, None


def _write_tsv(frame: pd.DataFrame, path: Path) -> str:
    frame.to_csv(path, sep="\t", index=False)
    return str(path)


def _metric_name(*parts: Any) -> str:
    return "_".join(str(part) for part in parts)


def _corpus_problem(config: Config) -> str | None:
    """Why the corpus stage's word vectors cannot be read, or None."""
    try:
        check_corpus(config.outputs)
    except CorpusError as err:
        return str(err)
    return None


def run(spark: SparkSession, config: Config) -> StageResult:
    probes = mapped_tasks(config.catalog, config.evaluate.probes, "evaluate.probes")
    settings = config.evaluate.model_copy(update={"probes": probes})
    config = config.model_copy(update={"evaluate": settings})
    table = EmbeddingTable.from_config(config)
    latest = table.version() if table.exists() else None
    if latest is None:
        raise EvaluateError(f"no embedding table at {table.uri}: run `prodvec embed` first")
    version = latest if settings.version is None else settings.version
    if version > latest:
        raise EvaluateError(f"evaluate.version {version}: {table.uri} has versions 0-{latest}")
    out = config.outputs.evaluation(version)
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
            log.warning(
                "evaluate: probe '%s' reads %s, which trained task '%s' also reads: "
                "not a held-out task",
                task.name,
                task.source,
                trained,
            )
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
                metrics[
                    _metric_name(
                        "probe", row["task"], row["setting"], row["model"], row["features"], metric
                    )
                ] = row[metric]
        for row in relative.itertuples():
            metrics[
                _metric_name("probe", row.task, row.setting, row.model, row.metric, "relative")
            ] = row.relative
    elif not settings.probes:
        skipped.append("probes: evaluate.probes is empty")

    model_uri = table.commit_info(version).get("model_uri") or default_model_uri(config)
    heads, heads_skipped = head_reports(config, model_uri)
    skipped += heads_skipped
    if heads:
        outputs["heads"] = _write_tsv(pd.DataFrame(heads), out / "heads.tsv")
        for row in heads:
            metrics.update(
                {
                    _metric_name("head", row["task"], key): row[key]
                    for key in row
                    if key not in ("task", "kind", "outputs", "test_rows")
                }
            )
        rows["head_test"] = max(row["test_rows"] for row in heads)

    retrieval = None
    if not settings.retrieval_queries:
        skipped.append("retrieval: evaluate.retrieval_queries is 0")
    elif corpus := _corpus_problem(config):
        skipped.append(f"retrieval: its queries are chosen by the corpus's word vectors: {corpus}")
    else:
        retrieval, reason = category_retrieval(
            sample.vectors,
            sample.titles,
            sample.leaf_category,
            words=KeyedVectors.load(str(config.outputs.word2vec), mmap="r"),
            queries=settings.retrieval_queries,
            k=settings.retrieval_k,
            seed=config.seed,
            tfidf_max_features=settings.tfidf_max_features,
        )
        if reason:
            skipped.append(reason)
        elif retrieval is not None:
            retrieval["query_ids"] = sample.product_ids[retrieval.pop("query_rows")].tolist()
            metrics.update(
                {
                    f"retrieval_{key}": value
                    for key, value in retrieval.items()
                    if key.startswith("mar_at_k") or (key == "relative" and value is not None)
                }
            )

    tsne_rows = min(settings.tsne_rows, len(sample.vectors))
    if tsne_rows >= 10:
        figure = tsne_figure(
            sample.vectors[:tsne_rows], sample.top_category[:tsne_rows], config.seed
        )
        outputs["tsne"] = str(out / "tsne.png")
        figure.savefig(outputs["tsne"])
    else:
        skipped.append(f"t-SNE: {tsne_rows} products sampled (needs 10; evaluate.tsne_rows)")
    queries = min(settings.neighbour_queries, len(sample.vectors))
    if queries and len(sample.vectors) >= 2:
        outputs["neighbours"] = _write_tsv(
            neighbour_table(sample, queries, settings.neighbours, config.seed),
            out / "neighbours.tsv",
        )
    else:
        skipped.append("neighbour table: fewer than 2 products or no queries asked")

    matching, reason = matching_report(config, sample, model_uri)
    if reason:
        skipped.append(reason)
    if matching is not None:
        for features in ("embedding", "tfidf"):
            metrics.update({f"matching_{features}_{key}": value
                            for key, value in matching[features].items()})  # fmt: skip
    spread = None
    if settings.anisotropy_rows >= 2 and len(sample.vectors) >= 2:
        spread = anisotropy(sample.vectors, settings.anisotropy_rows, config.seed)
        metrics["anisotropy_mean_cosine"] = spread

    drift = None
    if version >= 1:
        drift = table_drift(
            spark,
            table,
            version - 1,
            version,
            k=settings.drift_k,
            max_rows=settings.drift_max_rows,
            seed=config.seed,
        )
        (out / "drift.json").write_text(json.dumps(drift, indent=1))
        outputs["drift"] = str(out / "drift.json")
        rows["drift_shared"] = drift["shared"]
        for part in ("cosine", "overlap"):
            if drift.get(part):
                metrics.update({f"drift_{part}_{key}": value for key, value in drift[part].items()})
    else:
        skipped.append("drift: the table has one version")

    report = {
        "table": table.uri,
        "version": version,
        "model_uri": model_uri,
        "rows": rows,
        "probes": scores,
        "relative": relative.to_dict("records"),
        "heads": heads,
        "retrieval": retrieval,
        "matching": matching,
        "anisotropy_mean_cosine": spread,
        "drift": drift,
        "skipped": skipped,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    outputs["report"] = str(out / "report.json")
    for reason in skipped:
        log.info("evaluate: skipped %s", reason)
    if mlflow.active_run() is not None:
        mlflow.log_artifacts(str(out), "evaluate")
        mlflow.set_tags({"prodvec.evaluate.table_version": str(version)})
    return StageResult(
        rows=rows, outputs=outputs, metrics={key: float(value) for key, value in metrics.items()}
    )
