"""Candidate sources and the candidate tuple: what retrieval returns and the gateway merges."""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple


class Source(IntEnum):
    """Candidate sources; the values are those of recsys.v1.CandidateSource."""

    UNSPECIFIED = 0
    ANN = 1
    POPULAR = 2
    TRANSFER = 3
    HISTORY = 4


SOURCE_BY_VALUE = {int(s): s for s in Source}


PERSONAL_SOURCES = (Source.ANN, Source.TRANSFER, Source.HISTORY)


class Candidate(NamedTuple):
    """An item proposed by a candidate source (a tuple: hundreds are made per request)."""

    item_id: str
    score: float
    source: Source
    title: str = ""
