"""Candidate sources: item-to-item neighbours (computed and planted), recent-history neighbours,
popular items, every source's score per candidate, the merge and the ranker's features."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.candidates import Candidate, CandidateTable, Source, SourceScore, merge_candidates
from recsys.features import FEATURE_NAMES, UserContext, candidate_features
from recsys.sources import CandidateSources, Neighbours, NeighboursError, UserState, exact_search
from serving.retrieval.index import IndexOptions, RetrievalIndex
from training.ranker import compute_neighbours

N_ITEMS = 12


def planted() -> Neighbours:
    """t1's neighbours are t6 (0.8) and t7 (0.2); source item s0's is t5 (0.9); t2's is t9."""
    target = np.full((N_ITEMS, 2), -1, np.int32)
    target_scores = np.zeros((N_ITEMS, 2), np.float32)
    target[1], target_scores[1] = [6, 7], [0.8, 0.2]
    target[2], target_scores[2] = [9, -1], [0.5, 0.0]
    source = np.array([[5, -1], [-1, -1]], np.int32)
    source_scores = np.array([[0.9, 0.0], [0.0, 0.0]], np.float32)
    # users: row 0 consumed s0 in the source domain; row 1 nothing
    return Neighbours(
        target, target_scores, source, source_scores, np.array([0, 1, 1]), np.array([0])
    )


def sources(neighbours: Neighbours | None = None) -> CandidateSources:
    rng = np.random.default_rng(0)
    items = rng.standard_normal((N_ITEMS, 4)).astype(np.float32)
    return CandidateSources(
        item_ids=[f"t{j}" for j in range(N_ITEMS)],
        titles=[""] * N_ITEMS,
        item_embeddings=items,
        popularity=np.arange(N_ITEMS, dtype=np.float32)[::-1].copy(),  # t0 most popular
        neighbours=neighbours or planted(),
        search=exact_search(items),
    )


def state(**overrides: object) -> UserState:
    values: dict[str, object] = {
        "row": 0,
        "mapped": False,
        "vector": np.ones(4, np.float32),
        "personal": Source.ANN,
        "target_rows": np.array([1]),
        "source_rows": np.array([0]),
        "recent_rows": np.zeros(0, np.int64),
    }
    values.update(overrides)
    return UserState(**values)  # type: ignore[arg-type]


def test_item2item_finds_the_planted_neighbours_of_source_and_target_items() -> None:
    got = sources().generate(state(), 10, {Source.ITEM2ITEM}, excluded={1})
    assert [c.item_id for c in got.candidates] == ["t5", "t6", "t7"]  # votes 0.9, 0.8, 0.2
    assert got.sources == (Source.ITEM2ITEM,)
    votes = {c.item_id: c.scores for c in got.candidates}
    assert SourceScore(Source.ITEM2ITEM, pytest.approx(0.9), 1) in votes["t5"]
    assert SourceScore(Source.ITEM2ITEM, pytest.approx(0.2), 3) in votes["t7"]


def test_votes_of_several_items_add_up() -> None:
    neighbours = planted()
    neighbours.source[0] = [6, -1]  # s0 also votes for t6 (0.9 + 0.8 from t1)
    got = sources(neighbours).generate(state(), 10, {Source.ITEM2ITEM}, excluded={1})
    assert got.candidates[0].item_id == "t6"
    assert got.candidates[0].score == pytest.approx(1.7)


def test_recent_items_propose_their_neighbours() -> None:
    user = state(recent_rows=np.array([2]), target_rows=np.zeros(0, np.int64))
    got = sources().generate(user, 10, {Source.RECENT}, excluded=set())
    assert [c.item_id for c in got.candidates] == ["t9"]
    assert got.candidates[0].source == Source.RECENT


def test_excluded_items_are_never_proposed() -> None:
    got = sources().generate(state(), 10, {Source.ITEM2ITEM, Source.ANN}, excluded={5, 6, 1})
    assert not {"t5", "t6", "t1"} & {c.item_id for c in got.candidates}


def test_lists_are_interleaved_and_every_candidate_has_every_score() -> None:
    src = sources()
    user = state()
    got = src.generate(user, 6, {Source.ANN, Source.ITEM2ITEM, Source.POPULAR}, excluded={1})
    ann = src.search(np.ones(4, np.float32), 6, {1})[0].tolist()
    ids = [c.item_id for c in got.candidates]
    assert len(ids) == 6 == len(set(ids))
    assert ids[0] == f"t{ann[0]}"  # the personal list leads, item-to-item second
    assert got.candidates[1].source == Source.ITEM2ITEM or ids[1] == f"t{ann[1]}"
    for c in got.candidates:
        by = {s.source: s for s in c.scores}
        j = int(c.item_id[1:])
        assert by[Source.ANN].score == pytest.approx(float(src.item_embeddings[j].sum()), rel=1e-5)
        assert by[Source.POPULAR].score == src.popularity[j]
        assert (by[Source.ANN].rank > 0) == (j in ann)


def test_popular_fills_and_ranks_in_its_own_list() -> None:
    user = state(vector=None, personal=None, target_rows=np.zeros(0, np.int64))
    user = UserState(**{**user.__dict__, "source_rows": np.zeros(0, np.int64)})
    got = sources().generate(user, 3, {Source.POPULAR}, excluded={0})
    assert [(c.item_id, c.source) for c in got.candidates] == [
        ("t1", Source.POPULAR),
        ("t2", Source.POPULAR),
        ("t3", Source.POPULAR),
    ]
    assert [{s.source: s.rank for s in c.scores}[Source.POPULAR] for c in got.candidates] == [
        1,
        2,
        3,
    ]


def test_compute_neighbours_finds_planted_co_consumption() -> None:
    # users 0-4 consumed source item 0 and target item 3; users 5-9 target items 1 and 2;
    # everyone also consumed noise items at random.
    rng = np.random.default_rng(1)
    target = [(u, 3) for u in range(5)] + [(u, j) for u in range(5, 10) for j in (1, 2)]
    target += [(u, int(rng.integers(4, 20))) for u in range(10)]
    source = [(u, 0) for u in range(5)] + [(u, int(rng.integers(1, 6))) for u in range(10)]
    rows = np.array([9, 0, 3])
    got = compute_neighbours(np.array(target), np.array(source), 10, 20, 6, rows, n=3)
    assert got.source[0, 0] == 3 and got.source_scores[0, 0] == pytest.approx(
        5 / np.sqrt(5 * 5), rel=1e-5
    )
    assert got.target[1, 0] == 2 and got.target[2, 0] == 1
    assert 1 not in got.target[1]  # never its own neighbour
    assert got.source_rows(1).tolist().count(0) == 1  # user 0 (published row 1) has s0
    assert 0 not in got.source_rows(0).tolist()  # user 9 never consumed s0


def test_neighbours_that_do_not_fit_the_version_are_refused(tmp_path: object) -> None:
    path = tmp_path / "neighbours.npz"  # type: ignore[operator]
    planted().save(path)
    assert Neighbours.load(path, N_ITEMS, 2).target.shape == (N_ITEMS, 2)
    with pytest.raises(NeighboursError, match="rows"):
        Neighbours.load(path, N_ITEMS + 1, 2)
    with pytest.raises(NeighboursError, match="source_seen"):
        Neighbours.load(path, N_ITEMS, 5)


def test_retrieval_index_proposes_item2item_and_reports_the_user() -> None:
    rng = np.random.default_rng(2)
    items = rng.standard_normal((N_ITEMS, 4)).astype(np.float32)
    index = RetrievalIndex(
        model_name="books-retrieval",
        version=3,
        user_ids=["u0", "u1"],
        user_kinds=["target", "mapped"],
        item_ids=[f"t{j}" for j in range(N_ITEMS)],
        titles=[""] * N_ITEMS,
        popularity=np.ones(N_ITEMS, np.float32),
        item_embeddings=items,
        user_embeddings=rng.standard_normal((2, 4)).astype(np.float32),
        seen_indptr=np.array([0, 1, 1]),
        seen_indices=np.array([1]),
        options=IndexOptions(),
        neighbours=planted(),
    )
    got = index.retrieve("u0", 12, exclude_seen=True, sources=[Source.ITEM2ITEM])
    assert [c.item_id for c in got.candidates] == ["t5", "t6", "t7"]
    assert got.user == UserContext(known=True, mapped=False, target_history=1, source_history=1)
    cold = index.retrieve("u1", 4, history_item_ids=["t2"])
    assert cold.user.mapped and cold.candidates[0].source == Source.TRANSFER
    assert "t9" in {c.item_id for c in cold.candidates if c.source == Source.RECENT}


def test_merge_keeps_every_source_score_of_an_item() -> None:
    personal = Candidate(
        "a",
        1.0,
        Source.ANN,
        "",
        (SourceScore(Source.ANN, 1.0, 1), SourceScore(Source.POPULAR, 7.0, 0)),
    )
    popular = Candidate(
        "a",
        7.0,
        Source.POPULAR,
        "",
        (SourceScore(Source.ANN, 1.0, 0), SourceScore(Source.POPULAR, 7.0, 2)),
    )
    table = merge_candidates(
        [CandidateTable.from_rows([personal]), CandidateTable.from_rows([popular])]
    )
    (merged,) = table.rows()
    assert merged.source == Source.ANN
    assert set(merged.scores) == {
        SourceScore(Source.ANN, 1.0, 1),
        SourceScore(Source.POPULAR, 7.0, 2),
    }
    assert merged.proposed_by == table.proposed_by(0) == (Source.ANN, Source.POPULAR)
    row = candidate_features(table, UserContext(known=True, target_history=3, source_history=0))[0]
    named = dict(zip(FEATURE_NAMES, row.tolist(), strict=True))
    assert named["personal_score"] == 1.0 and named["personal_rrank"] == 1.0
    assert named["popular_rrank"] == 0.5 and named["log_popularity"] == pytest.approx(np.log1p(7))
    assert named["n_sources"] == 2 and named["known"] == 1 and named["mapped"] == 0
    assert named["log_target_history"] == pytest.approx(np.log1p(3))


def test_votes_are_summed_over_the_neighbours_only() -> None:
    # t1 and t2 consumed, s0 in the source domain: t6 0.8, t7 0.2, t9 0.5, t5 0.9; t1 twice
    votes = planted().vote(np.array([1, 2, 1]), np.array([0]))
    assert votes.rows.tolist() == [5, 6, 7, 9]
    np.testing.assert_allclose(votes.scores, [0.9, 1.6, 0.4, 0.5], rtol=1e-6)
    np.testing.assert_allclose(votes.of(np.array([9, 0, 6, 11])), [0.5, 0.0, 1.6, 0.0], rtol=1e-6)
    assert planted().vote(np.zeros(0, np.int64), np.zeros(0, np.int64)).of(np.array([3])) == 0
