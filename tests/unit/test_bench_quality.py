"""bench.quality merges a partial rerun into the stored results instead of replacing them."""

from __future__ import annotations

from bench.quality import fmt, mean_sd, merge_seed


def _res(shares: list[str], wall: float) -> dict[str, object]:
    return {
        "shares": {s: {"run": wall} for s in shares},
        "wall_s": wall,
        "peak_memory_mb": 100.0 + wall,
        "overrides": [],
    }


def test_a_rerun_of_other_shares_keeps_the_earlier_shares_and_both_timings() -> None:
    merged = merge_seed(_res(["0.2"], 10.0), _res(["0.0", "0.5"], 20.0))
    assert merged["shares"] == {"0.2": {"run": 10.0}, "0.0": {"run": 20.0}, "0.5": {"run": 20.0}}
    assert [r["shares"] for r in merged["runs"]] == [["0.2"], ["0.0", "0.5"]]
    assert [r["wall_s"] for r in merged["runs"]] == [10.0, 20.0]


def test_a_rerun_of_the_same_share_replaces_it_and_a_failed_rerun_keeps_the_old_one() -> None:
    again = merge_seed(merge_seed(None, _res(["0.2"], 10.0)), _res(["0.2"], 30.0))
    assert again["shares"] == {"0.2": {"run": 30.0}} and len(again["runs"]) == 2
    failed = merge_seed(_res(["0.2"], 10.0), {"error": ["boom"], "wall_s": 1.0})
    assert "error" not in failed and failed["shares"] == {"0.2": {"run": 10.0}}
    assert failed["runs"][-1]["error"] == ["boom"]
    assert "error" in merge_seed(None, {"error": ["boom"], "wall_s": 1.0})


def test_a_figure_from_one_seed_says_so_instead_of_a_zero_sd() -> None:
    assert fmt(mean_sd([0.25])) == "0.2500 (1 seed)"
    assert fmt(mean_sd([0.2, 0.3])) == "0.2500 ± 0.0707"
    assert fmt(mean_sd([float("nan")])) == "n/a"
