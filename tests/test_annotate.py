"""Annotation helpers (ProductNet "local models") on small synthetic pools."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.analysis.annotate import (
    MixedSampler,
    Oracle,
    keyword_candidates,
    keyword_hits,
    knn_candidates,
    shares_to_counts,
    simulate,
    suggest,
    uncertainty_candidates,
)
from pipelines.core.errors import AnnotationError


def _pool(n: int = 600, positives: float = 0.05, seed: int = 0):
    """A pool where the positive category is one tight cluster among 19 others; a third of
    positive titles say 'lamp', as does a sprinkle of negatives."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, 16)) * 3
    truth = rng.random(n) < positives
    cluster = np.where(truth, 0, rng.integers(1, 20, size=n))
    vectors = (centres[cluster] + rng.normal(size=(n, 16))).astype(np.float32)
    lamp = (truth & (rng.random(n) < 0.33)) | (~truth & (rng.random(n) < 0.02))
    titles = np.where(lamp, "brass desk lamp", "plain product").astype(object)
    return vectors, titles, truth


def test_knn_suggests_the_unlabelled_nearest_to_a_positive():
    vectors = np.array(
        [[1, 0], [0.99, 0.1], [0.9, 0.4], [0, 1], [-1, 0], [1, 0.05]], dtype=np.float32
    )
    picked = knn_candidates(vectors, {0: True, 5: False, 4: False}, 2)
    assert picked.tolist() == [1, 2]


@pytest.mark.parametrize(
    "keywords, labels, n, expected",
    [
        (["lamp"], {}, 5, {0, 2}),
        (["lamp", "desk"], {}, 1, {2}),  # two keywords beat one
        (["LAMP"], {2: True}, 5, {0}),  # labelled rows are never suggested
        (["sofa"], {}, 5, set()),  # no match: nothing, not random rows
    ],
)
def test_keyword_candidates(keywords, labels, n, expected):
    titles = np.array(["red lamp", "blue mug", "desk lamp", None, "lampshade"], dtype=object)
    assert set(keyword_candidates(titles, labels, keywords, n).tolist()) == expected


def test_keyword_hits_count_tokens_not_substrings():
    titles = np.array(["lamp lamp desk", "lampshade", None], dtype=object)
    assert keyword_hits(titles, ["lamp", "desk"]).tolist() == [3, 0, 0]


@pytest.mark.parametrize("learner", ["logreg", "naive_bayes", "mlp"])
def test_uncertainty_asks_about_the_boundary(learner):
    x = np.linspace(-3, 3, 61, dtype=np.float32)[:, None]
    vectors = np.hstack([x, np.zeros_like(x)])
    labels = {0: False, 8: False, 16: False, 44: True, 52: True, 60: True}
    picked = uncertainty_candidates(vectors, labels, 5, learner, seed=0)
    assert len(picked) == 5 and np.abs(x[picked, 0]).max() < 1.6


def test_mixed_takes_a_share_of_each_source_without_repeats():
    vectors, titles, truth = _pool()
    labels = {int(i): True for i in np.flatnonzero(truth)[:3]}
    labels.update({int(i): False for i in np.flatnonzero(~truth)[:3]})
    picked = suggest(vectors, titles, labels, 30, "mixed", keywords=["lamp"], seed=1)
    assert len(picked) == len(set(picked.tolist())) == 30
    assert not set(picked.tolist()) & set(labels)
    knn = knn_candidates(vectors, labels, 30)
    assert picked[0] == knn[0]
    # no keyword and no negative: only knn can run, and mixed still answers
    only_positive = {k: v for k, v in labels.items() if v}
    assert (
        suggest(vectors, titles, only_positive, 5, "mixed").tolist()
        == knn_candidates(vectors, only_positive, 5).tolist()
    )


@pytest.mark.parametrize(
    "shares, n, expected",
    [
        (
            {"knn": 0.5, "keyword": 0.5, "uncertainty": 0.5},
            30,
            {"knn": 10, "keyword": 10, "uncertainty": 10},
        ),
        # one each, then 17 by share (10.2, 5.67, 1.13), the largest remainder rounded up
        (
            {"knn": 0.9, "keyword": 0.5, "uncertainty": 0.1},
            20,
            {"knn": 11, "keyword": 7, "uncertainty": 2},
        ),
        ({"knn": 0.9, "keyword": 0.1}, 1, {"knn": 1, "keyword": 0}),  # fewer slots than sources
        ({"knn": 0.2}, 7, {"knn": 7}),
    ],
)
def test_shares_to_counts(shares, n, expected):
    assert shares_to_counts(shares, n) == expected


def test_mixed_sampler_gives_the_source_that_hits_a_larger_share():
    vectors, titles, truth = _pool()
    labels = {int(i): True for i in np.flatnonzero(truth)[:3]}
    labels.update({int(i): False for i in np.flatnonzero(~truth)[:3]})
    mixer = MixedSampler()
    for round_ in range(3):
        picked = mixer.suggest(vectors, titles, labels, 15, keywords=["plain"], seed=round_)
        revealed = {int(row): bool(truth[row]) for row in picked}
        mixer.update(revealed)
        labels.update(revealed)
    # knn finds the positives' cluster; "plain" is the negatives' word: knn's share grows
    assert mixer.positives["knn"] > mixer.positives["keyword"]
    assert mixer.asked["knn"] > mixer.asked["keyword"] and mixer.asked["keyword"] >= 3
    assert not mixer.proposed  # every proposal was credited


def test_simulation_mixed_finds_more_positives_than_random_and_spends_the_budget():
    vectors, titles, truth = _pool()
    found = {}
    for strategy in ("random", "keyword", "mixed"):
        oracle = Oracle(truth)
        seeds = oracle.reveal(
            np.concatenate([np.flatnonzero(truth)[:3], np.flatnonzero(~truth)[:3]])
        )
        found[strategy] = simulate(
            vectors, titles, oracle, seeds, strategy, budget=60, batch=10, keywords=["lamp"], seed=2
        )
        assert oracle.requests == 6 + 60
    # ~30 positives in the pool: mixed finds most, random ~5% of 60, keyword ~10 lamps
    assert found["mixed"] > 2 * max(found["random"], 1)
    assert found["mixed"] > found["keyword"]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda v, t: knn_candidates(v, {1: False}, 3), "at least one positive"),
        (lambda v, t: uncertainty_candidates(v, {1: True, 2: True}, 3), "positive and negative"),
        (lambda v, t: suggest(v, t, {999: True}, 3, "knn"), r"rows \[999\] are outside"),
        (lambda v, t: suggest(v, t, {1: True}, 3, "bogus"), "unknown strategy 'bogus'"),
        (lambda v, t: suggest(v, t, {1: True}, 0, "knn"), "n=0"),
        (lambda v, t: suggest(v, t[:5], {1: True}, 3, "knn"), "600 vectors but 5 titles"),
        (lambda v, t: keyword_candidates(t, {}, [" "], 3), "at least one keyword"),
        (lambda v, t: uncertainty_candidates(v, {1: True, 2: False}, 3, "svm"), "unknown learner"),
    ],
)
def test_bad_requests_name_the_problem(call, message):
    vectors, titles, _ = _pool()
    with pytest.raises(AnnotationError, match=message):
        call(vectors, titles)
