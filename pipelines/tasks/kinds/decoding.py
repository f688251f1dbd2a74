"""decoding: reconstruct the title's (or description's) TF-IDF vector over the `vocab_size`
terms in most train documents (MRNet's 5000-d title decoding); squared distance."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from pyspark.sql import Column
from pyspark.sql import functions as F
from torch import Tensor

from models.mrnet import TaskHead
from pipelines.data.shards import BatchField
from pipelines.data.tokenizer import tokens
from pipelines.tasks.contract import RANK, FittedTask, TaskKind, label_index, register

if TYPE_CHECKING:
    from pipelines.tasks.contract import TaskSpec

__all__ = ["Decoding"]


class Decoding(TaskKind):
    name = "decoding"
    options = ("vocab_size",)

    def check(self, spec: TaskSpec) -> None:
        if spec.source not in ("title", "description"):
            raise ValueError(f"task '{spec.name}': decoding reads 'title' or 'description'")

    def raw(self, spec: TaskSpec) -> Column:
        return tokens(spec.source)

    def train_aggregates(self, spec: TaskSpec, raw: Column) -> list[Column]:
        return [F.count_if(F.size(raw) > 0).alias(f"{spec.name}__n")]  # train documents

    def counted_values(self, spec: TaskSpec, raw: Column) -> Column:
        tag = F.lit(spec.name).alias("task")  # document frequency: each term once a document
        return F.transform(F.array_distinct(raw), lambda term: F.struct(tag, term.alias("value")))

    def keep_counted(self, spec: TaskSpec) -> Column:
        return (F.col("task") == spec.name) & (F.col(RANK) <= spec.vocab_size)

    def finish_fit(self, fitted: FittedTask) -> None:
        """sklearn's smooth IDF over the group's N train documents: ln((1 + N) / (1 + df)) + 1."""
        documents = fitted.train_labelled
        fitted.idf = [math.log((1 + documents) / (1 + df)) + 1 for df in fitted.counts]

    def num_outputs(self, fitted: FittedTask | Mapping[str, Any]) -> int:
        labels = fitted.labels if isinstance(fitted, FittedTask) else fitted["labels"]
        return len(labels)

    def shard_columns(self, fitted: FittedTask, raw: Column) -> list[Column]:
        """(indices, values) of the L2-normalised TF-IDF vector, ascending indices; both null
        when no token is in the vocabulary. Raw counts as TF (sklearn's)."""
        index = label_index(fitted.labels)
        idf = F.lit(np.array(fitted.idf or [0.0], dtype=np.float64))
        found = F.filter(
            F.transform(raw, lambda term: F.try_element_at(index, term)), lambda i: i.isNotNull()
        )
        unique = F.array_sort(F.array_distinct(found))
        weights = F.transform(
            unique, lambda i: F.size(F.filter(found, lambda j: j == i)) * F.element_at(idf, i + 1)
        )
        norm = F.sqrt(F.aggregate(weights, F.lit(0.0), lambda acc, w: acc + w * w))
        values = F.transform(weights, lambda w: (w / norm).cast("float"))
        present = F.size(unique) > 0
        indices_name, values_name = self.column_names(fitted.spec.name)
        return [
            F.when(present, unique).alias(indices_name),
            F.when(present, values).alias(values_name),
        ]

    def column_names(self, name: str) -> list[str]:
        return [f"{name}_idx", f"{name}_val"]

    def batch_fields(self, entry: Mapping[str, Any]) -> list[BatchField]:
        indices, values = self.column_names(entry["name"])
        return [
            BatchField(
                entry["name"],
                "sparse",
                indices,
                np.dtype(np.float32),
                int(entry["num_outputs"]),
                values,
                True,
            )
        ]

    def row_loss(self, output: Tensor, target: Tensor, head: TaskHead) -> Tensor:
        return (output - target).square().sum(dim=1)


register(Decoding())
