"""Baselines and the blend as user and item tables: the factorised forms against the dense
scores on hand-checkable cases, and the export choice that never reads the test split."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from training.baselines import (
    Validator,
    blend,
    by_history,
    cosine_neighbours,
    ease_keep,
    ease_linear,
    ease_solve,
    fit_baselines,
    interactions,
    itemknn_linear,
    popularity_linear,
)
from training.config import Config
from training.data.splits import make_split
from training.data.synthetic import make_synthetic
from training.evaluate import table_scorer
from training.served import Served, blend_tables, factorise, factorise_many
from training.served import by_history as by_history_tables
from training.transfer import Tables


def _same(served: Served, dense, batch: np.ndarray, atol: float = 1e-5) -> None:  # type: ignore[no-untyped-def]
    np.testing.assert_allclose(served.scorer()(batch).numpy(), dense(batch).numpy(), atol=atol)


def test_ease_at_full_rank_is_the_dense_ease() -> None:
    # u0: {0, 1}, u1: {0}; B = [[0, 1/3], [1/2, 0]] (test_training_baselines); u1 scores [0, 1/3]
    x = interactions(np.array([[0, 0], [0, 1], [1, 0]]), 2, 2)
    lin = ease_linear(x, 2, ease_solve(x, lam=1.0), ease_keep(x, 10))
    f = factorise(lin, 64)
    assert f.info["rank"] == 2 and f.info["relative_frobenius_error"] == pytest.approx(0, abs=1e-7)
    np.testing.assert_allclose(f.scorer()(np.array([1])).numpy(), [[0.0, 1 / 3]], atol=1e-6)
    _same(f, lin.scorer(), np.array([0, 1]))


def test_ease_with_items_outside_the_solve_keeps_their_fill() -> None:
    x = interactions(np.array([[0, 0], [0, 1], [1, 0], [1, 1], [2, 2], [2, 0]]), 3, 3)
    keep = ease_keep(x, max_items=2)
    lin = ease_linear(x, 3, ease_solve(x[:, keep], 1.0), keep)
    f = factorise(lin, 64)
    # rank 2 plus two fill columns: (lowest solved score - 1) x indicator, 1 x popularity
    assert f.users.shape == (3, 4) and f.items.shape == (3, 4)
    _same(f, lin.scorer(), np.arange(3), atol=1e-5)
    served = f.scorer()(np.arange(3)).numpy()
    solved = served[:, keep]
    left = np.setdiff1d(np.arange(3), keep)
    # each user's left-out item sits just below that user's lowest solved item
    assert (served[:, left].max(1) < solved.min(1)).all()
    assert (served[:, left].min(1) > solved.min(1) - 1.0).all()


def test_itemknn_at_full_rank_is_the_dense_itemknn() -> None:
    # every item has 2 users; sim = [[0, 1, .5], [1, 0, .5], [.5, .5, 0]]; u0 scores [1, 1, 1]
    xt = interactions(np.array([[0, 0], [0, 1], [1, 0], [1, 1], [1, 2], [2, 2]]), 3, 3)
    lin = itemknn_linear(xt, cosine_neighbours(xt, 3, k=0))
    f = factorise(lin, 3)
    np.testing.assert_allclose(
        f.scorer()(np.array([0, 2])).numpy(), [[1.0, 1.0, 1.0], [0.5, 0.5, 0.0]], atol=1e-6
    )
    _same(f, lin.scorer(), np.arange(3))


def test_cross_domain_itemknn_serves_cold_users_from_their_source_votes() -> None:
    # columns [s0 | t0, t1]; u2 has only s0: it scores 0.5 * [3^-1/2, 6^-1/2]
    x = interactions(np.array([[0, 0], [0, 1], [1, 0], [1, 2], [2, 0], [3, 2]]), 4, 3)
    votes = x.multiply(np.array([[0.5, 1.0, 1.0]], dtype=np.float32)).tocsr()
    lin = itemknn_linear(votes, cosine_neighbours(x, 2, k=0))
    f = factorise(lin, 64)
    np.testing.assert_allclose(
        f.scorer()(np.array([2])).numpy(), [[0.5 * 3**-0.5, 0.5 * 6**-0.5]], atol=1e-6
    )
    _same(f, lin.scorer(), np.arange(4))


def test_popularity_is_a_constant_user_against_the_counts() -> None:
    xt = interactions(np.array([[0, 1], [1, 1], [1, 2]]), 2, 3)
    f = factorise(popularity_linear(xt), 64)
    assert f.users.shape == (2, 1)
    np.testing.assert_array_equal(f.scorer()(np.array([0, 1])).numpy(), [[0, 2, 1], [0, 2, 1]])


def test_truncation_keeps_the_top_singular_directions() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 30)).astype(np.float32)
    votes = interactions(np.stack([np.arange(40), np.arange(40)], 1), 40, 40)  # identity
    from training.baselines import Linear

    lin = Linear(votes, w, 30)
    forms = factorise_many(lin, [5, 10, 64])
    assert sorted(forms) == [5, 10, 30]  # 64 is capped by the 30 columns
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    for r, f in forms.items():
        got = f.users.double() @ f.items.double().T  # the identity votes: W_r itself
        err = np.linalg.norm(got.numpy() - w) / np.linalg.norm(w)
        # the best rank-r approximation (Eckart-Young), and the error the info records
        assert err == pytest.approx(np.sqrt((s[r:] ** 2).sum() / (s**2).sum()), rel=1e-3, abs=1e-6)
        assert f.info["relative_frobenius_error"] == pytest.approx(err, rel=1e-3, abs=1e-6)


def test_blend_tables_are_the_blended_scores() -> None:
    gen = torch.Generator().manual_seed(0)
    model = Served("m", torch.randn(6, 4, generator=gen), torch.randn(9, 4, generator=gen))
    base = Served("b", torch.randn(6, 3, generator=gen), torch.randn(9, 3, generator=gen))
    batch = np.arange(6)
    for w in (0.0, 0.3, 0.5, 1.0):
        want = blend(model.scorer(), base.scorer(), w)(batch)
        got = blend_tables(model, base, w)
        assert got.users.shape[1] == {0.0: 4, 1.0: 3}.get(w, 7)
        np.testing.assert_allclose(got.scorer()(batch).numpy(), want.numpy(), atol=1e-5)


def test_warm_and_cold_rows_concatenate_into_one_pair_of_tables() -> None:
    gen = torch.Generator().manual_seed(1)
    a = Served("a", torch.randn(5, 2, generator=gen), torch.randn(7, 2, generator=gen))
    b = Served("b", torch.randn(5, 3, generator=gen), torch.randn(7, 3, generator=gen))
    has_target = np.array([True, False, True, False, True])
    got = by_history_tables(has_target, a, b, "a+b")
    want = by_history(has_target, a.scorer(), b.scorer())(np.arange(5))
    np.testing.assert_allclose(got.scorer()(np.arange(5)).numpy(), want.numpy(), atol=1e-6)


def test_mapped_rows_are_the_users_without_their_target_history() -> None:
    # columns [s0, s1 | t0, t1, t2]: the mapped row of every user is the row it would have
    # with its target columns emptied, which is what a user known only from s0, s1 gets
    x = interactions(
        np.array([[0, 0], [0, 2], [0, 3], [1, 1], [1, 3], [1, 4], [2, 0], [2, 4], [3, 1]]), 4, 5
    )
    votes = x.multiply(np.array([[0.5, 0.5, 1.0, 1.0, 1.0]], dtype=np.float32)).tocsr()
    sim = cosine_neighbours(x, 3, k=0)
    f = factorise(itemknn_linear(votes, sim), 64)
    source_only = votes.multiply(np.array([[1.0, 1.0, 0.0, 0.0, 0.0]], dtype=np.float32)).tocsr()
    g = factorise(itemknn_linear(source_only, sim), 64)
    assert f.mapped is not None
    np.testing.assert_allclose(
        (f.mapped @ f.items.T).numpy(), g.scorer()(np.arange(4)).numpy(), atol=1e-6
    )
    # u3 has no target history: its mapped row is its row
    np.testing.assert_allclose(f.mapped[3].numpy(), f.users[3].numpy(), atol=1e-6)
    # EASE on [source | target] with the left-out items' fill: the same rule
    keep = ease_keep(x, max_items=4)
    b = ease_solve(x[:, keep], 1.0)
    lin = ease_linear(x, 3, b, keep)
    e = factorise(lin, 64)
    # the same solve and fill, the votes of the source columns only
    e0 = factorise(dataclasses.replace(lin, votes=(x.multiply(source_only > 0))[:, keep]), 64)
    assert e.mapped is not None
    np.testing.assert_allclose(
        (e.mapped @ e.items.T).numpy(), e0.scorer()(np.arange(4)).numpy(), atol=1e-5
    )
    # a target-only baseline leaves a user without target history nothing but the fill
    xt = x[:, 2:]
    t = factorise(itemknn_linear(xt, cosine_neighbours(xt, 3, k=0)), 64)
    assert t.mapped is not None and not t.mapped.any()
    # popularity does not depend on the history
    pop = factorise(popularity_linear(xt), 64)
    assert pop.mapped is not None and torch.equal(pop.mapped, pop.users)


def test_blend_and_concatenation_carry_the_mapped_rows() -> None:
    gen = torch.Generator().manual_seed(2)
    items_m, items_b = torch.randn(9, 4, generator=gen), torch.randn(9, 3, generator=gen)
    um, mm = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    ub, mb = torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen)
    model = Served("m", um, items_m, mapped=mm)
    base = Served("b", ub, items_b, mapped=mb)
    batch = np.arange(6)
    got = blend_tables(model, base, 0.3)
    # the mapped rows blend as the users would if these were their rows
    as_users = blend_tables(Served("m", mm, items_m), Served("b", mb, items_b), 0.3)
    assert got.mapped is not None
    np.testing.assert_allclose(
        (got.mapped @ got.items.T).numpy(), as_users.scorer()(batch).numpy(), atol=1e-5
    )
    assert blend_tables(model, Served("b", ub, items_b), 0.3).mapped is None
    # warm users keep their own rows; every mapped row is served like a user without history
    has_target = np.array([True, False, True, False, True, True])
    joined = by_history_tables(has_target, Served("w", um, items_m, mapped=mm), base, "w+b")
    assert joined.mapped is not None
    np.testing.assert_allclose(
        (joined.mapped @ joined.items.T).numpy(), (mb @ items_b.T).numpy(), atol=1e-5
    )
    cold = ~has_target
    np.testing.assert_allclose(
        joined.scorer()(np.flatnonzero(cold)).numpy(), (ub[cold] @ items_b.T).numpy(), atol=1e-5
    )


@pytest.fixture(scope="module")
def split():  # type: ignore[no-untyped-def]
    data = make_synthetic(n_users=200, n_source_items=120, n_target_items=80, seed=3)
    return make_split(data, "target", "source", protocol="loo", cold_share=0.2, n_negatives=20)


def _export_choice(split):  # type: ignore[no-untyped-def]
    """What run._selection chooses to export, with one random two-tower row beside the
    baselines: every validation score, the rows, their ranks and the exported tables."""
    from training.run import _segments, _selection, validation_users

    cfg = Config(dataset="synthetic", source="source", target="target", factor_ranks=[8, 32])
    validator = Validator(split, validation_users(split, 0))
    baselines = fit_baselines(split, validator)
    gen = torch.Generator().manual_seed(0)
    tab = Tables(
        users=torch.randn(split.n_users, 4, generator=gen),
        items=torch.randn(split.n_target_items, 4, generator=gen),
    )
    rows = {
        "target_only": {
            "kind": "model",
            "train": {"valid_ndcg@10": validator(table_scorer(tab.users, tab.items))},
        }
    }
    warm, cold = _segments(split)
    sel, exported = _selection(
        cfg, rows, {"target_only": tab}, baselines, validator, split, warm, cold, None
    )
    assert exported is not None
    keys = ("valid_ndcg@10", "valid_cold_ndcg@10", "exported_rows", "exported_form")
    return {k: sel[k] for k in keys}, exported


@pytest.fixture(scope="module")
def choice(split):  # type: ignore[no-untyped-def]
    return _export_choice(split)


def test_export_is_the_row_validation_chooses(split, choice) -> None:  # type: ignore[no-untyped-def]
    sel, exported = choice
    assert sel["exported_rows"]["warm"] == max(sel["valid_ndcg@10"], key=sel["valid_ndcg@10"].get)
    cold = sel["valid_cold_ndcg@10"]
    assert sel["exported_rows"]["cold"] == max(cold, key=cold.get)
    assert exported.users.shape == (split.n_users, sel["exported_form"]["dim"])
    # a baseline beats random two-tower tables on validation, so one is exported
    assert sel["exported_rows"]["warm"] != "target_only"


def test_export_choice_never_reads_the_test_split(split, choice) -> None:  # type: ignore[no-untyped-def]
    before, exp = choice
    rng = np.random.default_rng(99)
    poisoned = dataclasses.replace(
        split,
        test=np.stack(
            [split.test[:, 0], rng.integers(0, split.n_target_items, len(split.test))], 1
        ),
        negatives=rng.integers(0, split.n_target_items, split.negatives.shape),
    )
    after, exp_p = _export_choice(poisoned)
    assert after == before
    assert torch.equal(exp.users, exp_p.users) and torch.equal(exp.items, exp_p.items)
    # and poisoning validation does change it: the test above can fail
    bad_valid = dataclasses.replace(
        split,
        valid=np.stack(
            [split.valid[:, 0], rng.integers(0, split.n_target_items, len(split.valid))], 1
        ),
    )
    assert _export_choice(bad_valid)[0] != before
