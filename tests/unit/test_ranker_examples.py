"""The learned ranker's labelled examples: simulated cold-start users are training users whose
target history is hidden and whose labels are their own training items (never a validation or
test item), real cold-start validation users select, recent items make the RECENT features
non-zero in training; and the cross-fitted ranker, each member judged on the half it did not
train on."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from recsys.features import FEATURE_NAMES
from recsys.sources import CandidateSources, exact_search
from training.data.splits import make_split
from training.data.synthetic import make_synthetic
from training.ranker import (
    PERSONAL,
    CrossFitted,
    FeatureRanker,
    WithDot,
    _Published,
    _with_or_without_cold,
    compare_precisions,
    compute_neighbours,
    cross_fit,
    evaluate_orders,
    export_ranker,
    int8_ranker,
    ranker_examples,
    train_ranker,
    warm_folds,
    with_dot,
)

RECENT = [FEATURE_NAMES.index("recent_vote"), FEATURE_NAMES.index("recent_rrank")]
TARGET_HISTORY = FEATURE_NAMES.index("log_target_history")
MAPPED = FEATURE_NAMES.index("mapped")


@pytest.fixture(scope="module")
def examples() -> tuple[object, dict[str, list]]:
    split = make_split(
        make_synthetic(n_users=300, seed=3), "target", "source", cold_share=0.2, seed=3
    )
    has_target = np.zeros(split.n_users, bool)
    has_target[split.train[:, 0]] = True
    has_source = np.zeros(split.n_users, bool)
    has_source[split.source_users] = True
    keep = np.flatnonzero(has_target | has_source)
    counts = np.bincount(split.train[:, 0], minlength=split.n_users)
    order = np.argsort(split.train[:, 0], kind="stable")
    indptr = np.r_[0, np.cumsum(counts[keep])].astype(np.int64)
    starts = np.r_[0, np.cumsum(counts)]
    indices = np.concatenate([split.train[order][starts[u] : starts[u + 1], 1] for u in keep])
    neighbours = compute_neighbours(
        split.train,
        np.concatenate([split.source_train, split.source_valid]),
        split.n_users,
        split.n_target_items,
        split.n_source_items,
        keep,
        20,
    )
    rng = np.random.default_rng(0)
    items = rng.standard_normal((split.n_target_items, 8)).astype(np.float32)
    published = _Published(
        sources=CandidateSources(
            item_ids=split.target_items,
            titles=[""] * split.n_target_items,
            item_embeddings=items,
            popularity=np.bincount(split.train[:, 1], minlength=split.n_target_items),
            neighbours=neighbours,
            search=exact_search(items),
        ),
        neighbours=neighbours,
        user_table=rng.standard_normal((len(keep), 8)).astype(np.float32),
        mapped_table=rng.standard_normal((len(keep), 8)).astype(np.float32),
        indptr=indptr,
        indices=indices.astype(np.int64),
        row_of={int(u): i for i, u in enumerate(keep)},
        kinds=["target" if has_target[u] else "mapped" for u in keep],
        items=list(split.target_items),
    )
    sets = ranker_examples(
        split,
        published,
        depth=60,
        popular=10,
        max_users=200,
        seed=1,
        cold_share=1.0,
        recent_share=0.5,
    )
    return split, sets


def _items(split: object, pairs: np.ndarray, user: int) -> set[str]:
    return {split.target_items[j] for u, j in pairs if u == user}  # type: ignore[attr-defined]


def test_simulated_cold_users_are_labelled_with_their_training_items_only(examples) -> None:
    split, sets = examples
    cold = sets["train_cold"]
    assert cold, "no simulated cold-start user"
    selection = {s.user for s in sets["select_warm"] + sets["select_cold"]}
    cold_test = {int(u) for u in split.cold_users}
    for s in cold:
        train_items = _items(split, split.train, s.user)
        held_out = _items(split, split.valid, s.user) | _items(split, split.test, s.user)
        assert s.relevant == train_items
        assert not s.relevant & held_out
        assert s.user not in selection and s.user not in cold_test
        # presented as retrieval serves a source-only user: no target history, mapped
        assert (s.features[:, TARGET_HISTORY] == 0).all()
        assert (s.features[:, MAPPED] == 1).all()
        assert s.n_relevant == len(train_items)


def test_cold_selection_uses_the_cold_validation_users_of_the_split(examples) -> None:
    split, sets = examples
    cold_valid_users = {int(u) for u in split.cold_valid[:, 0]}
    assert sets["select_cold"] and {s.user for s in sets["select_cold"]} <= cold_valid_users
    for s in sets["select_cold"]:
        assert s.kind == "cold-valid"
        assert s.relevant == _items(split, split.cold_valid, s.user)
        assert (s.features[:, MAPPED] == 1).all()
    # the cold test users are in neither role
    used = {s.user for role in sets.values() for s in role}
    assert not used & {int(u) for u in split.cold_users}


def test_recent_features_are_nonzero_in_training_and_zero_without_recent_items(examples) -> None:
    _, sets = examples
    recent = sets["train_recent"]
    assert recent
    stacked = np.concatenate([s.features for s in recent])
    assert (stacked[:, RECENT] > 0).any(axis=0).all()
    assert all(s.kind == "warm+recent" for s in recent)
    warm = np.concatenate([s.features for s in sets["train_warm"]])
    assert (warm[:, RECENT] == 0).all()
    # warm examples are labelled with validation items, which are never among their candidates'
    # exclusions (the user's training items)
    assert {s.user for s in recent} <= {s.user for s in sets["train_warm"]}
    # the selection half has its own recent examples (it trains the second member)
    assert sets["select_recent"]
    assert {s.user for s in sets["select_recent"]} <= {s.user for s in sets["select_warm"]}
    assert all((s.features[:, RECENT] > 0).any() for s in sets["select_recent"])


def test_warm_training_and_selection_users_are_disjoint(examples) -> None:
    _, sets = examples
    train = {s.user for s in sets["train_warm"]}
    select = {s.user for s in sets["select_warm"]}
    assert train and select and not train & select


def test_int8_ranker_is_compared_with_fp32_on_the_same_candidates(examples, tmp_path) -> None:
    _, sets = examples
    train = sets["train_warm"] + sets["train_recent"] + sets["train_cold"]
    model, info = train_ranker(
        train, sets["select_warm"], seed=0, epochs=2, select_cold=sets["select_cold"]
    )
    assert "valid_cold_ndcg@10" in info["history"][0]
    fp32, int8, method = int8_ranker(model, train, tmp_path, seed=0)
    assert int8.is_file() and int8.stat().st_size < fp32.stat().st_size
    assert method.startswith("static")
    same = compare_precisions(fp32, fp32, sets["select_warm"])
    assert same["fp32_ndcg@10"] == same["int8_ndcg@10"] and same["top10_agreement"] == 1.0
    expected = evaluate_orders(model, sets["select_warm"])["learned"]
    got = compare_precisions(fp32, int8, sets["select_warm"])
    assert got["users"] == len(sets["select_warm"])
    assert abs(got["fp32_ndcg@10"] - expected) < 1e-6
    assert 0.0 <= got["int8_ndcg@10"] <= 1.0 and got["spearman_mean"] > 0.9


def test_orders_of_no_users_count_zero_users() -> None:
    # a job without cold-start users (single domain) has no cold selection users
    assert evaluate_orders(None, [])["users"] == 0


def test_validation_decides_whether_simulated_cold_users_train_the_ranker(examples) -> None:
    _, sets = examples
    assert sets["train_cold"]
    warm_sets = sets["train_warm"] + sets["train_recent"]
    args = (sets["select_warm"], sets["train_cold"], sets["select_cold"], 0)
    model, info = _with_or_without_cold(warm_sets, *args)
    scores = info["simulated_cold"]["selection_ndcg@10"]
    assert set(scores) == {"with", "without"}
    used = "with" if info["simulated_cold"]["used"] else "without"
    assert scores[used] == max(scores.values())
    warm = evaluate_orders(model, sets["select_warm"])["learned"]
    cold = evaluate_orders(model, sets["select_cold"])["learned"]
    assert scores[used] == pytest.approx((warm + cold) / 2)
    # without simulated users there is nothing to choose
    _, alone = _with_or_without_cold(warm_sets, args[0], [], *args[2:])
    assert alone["simulated_cold"] == {
        "used": False,
        "selection_ndcg@10": {"without": pytest.approx(scores["without"])},
        "examples": 0,
    }


def test_warm_folds_cut_the_validation_users_and_two_folds_are_the_halves(examples) -> None:
    _, sets = examples
    warm = sets["select_warm"] + sets["train_warm"]
    assert warm_folds(sets, 2) == [sets["select_warm"], sets["train_warm"]]
    parts = warm_folds(sets, 4)
    assert len(parts) == 4 and [s for part in parts for s in part] == warm
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert len(warm_folds(sets, len(warm) + 5)) == len(warm)  # at most one fold per user
    with pytest.raises(ValueError, match="2 folds"):
        warm_folds({"select_warm": warm[:1], "train_warm": []}, 4)


@pytest.mark.parametrize("folds", [2, 3])
def test_cross_fitted_members_are_judged_on_the_fold_they_did_not_train_on(
    examples, folds: int
) -> None:
    _, sets = examples
    model, info, held_out = cross_fit(sets, seed=0, folds=folds)
    parts = warm_folds(sets, folds)
    assert isinstance(model, CrossFitted) and len(model.members) == folds == info["folds"]
    assert [m for m, _ in held_out] == list(model.members)
    assert [part for _, part in held_out] == parts
    # out of fold: each member on the fold it left out
    scores = [evaluate_orders(m, part) for m, part in held_out]
    users = len(sets["select_warm"]) + len(sets["train_warm"])
    assert info["validation"]["users"] == users
    for key in ("retrieval", "dot", "learned"):
        want = sum(v[key] * v["users"] for v in scores) / users
        assert info["validation"][key] == pytest.approx(want)
    # each member's epoch was chosen on its own fold (and the cold selection users)
    for member, (m, select) in zip(info["members"], held_out, strict=True):
        warm = evaluate_orders(m, select)["learned"]
        cold = evaluate_orders(m, sets["select_cold"])["learned"]
        assert member["selection_ndcg@10"] == pytest.approx((warm + cold) / 2)
    # the members learned different functions, and the ranker scores with their mean
    x = torch.from_numpy(np.concatenate([s.features for s in sets["select_warm"][:5]]))
    with torch.no_grad():
        each = [m(x) for m in model.members]
        both = model(x)
    assert not torch.allclose(each[0], each[1])
    torch.testing.assert_close(both, torch.stack(each).mean(dim=0))


def test_no_member_trains_on_the_users_it_is_judged_on(examples, monkeypatch) -> None:
    """The fold a member is judged on is absent from its warm, recent-item and simulated
    cold-start training examples."""
    import training.ranker as ranker

    _, sets = examples
    seen: list[tuple[set[int], set[int], set[int]]] = []
    real = ranker._with_or_without_cold

    def spy(warm, select_warm, simulated_cold, select_cold, seed):  # type: ignore[no-untyped-def]
        seen.append(
            (
                {s.user for s in warm},
                {s.user for s in simulated_cold},
                {s.user for s in select_warm},
            )
        )
        return real(warm, select_warm, simulated_cold, select_cold, seed)

    monkeypatch.setattr(ranker, "_with_or_without_cold", spy)
    cross_fit(sets, seed=0, folds=3)
    assert len(seen) == 3
    every = {s.user for s in sets["select_warm"] + sets["train_warm"]}
    for warm, cold, judged in seen:
        assert judged and not warm & judged and not cold & judged
        assert warm | judged >= every  # every other warm user trains it
    assert any(cold for _, cold, _ in seen)


def _held_out(model: CrossFitted, sets: dict[str, list]) -> list:  # type: ignore[type-arg]
    return list(zip(model.members, warm_folds(sets, len(model.members)), strict=True))


def _untrained(width: int) -> CrossFitted:
    """Two copies of one untrained MLP: the mean ranker scores as each member does."""
    torch.manual_seed(0)
    member = FeatureRanker(np.zeros(width), np.ones(width))
    return CrossFitted([member, copy.deepcopy(member)]).eval()


def _with_personal(sets: dict[str, list], value) -> dict[str, list]:  # type: ignore[no-untyped-def]
    """The example sets with the dot product column replaced by value(labels, rng)."""
    rng = np.random.default_rng(0)
    out: dict[str, list] = {}
    for key, part in sets.items():
        out[key] = []
        for s in part:
            features = s.features.copy()
            features[:, PERSONAL] = value(s.labels, rng)
            out[key].append(dataclasses.replace(s, features=features))
    return out


def test_validation_chooses_the_dot_products_weight_per_segment(examples) -> None:
    _, sets = examples
    width = sets["select_warm"][0].features.shape[1]
    model = _untrained(width)
    # a dot product that puts every labelled candidate first: the served order takes it
    good = _with_personal(sets, lambda y, rng: 5.0 * y + 0.1 * rng.standard_normal(y.size))
    served, info = with_dot(model, good, _held_out(model, good))
    segments = (("warm", good["select_warm"] + good["train_warm"]), ("mapped", good["select_cold"]))
    for seg, part in segments:
        assert info[seg]["dot_weight"] > 0 and info[seg]["users"] == len(part)
        orders = evaluate_orders(served, part)
        assert orders["learned"] == pytest.approx(orders["dot"])
        assert orders["learned"] > evaluate_orders(model, part)["learned"]
    # a dot product that puts them last: the MLP alone (weight 0 in both segments)
    bad = _with_personal(sets, lambda y, rng: -5.0 * y + 0.1 * rng.standard_normal(y.size))
    served, info = with_dot(model, bad, _held_out(model, bad))
    assert info["warm"]["dot_weight"] == 0.0 and info["mapped"]["dot_weight"] == 0.0
    assert served.b.tolist() == [0.0, 0.0]
    x = torch.from_numpy(np.concatenate([s.features for s in bad["select_warm"][:5]]))
    with torch.no_grad():
        torch.testing.assert_close(served(x), served.a[0] * model(x))


def test_the_mapped_feature_selects_the_segments_weights(tmp_path) -> None:
    width = len(FEATURE_NAMES)
    model = _untrained(width)
    served = WithDot(model, (1.0, 0.0), (0.0, 2.0)).eval()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, width)).astype(np.float32)
    x[:, MAPPED] = np.arange(64) % 2  # every other row a user mapped from the source domain
    t = torch.from_numpy(x)
    with torch.no_grad():
        got, mlp = served(t).numpy(), model(t).numpy()
    warm, mapped = x[:, MAPPED] == 0, x[:, MAPPED] == 1
    np.testing.assert_allclose(got[warm], mlp[warm], rtol=1e-6)
    np.testing.assert_allclose(got[mapped], 2.0 * x[mapped, PERSONAL], rtol=1e-6)
    # the exported graph routes the same way
    import onnxruntime as ort

    path = tmp_path / "ranker.onnx"
    assert export_ranker(served, path, seed=0) <= 1e-5
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"features": x})[0], got, rtol=1e-5, atol=1e-6)
