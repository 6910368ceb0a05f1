"""Cross-domain duplicate items: found by their user sets, reported, dropped or merged."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data.dataset import TEST, TRAIN, Dataset, DomainData
from training.data.splits import check_split, make_split
from training.duplicates import Duplicates, drop_items, find_duplicates, merge_items


def _domain(name: str, pairs: list[tuple[str, str]]) -> DomainData:
    return DomainData(name, np.array([u for u, _ in pairs]), np.array([i for _, i in pairs]))


SOURCE = _domain("s", [("a", "x"), ("b", "x"), ("c", "x"), ("a", "y"), ("b", "y"), ("d", "z")])
TARGET = _domain(
    "t",
    [
        ("a", "X"), ("b", "X"), ("c", "X"),  # same users as x: identical
        ("a", "Y"), ("b", "Y"), ("e", "Y"),  # Jaccard 2/4 with y
        ("d", "Z"),  # identical to z but one user only
        ("a", "W"), ("b", "W"), ("c", "W"), ("d", "W"), ("e", "W"),  # Jaccard 3/5 with x
    ],
)  # fmt: skip


def test_identical_user_sets_are_duplicates_near_ones_by_threshold() -> None:
    d = find_duplicates(TARGET, SOURCE, jaccard=1.0)
    assert d.target_items == ["X"] and d.source_match == {"X": "x"} and d.identical == 1
    assert d.summary()["share_of_target_positives"] == 3 / 12
    loose = find_duplicates(TARGET, SOURCE, jaccard=0.5)
    assert loose.target_items == ["W", "X", "Y"]  # Z has a single user: never a duplicate
    assert loose.source_match["Y"] == "y" and loose.identical == 1


def test_drop_removes_the_items_from_the_target_domain_only() -> None:
    ds = Dataset("d", Path("d"), {"s": SOURCE, "t": TARGET})
    out = drop_items(ds, "t", ["X"])
    assert "X" not in set(out.domains["t"].items) and len(out.domains["t"]) == 9
    assert out.domains["s"] is SOURCE and len(ds.domains["t"]) == 12


def test_merge_keeps_each_duplicated_product_once_as_its_target_item() -> None:
    source = _domain("s", [("a", "x"), ("b", "x"), ("c", "x"), ("f", "x"), ("a", "y"), ("d", "z")])
    ds = Dataset("d", Path("d"), {"s": source, "t": TARGET})
    dups = find_duplicates(TARGET, source, jaccard=0.75)  # X: users {a,b,c} vs x: {a,b,c,f}
    assert dups.source_match == {"X": "x"}
    out = merge_items(ds, "t", "s", dups)
    s, t = out.domains["s"], out.domains["t"]
    # the source copy is gone; the other source items are untouched
    assert "x" not in set(s.items) and sorted(zip(s.users, s.items, strict=True)) == [
        ("a", "y"),
        ("d", "z"),
    ]
    # one target item with the union of users, each (user, item) once
    x_users = sorted(u for u, i in zip(t.users, t.items, strict=True) if i == "X")
    assert x_users == ["a", "b", "c", "f"]
    assert len(set(zip(t.users, t.items, strict=True))) == len(t) == len(TARGET) + 1
    assert t.stats["duplicate_rows_merged_in"] == 1
    assert s.stats["duplicate_item_rows_merged_out"] == 4


def test_merge_keeps_ratings_and_marks_moved_rows_as_training_in_a_given_split() -> None:
    source = DomainData(
        "s", np.array(["a", "b", "f"]), np.array(["x", "x", "x"]), np.array([5.0, 4.0, 3.0])
    )
    target = DomainData(
        "t",
        np.array(["a", "b", "a"]),
        np.array(["X", "X", "W"]),
        np.array([4.0, 5.0, 2.0], dtype=np.float32),
        given_split=np.array([TRAIN, TEST, TRAIN], dtype=np.int8),
    )
    dups = Duplicates(["X"], {"X": "x"}, 0, 3, 2)
    out = merge_items(Dataset("d", Path("d"), {"s": source, "t": target}), "t", "s", dups)
    t = out.domains["t"]
    assert list(t.users[3:]) == ["f"] and list(t.items[3:]) == ["X"]
    assert t.ratings is not None and t.ratings.dtype == np.float32 and t.ratings[3] == 3.0
    assert t.given_split is not None and list(t.given_split) == [TRAIN, TEST, TRAIN, TRAIN]
    assert len(out.domains["s"]) == 0


def test_merged_split_keeps_test_items_out_of_training_and_out_of_the_source() -> None:
    rng = np.random.default_rng(3)
    users = [f"u{k}" for k in range(60)]
    s_pairs = [(u, f"s{int(j)}") for u in users for j in rng.choice(30, 6, replace=False)]
    t_pairs = [(u, f"t{int(j)}") for u in users for j in rng.choice(30, 6, replace=False)]
    # a product listed twice: the same users hold s0 and the target item "dup"
    holders = sorted({u for u, i in s_pairs if i == "s0"})
    t_pairs += [(u, "dup") for u in holders]
    source, target = _domain("s", s_pairs), _domain("t", t_pairs)
    ds = Dataset("d", Path("d"), {"s": source, "t": target})
    dups = find_duplicates(target, source, jaccard=1.0)
    assert dups.source_match == {"dup": "s0"}
    merged = merge_items(ds, "t", "s", dups)
    split = make_split(merged, "t", "s", "ratio", cold_share=0.2, seed=1)
    check_split(split, "t", "s")
    train = set(map(tuple, split.train.tolist()))
    assert not train & set(map(tuple, split.test.tolist()))
    assert "dup" in split.target_items and "s0" not in split.source_items
    cold = set(split.cold_users.tolist())
    assert not cold & {u for u, _ in train}
