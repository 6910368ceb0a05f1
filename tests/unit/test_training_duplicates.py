"""Cross-domain duplicate items: found by their user sets, reported, and dropped on request."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data.dataset import Dataset, DomainData
from training.duplicates import drop_items, find_duplicates


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
