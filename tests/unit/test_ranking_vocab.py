"""The vectorised id table agrees with exact dict lookups: known ids, unknown ids (empty, longer,
near misses), repeats, tiny vocabularies, and crowded tables whose probe sequences run long."""

from __future__ import annotations

import numpy as np
import pytest

from serving.ranking.vocab import HashTableVocabulary, build_vocabulary


def _exact(vocabulary: list[str], query: list[str]) -> list[int]:
    index = {item: i for i, item in enumerate(vocabulary)}
    return [index.get(item, -1) for item in query]


@pytest.mark.parametrize("max_load", [0.25, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("size", [1, 2, 17, 5000])
def test_lookups_equal_a_dict(size: int, max_load: float) -> None:
    rng = np.random.default_rng(size)
    vocabulary = [f"B{j:09d}" for j in rng.permutation(10 * size)[:size]]
    table = HashTableVocabulary(vocabulary, max_load=max_load)
    assert table.max_probes >= 1
    picks = [vocabulary[j] for j in rng.integers(0, size, 3 * size + 10)]
    unknown = ["", "nope", "B000000000 ", " " + vocabulary[0], vocabulary[0][:-1], "é" * 30]
    query = picks + unknown + [f"B{j:09d}" for j in range(10 * size, 10 * size + 50)]
    order = rng.permutation(len(query))
    query = [query[i] for i in order]
    assert table.lookup(query).tolist() == _exact(vocabulary, query)


def test_a_crowded_table_has_long_probe_sequences_and_still_agrees() -> None:
    """At 99 % load the window path (ids whose first slot is taken) does most of the work."""
    vocabulary = [f"item{j}" for j in range(2000)]
    table = HashTableVocabulary(vocabulary, max_load=0.99)
    assert table.max_probes > 8
    query = vocabulary[::-1] + [f"item{j}" for j in range(2000, 4000)]
    assert table.lookup(query).tolist() == _exact(vocabulary, query)


def test_empty_inputs() -> None:
    assert HashTableVocabulary([]).lookup(["a"]).tolist() == [-1]
    assert HashTableVocabulary(["a"]).lookup([]).tolist() == []
    assert HashTableVocabulary(["a"]).lookup(["a", "b", "a"]).tolist() == [0, -1, 0]


def test_a_vocabulary_with_a_shared_hash_is_left_to_dict_lookups(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two ids with one 64-bit hash cannot both be tabled: the builder says so and the ranker
    keeps to exact lookups."""
    import builtins

    real_hash = builtins.hash
    monkeypatch.setattr(
        "serving.ranking.vocab.hash",
        lambda s: 7 if s in ("x", "y") else real_hash(s),
        raising=False,
    )
    with caplog.at_level("WARNING"):
        assert build_vocabulary(["x", "y", "z"]) is None
    assert "share a string hash" in caplog.text
    assert build_vocabulary(["x", "z"]) is not None


def test_max_load_is_checked() -> None:
    with pytest.raises(ValueError, match="max_load"):
        HashTableVocabulary(["a"], max_load=1.0)
