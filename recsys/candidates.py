"""Candidate sources and the candidate tuple: what retrieval returns and the gateway merges."""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import NamedTuple


class Source(IntEnum):
    """Candidate sources; the values are those of recsys.v1.CandidateSource."""

    UNSPECIFIED = 0
    ANN = 1
    POPULAR = 2
    TRANSFER = 3
    HISTORY = 4
    ITEM2ITEM = 5
    RECENT = 6


SOURCE_BY_VALUE = {int(s): s for s in Source}


# The sources the gateway's personal call asks for (the popular call asks for POPULAR alone).
PERSONAL_SOURCES = (Source.ANN, Source.TRANSFER, Source.HISTORY, Source.ITEM2ITEM, Source.RECENT)
# The sources whose score is the user representation's inner product with the item.
EMBEDDING_SOURCES = (Source.ANN, Source.TRANSFER, Source.HISTORY)


class SourceScore(NamedTuple):
    """One source's score of a candidate and its 1-based rank in that source's list (0: the
    source did not propose the candidate; its score is still computed)."""

    source: Source
    score: float
    rank: int


class Candidate(NamedTuple):
    """An item proposed by a candidate source (a tuple: hundreds are made per request)."""

    item_id: str
    score: float
    source: Source
    title: str = ""
    # Every source's score and rank (empty where the producer computed none).
    scores: tuple[SourceScore, ...] = ()

    @property
    def proposed_by(self) -> tuple[Source, ...]:
        """The sources that proposed the item (rank > 0), `source` first."""
        others = tuple(s.source for s in self.scores if s.rank > 0 and s.source != self.source)
        return (self.source, *others)


def combine_scores(
    first: Sequence[SourceScore], second: Sequence[SourceScore]
) -> tuple[SourceScore, ...]:
    """Per source, the entry that proposed the item (the better rank), else the first's."""
    out: dict[Source, SourceScore] = {s.source: s for s in first}
    for s in second:
        have = out.get(s.source)
        if have is None or (s.rank > 0 and (have.rank == 0 or s.rank < have.rank)):
            out[s.source] = s
    return tuple(out.values())


def merge_candidates(
    lists: Sequence[Sequence[Candidate]], exclude: frozenset[str] = frozenset()
) -> list[Candidate]:
    """Concatenate candidate lists in priority order, keeping each item's first (best-source)
    occurrence, with the per-source scores of all its occurrences, and dropping excluded ids."""
    position: dict[str, int] = {}
    merged: list[Candidate] = []
    for candidates in lists:
        for candidate in candidates:
            if candidate.item_id in exclude:
                continue
            at = position.get(candidate.item_id)
            if at is None:
                position[candidate.item_id] = len(merged)
                merged.append(candidate)
            elif candidate.scores:
                first = merged[at]
                merged[at] = first._replace(scores=combine_scores(first.scores, candidate.scores))
    return merged
