"""The baselines against hand-computed cases, and selection that never reads the test split."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from training.baselines import (
    GRIDS,
    Validator,
    blend,
    cosine_neighbours,
    ease,
    ease_keep,
    ease_solve,
    fit_baselines,
    fit_blend,
    interactions,
    itemknn,
    popularity,
    standardise,
)
from training.data.splits import make_split
from training.data.synthetic import make_synthetic
from training.evaluate import rank_full, rank_sampled, table_scorer


def test_popularity_scores_training_counts() -> None:
    xt = interactions(np.array([[0, 1], [1, 1], [1, 2], [1, 2]]), 2, 3)
    got = popularity(xt)(np.array([0, 1]))
    np.testing.assert_array_equal(got.numpy(), [[0, 2, 1], [0, 2, 1]])  # (1, 2) counts once


def test_itemknn_cosine_by_hand() -> None:
    # u0: {0, 1}, u1: {0, 1, 2}, u2: {2}; every item has 2 users
    xt = interactions(np.array([[0, 0], [0, 1], [1, 0], [1, 1], [1, 2], [2, 2]]), 3, 3)
    sim = cosine_neighbours(xt, 3, k=0).toarray()
    # cos(0, 1) = 2 / sqrt(2 * 2) = 1; cos(0, 2) = cos(1, 2) = 1 / 2; no self-similarity
    np.testing.assert_allclose(sim, [[0, 1, 0.5], [1, 0, 0.5], [0.5, 0.5, 0]], rtol=1e-6)
    scores = itemknn(xt, cosine_neighbours(xt, 3, k=0))(np.array([0, 2])).numpy()
    np.testing.assert_allclose(scores, [[1.0, 1.0, 1.0], [0.5, 0.5, 0.0]], rtol=1e-6)
    # k = 1: each item keeps its single most similar neighbour
    pruned = cosine_neighbours(xt, 3, k=1).toarray()
    assert (pruned > 0).sum(0).tolist() == [1, 1, 1]
    assert pruned[1, 0] == pytest.approx(1.0) and pruned[0, 1] == pytest.approx(1.0)


def test_cross_domain_itemknn_lets_source_items_vote() -> None:
    # columns [s0 | t0, t1]; u0: s0 t0, u1: s0 t1, u2: s0 only (cold), u3: t1
    x = interactions(np.array([[0, 0], [0, 1], [1, 0], [1, 2], [2, 0], [3, 2]]), 4, 3)
    sim = cosine_neighbours(x, 2, k=0).toarray()
    # cos(s0, t0) = 1 / sqrt(3 * 1); cos(s0, t1) = 1 / sqrt(3 * 2); cos(t0, t1) = 0
    np.testing.assert_allclose(sim[0], [3**-0.5, 6**-0.5], rtol=1e-6)
    np.testing.assert_allclose(sim[1:], [[0, 0], [0, 0]], atol=1e-7)
    votes = x.multiply(np.array([[0.5, 1.0, 1.0]], dtype=np.float32)).tocsr()
    cold = itemknn(votes, cosine_neighbours(x, 2, k=0))(np.array([2])).numpy()
    np.testing.assert_allclose(cold, [[0.5 * 3**-0.5, 0.5 * 6**-0.5]], rtol=1e-6)


def test_ease_closed_form_by_hand() -> None:
    # u0: {0, 1}, u1: {0}; G + I = [[3, 1], [1, 2]], P = [[2, -1], [-1, 3]] / 5
    x = interactions(np.array([[0, 0], [0, 1], [1, 0]]), 2, 2)
    b = ease_solve(x, lam=1.0)
    np.testing.assert_allclose(b, [[0, 1 / 3], [1 / 2, 0]], rtol=1e-9)
    keep = ease_keep(x, max_items=10)
    scores = ease(x, 2, b, keep)(np.array([1])).numpy()
    np.testing.assert_allclose(scores, [[0.0, 1 / 3]], rtol=1e-6)


def test_ease_item_cap_ranks_left_out_items_last_by_popularity() -> None:
    # item 2 is the least popular; with a cap of 2 it stays out of the solve
    x = interactions(np.array([[0, 0], [0, 1], [1, 0], [1, 1], [2, 2], [2, 0]]), 3, 3)
    keep = ease_keep(x, max_items=2)
    assert keep.tolist() == [0, 1]
    scores = ease(x, 3, ease_solve(x[:, keep], 1.0), keep)(np.array([0, 1, 2])).numpy()
    assert (scores[:, 2] < scores[:, :2].min(1)).all()
    # just below the row's lowest kept score: the left-out item does not set the row's spread
    np.testing.assert_allclose(scores[:, 2], scores[:, :2].min(1) - 1.0 + 1.0 / 4.0, rtol=1e-6)


def test_left_out_items_do_not_flatten_the_standardised_ease_scores() -> None:
    # 40 items, only the 4 most popular solved: the kept items' z-scores keep their spread
    rng = np.random.default_rng(0)
    pairs = np.array([[u, i] for u in range(30) for i in rng.choice(40, 6, replace=False)])
    popular = [[u, k] for u in range(30) for k in range(4) if rng.random() < 0.7]
    x = interactions(np.unique(np.r_[pairs, popular], axis=0), 30, 40)
    keep = ease_keep(x, max_items=4)
    z = standardise(ease(x, 40, ease_solve(x[:, keep], 1.0), keep)(np.arange(30)))
    kept_spread = z[:, torch.from_numpy(keep)].std(1)
    assert float(kept_spread.min()) > 0.1


def test_blend_ends_are_the_two_scorers() -> None:
    u, v = torch.randn(5, 3), torch.randn(7, 3)
    model = table_scorer(u, v)
    other = table_scorer(torch.randn(5, 2), torch.randn(7, 2))
    batch = np.arange(5)
    for w, ref in ((0.0, model), (1.0, other)):
        got = blend(model, other, w)(batch)
        assert torch.equal(got.argsort(1), ref(batch).argsort(1))


def test_scorer_metrics_agree_with_the_table_metrics() -> None:
    rng = np.random.default_rng(0)
    u, v = torch.randn(6, 4), torch.randn(30, 4)
    test = np.stack([np.arange(6), rng.integers(0, 30, 6)], 1)
    negs = rng.integers(0, 30, (6, 10))
    from training.evaluate import full_ranking, sampled_ranking

    assert rank_full(table_scorer(u, v), test, []) == full_ranking(u, v, test, [])
    a = rank_sampled(table_scorer(u, v), test, negs)
    b = sampled_ranking(u, v, test, negs)
    assert a["ndcg@10"] == pytest.approx(b["ndcg@10"])


@pytest.fixture(scope="module")
def split():  # type: ignore[no-untyped-def]
    data = make_synthetic(n_users=200, n_source_items=120, n_target_items=80, seed=3)
    return make_split(data, "target", "source", protocol="loo", cold_share=0.2, n_negatives=20)


def _selection(split):  # type: ignore[no-untyped-def]
    users = np.unique(split.valid[:, 0])
    chosen = fit_baselines(split, Validator(split, users))
    best = max(chosen.values(), key=lambda s: s.valid_ndcg)
    gen = torch.Generator().manual_seed(0)
    model = table_scorer(
        torch.randn(split.n_users, 4, generator=gen),
        torch.randn(split.n_target_items, 4, generator=gen),
    )
    mix = fit_blend(model, best, Validator(split, users))
    return {n: (s.params, s.valid_ndcg, s.grid) for n, s in {**chosen, "blend": mix}.items()}


def test_every_baseline_is_fitted_and_beats_chance(split) -> None:  # type: ignore[no-untyped-def]
    chosen = _selection(split)
    assert set(chosen) == set(GRIDS) | {"blend"}
    for name, (_, valid, grid) in chosen.items():
        assert len(grid) == len(GRIDS.get(name, grid)), name
        assert valid > 0.05, name  # random ranking of 80 items scores about 0.03


def test_selection_never_reads_the_test_split(split) -> None:  # type: ignore[no-untyped-def]
    before = _selection(split)
    rng = np.random.default_rng(99)
    poisoned = dataclasses.replace(
        split,
        test=np.stack(
            [split.test[:, 0], rng.integers(0, split.n_target_items, len(split.test))], 1
        ),
        negatives=rng.integers(0, split.n_target_items, split.negatives.shape),
    )
    assert not np.array_equal(poisoned.test, split.test)
    assert _selection(poisoned) == before
    # and poisoning validation does change it: the test above can fail
    bad_valid = dataclasses.replace(
        split,
        valid=np.stack(
            [split.valid[:, 0], rng.integers(0, split.n_target_items, len(split.valid))], 1
        ),
    )
    assert _selection(bad_valid) != before
