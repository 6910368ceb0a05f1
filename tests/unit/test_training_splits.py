"""Protocols: disjoint train/test per user, RecBole's 8:1:1 sizes, cold-start users, negatives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.data.dataset import TRAIN, VALID, Dataset, DomainData
from training.data.splits import Split, _ratio_counts, check_split, make_split
from training.data.synthetic import make_synthetic
from training.errors import ConfigError, DataError


def _pairs(a: np.ndarray) -> set[tuple[int, int]]:
    return {(int(u), int(i)) for u, i in a}


@pytest.fixture(scope="module")
def synth() -> Dataset:
    return make_synthetic(n_users=300, seed=1)


def test_ratio_counts_follow_recbole() -> None:
    assert _ratio_counts(10, (0.8, 0.1, 0.1)) == (8, 1, 1)
    assert _ratio_counts(5, (0.8, 0.1, 0.1)) == (3, 1, 1)
    assert _ratio_counts(2, (0.8, 0.1, 0.1)) == (1, 0, 1)
    assert _ratio_counts(1, (0.8, 0.1, 0.1)) == (1, 0, 0)


def test_ratio_split_is_disjoint_complete_and_deterministic(synth: Dataset, tmp_path: Path) -> None:
    s = make_split(synth, "target", "source", "ratio", cold_share=0.0, seed=5)
    train, valid, test = _pairs(s.train), _pairs(s.valid), _pairs(s.test)
    assert not train & test and not train & valid and not valid & test
    assert len(train) + len(valid) + len(test) == len(synth.domain("target"))
    for u in np.unique(s.train[:, 0])[:50]:
        sizes = tuple(int((a[:, 0] == u).sum()) for a in (s.train, s.valid, s.test))
        assert sizes == _ratio_counts(sum(sizes), (0.8, 0.1, 0.1))
    again = make_split(synth, "target", "source", "ratio", cold_share=0.0, seed=5)
    assert np.array_equal(again.test, s.test)
    other = make_split(synth, "target", "source", "ratio", cold_share=0.0, seed=6)
    assert not np.array_equal(other.test, s.test)
    s.save(tmp_path)
    loaded = Split.load(tmp_path)
    assert np.array_equal(loaded.train, s.train) and loaded.users == s.users


@pytest.mark.parametrize("share", [0.2, 0.5])
def test_cold_users_absent_from_target_training(synth: Dataset, share: float) -> None:
    s = make_split(synth, "target", "source", "ratio", cold_share=share, seed=0)
    assert s.cold_users.size > 0
    assert not np.isin(s.train[:, 0], s.cold_users).any()
    assert not np.isin(s.valid[:, 0], s.cold_users).any()
    assert np.isin(s.cold_users, s.source_users).all()  # cold users are overlapping users
    cv = np.unique(s.cold_valid[:, 0])
    overlap = np.intersect1d(
        s.source_users, np.unique(np.r_[s.train[:, 0], s.test[:, 0], s.cold_valid[:, 0]])
    )
    assert s.cold_users.size == pytest.approx(share * overlap.size, abs=1)
    # cold-start validation users: overlapping, apart from the cold test users, in no other part
    assert cv.size == max(1, round(0.25 * s.cold_users.size))
    assert np.isin(cv, s.source_users).all() and not np.isin(cv, s.cold_users).any()
    for part in (s.train, s.valid, s.test):
        assert not np.isin(part[:, 0], cv).any()
    # they are tested on all their target interactions
    tgt = synth.domain("target")
    cold_ids = {s.users[u] for u in s.cold_users}
    n_cold_rows = int(np.isin(tgt.users, list(cold_ids)).sum())
    assert int(np.isin(s.test[:, 0], s.cold_users).sum()) == n_cold_rows
    # the source domain keeps them
    assert np.isin(s.cold_users, s.source_train[:, 0]).all()


def test_loo_with_given_test_and_sampled_negatives() -> None:
    users = np.array(["a", "a", "a", "a", "b", "b", "b", "b", "b"])
    items = np.array(["1", "2", "3", "4", "1", "2", "6", "7", "5"])
    given = np.array([0, 0, 0, 2, 0, 0, 0, 0, 2], dtype=np.int8)
    dom = DomainData("t", users, items, given_split=given)
    src = DomainData("s", np.array(["a", "b"]), np.array(["x", "y"]))
    ds = Dataset("d", Path("d"), {"t": dom, "s": src})
    s = make_split(ds, "t", "s", "loo", n_negatives=2, seed=0)
    assert sorted(_pairs(s.test)) == [(0, 3), (1, 4)]  # the given test items ("4", "5")
    assert s.negatives is not None and s.negatives.shape == (2, 2)
    for (u, _), negs in zip(s.test, s.negatives, strict=True):
        seen = {i for uu, i in np.r_[s.train, s.valid, s.test] if uu == u}
        assert not set(negs.tolist()) & seen
        assert len(set(negs.tolist())) == 2
    # user "a" has only three unseen items: its four negatives repeat but are all unseen
    s4 = make_split(ds, "t", "s", "loo", n_negatives=4, seed=0)
    assert s4.negatives is not None
    assert set(s4.negatives[0].tolist()) <= {4, 5, 6}
    with pytest.raises(ConfigError, match="n_negatives"):
        make_split(ds, "t", "s", "loo", n_negatives=7)


def test_bad_protocol_and_share_are_config_errors(synth: Dataset) -> None:
    with pytest.raises(ConfigError, match="protocol"):
        make_split(synth, "target", "source", "nope")
    with pytest.raises(ConfigError, match="cold_share"):
        make_split(synth, "target", None, "ratio", cold_share=0.2)


def _domain(name: str, rows: list[tuple[str, str]], split: list[int] | None = None) -> DomainData:
    return DomainData(
        name=name,
        users=np.array([u for u, _ in rows], dtype=object),
        items=np.array([i for _, i in rows], dtype=object),
        given_split=None if split is None else np.array(split, dtype=np.int8),
    )


def _grid(users: range, items: range, prefix: str = "") -> list[tuple[str, str]]:
    return [(f"u{u}", f"{prefix}{i}") for u in users for i in items if (u + i) % 3]


def _checked(dataset: Dataset, source: str | None = "src") -> None:
    split = make_split(dataset, "tgt", source, "ratio", n_negatives=5, seed=0)
    check_split(split, "tgt", source)


def test_target_with_a_single_user_is_refused() -> None:
    ds = Dataset("one", Path("one"), {"tgt": _domain("tgt", _grid(range(1), range(30)))})
    with pytest.raises(DataError, match=r"domain 'tgt': 1 user\(s\) .* at least 2"):
        _checked(ds, None)


def test_split_without_test_or_validation_users_is_refused() -> None:
    # every user has one interaction: the 8:1:1 split leaves nothing to validate or test on
    ds = Dataset("thin", Path("thin"), {"tgt": _domain("tgt", _grid(range(50), range(1, 2)))})
    with pytest.raises(DataError, match="no validation users"):
        _checked(ds, None)
    # a given split with validation but no test rows: metrics would be NaN
    rows = _grid(range(20), range(10))
    given = [TRAIN if n % 4 else VALID for n in range(len(rows))]
    ds = Dataset("given", Path("given"), {"tgt": _domain("tgt", rows, given)})
    with pytest.raises(DataError, match="no test users"):
        _checked(ds, None)


def test_source_without_shared_users_is_refused_loudly(caplog: pytest.LogCaptureFixture) -> None:
    domains = {
        "tgt": _domain("tgt", _grid(range(40), range(20))),
        "src": _domain("src", _grid(range(100, 140), range(20), "s")),
    }
    ds = Dataset("apart", Path("apart"), domains)
    with pytest.raises(DataError, match="TRANSFER IMPOSSIBLE: .*share no user.*--source="):
        _checked(ds)
    assert any(r.levelname == "WARNING" and "share no user" in r.message for r in caplog.records)
    _checked(ds, None)  # the target alone trains


@pytest.mark.parametrize("protocol", ["ratio", "loo"])
@pytest.mark.parametrize("share", [0.0, 0.2, 0.5])
def test_no_test_pair_in_training_and_no_cold_user_in_target_training(
    synth: Dataset, protocol: str, share: float
) -> None:
    s = make_split(synth, "target", "source", protocol, cold_share=share, n_negatives=20, seed=1)
    train = {(int(u), int(i)) for u, i in s.train}
    held = [(int(u), int(i)) for u, i in np.r_[s.test, s.valid, s.cold_valid]]
    assert held and not any(p in train for p in held)  # no test/validation pair is trained on
    no_target = np.r_[s.cold_users, np.unique(s.cold_valid[:, 0])]
    assert not np.isin(s.train[:, 0], no_target).any()
    assert not np.isin(s.valid[:, 0], no_target).any()
    if share > 0:
        assert s.cold_users.size and np.isin(s.cold_users, s.test[:, 0]).all()
    if s.negatives is not None:  # sampled negatives are never one of the user's items
        seen: dict[int, set[int]] = {}
        for u, i in np.r_[s.train, s.valid, s.test, s.cold_valid]:
            seen.setdefault(int(u), set()).add(int(i))
        for (u, _), negs in zip(s.test, s.negatives, strict=True):
            assert not seen[int(u)] & set(negs.tolist())
