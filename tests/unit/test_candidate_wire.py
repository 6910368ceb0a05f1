"""Candidate lists on the wire: what retrieval generates, built into its RetrieveResponse as
columns (RetrieveRequest.columnar), packed columns (RetrieveRequest.packed: little-endian bytes)
or as rows (older clients), comes back out of the gateway's
conversion as the same candidates (every source score and rank, the user context and the model),
scores rounded to FP32 as the wire carries them; and the table's row view, merge and features
agree with the row form they replace."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gateway.clients import retrieval_from_reply
from gateway.pipeline import UpstreamError
from recsys.candidates import EMBEDDING_SOURCES, Candidate, CandidateTable, Source, SourceScore
from recsys.features import FEATURE_NAMES, UserContext, candidate_features
from recsys.v1 import retrieval_pb2
from serving.retrieval.index import RetrieveResult
from serving.retrieval.servicer import build_response

COLUMNS = (Source.ANN, Source.ITEM2ITEM, Source.RECENT, Source.POPULAR)


def _f32(x: float) -> float:
    return float(np.float32(x))


def planted(n: int = 50, seed: int = 0, columns: tuple[Source, ...] = COLUMNS) -> list[Candidate]:
    """Rows as retrieval produces them: every candidate scored by every column's source, taken
    from one of them (the score of the candidate is that source's), ranks 0 where not proposed."""
    rng = np.random.default_rng(seed)
    rows = []
    for j in range(n):
        scores = tuple(SourceScore(s, _f32(rng.normal()), int(rng.integers(0, 9))) for s in columns)
        taken = scores[j % len(columns)]
        rows.append(
            Candidate(f"item{j}", taken.score, taken.source, f"Title {j}" if j % 3 else "", scores)
        )
    return rows


# The three wire forms: rows, columns of repeated values, columns of packed bytes.
FORMS = {"rows": (False, False), "columns": (True, False), "packed": (True, True)}


def wire(result: RetrieveResult, form: str) -> retrieval_pb2.RetrieveResponse:
    columnar, packed = FORMS[form]
    response = build_response(result, "books-retrieval", 4, columnar=columnar, packed=packed)
    return retrieval_pb2.RetrieveResponse.FromString(response.SerializeToString())


def test_the_table_row_view_round_trips() -> None:
    rows = planted()
    table = CandidateTable.from_rows(rows)
    assert table.score_sources == COLUMNS and len(table) == len(rows)
    assert table.rows() == rows
    assert [table.proposed_by(i) for i in range(len(rows))] == [c.proposed_by for c in rows]
    picked = table.take([3, 0, 7])
    assert picked.rows() == [rows[3], rows[0], rows[7]]


@pytest.mark.parametrize("form", list(FORMS))
def test_a_candidate_list_round_trips_through_the_wire(form: str) -> None:
    rng = np.random.default_rng(1)
    rows = [
        c._replace(
            score=float(rng.normal()),
            scores=tuple(s._replace(score=float(rng.normal())) for s in c.scores),
        )
        for c in planted()
    ]
    user = UserContext(known=True, mapped=True, target_history=7, source_history=3)
    result = RetrieveResult(CandidateTable.from_rows(rows), (Source.ANN, Source.ITEM2ITEM), user)
    reply = wire(result, form)
    columnar, packed = FORMS[form]
    assert reply.HasField("columns") == columnar and bool(reply.candidates) != columnar
    # Packed answers carry bytes and no repeated numeric values, and the other way round.
    assert bool(reply.columns.scores_f32) == packed and bool(reply.columns.scores) == (
        columnar and not packed
    )
    back = retrieval_from_reply(reply)
    assert (back.model_name, back.model_version, back.user) == ("books-retrieval", "4", user)
    expected = [
        Candidate(
            c.item_id,
            _f32(c.score),
            c.source,
            c.title,
            tuple(SourceScore(s.source, _f32(s.score), s.rank) for s in c.scores),
        )
        for c in rows
    ]
    got = back.candidates.rows()
    assert got == expected
    assert all(isinstance(c.source, Source) for c in got)
    assert all(isinstance(s.source, Source) for c in got for s in c.scores)


@pytest.mark.parametrize("form", ["columns", "packed"])
def test_every_wire_form_gives_the_same_table(form: str) -> None:
    result = RetrieveResult(CandidateTable.from_rows(planted(80, seed=2)), (), UserContext())
    columns = retrieval_from_reply(wire(result, form)).candidates
    rows = retrieval_from_reply(wire(result, "rows")).candidates
    assert columns.item_ids == rows.item_ids and columns.titles == rows.titles
    assert columns.score_sources == rows.score_sources
    for name in ("sources", "scores", "source_scores", "source_ranks"):
        got, want = getattr(columns, name), getattr(rows, name)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    # The arrays read from packed bytes are the table's own (merge writes into them).
    assert columns.source_scores.flags.writeable and columns.scores.flags.writeable


def test_an_unknown_source_value_reads_as_unspecified() -> None:
    reply = retrieval_pb2.RetrieveResponse()
    candidate = reply.candidates.add(item_id="a", score=1.0, source=99)
    candidate.source_scores.add(source=42, score=0.5, rank=1)
    back = retrieval_from_reply(reply).candidates.rows()
    assert back[0].source is Source.UNSPECIFIED
    assert back[0].scores[0].source is Source.UNSPECIFIED

    columnar = retrieval_pb2.RetrieveResponse()
    columnar.columns.item_ids.append("a")
    columnar.columns.sources.append(99)
    columnar.columns.scores.append(1.0)
    columnar.columns.source_scores.add(source=42, scores=[0.5], ranks=[1])
    assert retrieval_from_reply(columnar).candidates.rows() == [
        Candidate("a", 1.0, Source.UNSPECIFIED, "", (SourceScore(Source.UNSPECIFIED, 0.5, 1),))
    ]


def test_columns_of_unequal_lengths_are_an_upstream_error() -> None:
    reply = retrieval_pb2.RetrieveResponse()
    reply.columns.item_ids.extend(["a", "b"])
    reply.columns.sources.extend([1, 1])
    reply.columns.scores.extend([1.0, 0.5])
    reply.columns.source_scores.add(source=1, scores=[1.0, 0.5], ranks=[1])
    with pytest.raises(UpstreamError) as raised:
        retrieval_from_reply(reply)
    assert raised.value.code == "INTERNAL"


@pytest.mark.parametrize(
    "column, size",
    [("scores_f32", 4), ("scores_f32", 7), ("sources_i32", 12), ("ranks_u32", 0)],
)
def test_packed_columns_of_the_wrong_size_are_an_upstream_error(column: str, size: int) -> None:
    """Two candidates need 8 bytes in every packed column: fewer, more or a partial value is
    refused, never read past or padded."""
    reply = retrieval_pb2.RetrieveResponse()
    reply.columns.item_ids.extend(["a", "b"])
    reply.columns.sources_i32 = np.array([1, 1], "<i4").tobytes()
    reply.columns.scores_f32 = np.array([1.0, 0.5], "<f4").tobytes()
    source = reply.columns.source_scores.add(source=1)
    source.scores_f32 = np.array([1.0, 0.5], "<f4").tobytes()
    source.ranks_u32 = np.array([1, 2], "<u4").tobytes()
    assert len(retrieval_from_reply(reply).candidates) == 2
    owner = source if column == "ranks_u32" else reply.columns
    setattr(owner, column, bytes(size))
    with pytest.raises(UpstreamError) as raised:
        retrieval_from_reply(reply)
    assert raised.value.code == "INTERNAL" and "unequal lengths" in raised.value.detail


# The feature definition row by row (docs/ranking-features.md), to check the table's columns.
_ROW_COLUMNS = {
    **dict.fromkeys(EMBEDDING_SOURCES, (0, 1, False)),
    Source.ITEM2ITEM: (2, 3, True),
    Source.RECENT: (4, 5, True),
    Source.POPULAR: (6, 7, True),
}


def row_features(c: Candidate, user: UserContext) -> list[float]:
    out = [0.0] * len(FEATURE_NAMES)
    for s in c.scores:
        if s.source in _ROW_COLUMNS:
            score_col, rank_col, log = _ROW_COLUMNS[s.source]
            out[score_col] = math.log1p(max(s.score, 0.0)) if log else s.score
            out[rank_col] = 1.0 / s.rank if s.rank > 0 else 0.0
    out[8:12] = [
        math.log1p(user.target_history),
        math.log1p(user.source_history),
        float(user.mapped),
        float(user.known),
    ]
    out[12] = 1 + sum(1 for s in c.scores if s.rank > 0 and s.source != c.source)
    return out


@pytest.mark.parametrize("personal", [Source.ANN, Source.TRANSFER, Source.HISTORY])
def test_features_of_the_table_match_the_row_definition(personal: Source) -> None:
    rows = planted(60, seed=3, columns=(personal, *COLUMNS[1:]))
    user = UserContext(known=True, mapped=personal == Source.TRANSFER, target_history=4)
    got = candidate_features(CandidateTable.from_rows(rows), user)
    expected = np.array([row_features(c, user) for c in rows], np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
