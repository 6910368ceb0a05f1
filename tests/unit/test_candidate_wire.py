"""Candidate lists on the wire: what retrieval generates, built into its RetrieveResponse, comes
back out of the gateway's conversion as the same candidates (every source score and rank, the
user context and the model), scores rounded to FP32 as the wire carries them."""

from __future__ import annotations

import numpy as np

from gateway.clients import retrieval_from_reply
from recsys.candidates import Candidate, Source, SourceScore
from recsys.features import UserContext
from recsys.v1 import retrieval_pb2
from serving.retrieval.index import RetrieveResult
from serving.retrieval.servicer import build_response


def _f32(x: float) -> float:
    return float(np.float32(x))


def test_a_candidate_list_round_trips_through_the_wire() -> None:
    rng = np.random.default_rng(0)
    sources = [Source.ANN, Source.ITEM2ITEM, Source.RECENT, Source.POPULAR]
    candidates = [
        Candidate(
            f"item{j}",
            float(rng.normal()),
            sources[j % 4],
            f"Title {j}" if j % 3 else "",
            tuple(SourceScore(s, float(rng.normal()), int(rng.integers(0, 9))) for s in sources)
            if j % 5
            else (),
        )
        for j in range(50)
    ]
    user = UserContext(known=True, mapped=True, target_history=7, source_history=3)
    result = RetrieveResult(candidates, (Source.ANN, Source.ITEM2ITEM), user)
    wire = retrieval_pb2.RetrieveResponse.FromString(
        build_response(result, "books-retrieval", 4).SerializeToString()
    )
    back = retrieval_from_reply(wire)
    assert (back.model_name, back.model_version, back.user) == ("books-retrieval", "4", user)
    expected = [
        Candidate(
            c.item_id,
            _f32(c.score),
            c.source,
            c.title,
            tuple(SourceScore(s.source, _f32(s.score), s.rank) for s in c.scores),
        )
        for c in candidates
    ]
    assert back.candidates == expected
    assert all(isinstance(c.source, Source) for c in back.candidates)
    assert all(isinstance(s.source, Source) for c in back.candidates for s in c.scores)


def test_an_unknown_source_value_reads_as_unspecified() -> None:
    reply = retrieval_pb2.RetrieveResponse()
    candidate = reply.candidates.add(item_id="a", score=1.0, source=99)
    candidate.source_scores.add(source=42, score=0.5, rank=1)
    back = retrieval_from_reply(reply).candidates
    assert back[0].source is Source.UNSPECIFIED
    assert back[0].scores[0].source is Source.UNSPECIFIED
