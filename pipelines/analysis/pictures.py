"""Pictures of an embedding sample for people: a t-SNE map coloured by top-level category, and
a nearest-neighbour table of sample products."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.manifold import TSNE

from pipelines.analysis.retrieval import (
    exact_neighbours,
    others,
)
from pipelines.analysis.sample import Sample

__all__ = ["neighbour_table", "tsne_figure"]


def tsne_figure(vectors: np.ndarray, categories: np.ndarray, seed: int, legend: int = 12) -> Figure:
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
        axes.scatter(
            points[chosen, 0],
            points[chosen, 1],
            s=4,
            label=str(name)[:30],
            color=colours(index % 20),
        )
    axes.set_title(f"t-SNE of {len(vectors):,} product embeddings by top-level category")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend(markerscale=3, fontsize=7, loc="best")
    figure.tight_layout()
    return figure


def neighbour_table(sample: Sample, queries: int, k: int, seed: int) -> pd.DataFrame:
    """Sample products and their k nearest other products of the sample, with titles."""
    k = min(k, len(sample.vectors) - 1)
    picked = np.random.default_rng(seed).choice(len(sample.vectors), size=queries, replace=False)
    found_scores, found = exact_neighbours(sample.vectors, sample.vectors[picked], k + 1)
    indices, kept_scores = others(found, picked, k, found_scores)
    scores = kept_scores if kept_scores is not None else np.zeros(indices.shape)
    return pd.DataFrame(
        {
            "query_id": np.repeat(sample.product_ids[picked], k),
            "query_title": np.repeat(sample.titles[picked], k),
            "rank": np.tile(np.arange(1, k + 1), len(picked)),
            "neighbour_id": sample.product_ids[indices.ravel()],
            "neighbour_title": sample.titles[indices.ravel()],
            "cosine": scores.ravel().round(4),
        }
    )
