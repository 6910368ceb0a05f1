"""The ranker's per-candidate features, built from what retrieval returns (every source's score
and rank per candidate, and what it knows of the user) by the gateway at request time and by
training from the same candidate generation: one function, so both build the same values."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recsys.candidates import EMBEDDING_SOURCES, Candidate, Source

# The columns of a feature ranker's FP32 [N, F] input, in order (docs/ranking-features.md).
FEATURE_NAMES: tuple[str, ...] = (
    "personal_score",  # inner product of the user (or mapped, or recent-items) vector and item
    "personal_rrank",  # 1 / rank in the ANN, TRANSFER or HISTORY list; 0 when not proposed
    "item2item_vote",  # log1p of the vote of the user's source and target items
    "item2item_rrank",
    "recent_vote",  # log1p of the vote of the request's recent items
    "recent_rrank",
    "log_popularity",  # log1p of the item's target-domain training interactions
    "popular_rrank",
    "log_target_history",  # log1p of the user's target-domain training interactions
    "log_source_history",
    "mapped",  # 1: the user's row is mapped from the source domain (no target history)
    "known",  # 1: the retrieval model has a row for the user
    "n_sources",  # how many sources proposed the candidate
)
# Values a feature may take on the wire (larger magnitudes are refused as malformed).
FEATURE_LIMIT = 1e6


@dataclass(frozen=True)
class UserContext:
    """What the retrieval version knows of the user (recsys.v1.UserContext)."""

    known: bool = False
    mapped: bool = False
    target_history: int = 0
    source_history: int = 0


def _rrank(rank: int) -> float:
    return 1.0 / rank if rank > 0 else 0.0


def candidate_features(candidates: Sequence[Candidate], user: UserContext) -> np.ndarray:
    """FP32 [len(candidates), len(FEATURE_NAMES)], columns as FEATURE_NAMES."""
    out = np.zeros((len(candidates), len(FEATURE_NAMES)), np.float32)
    user_cols = (
        math.log1p(user.target_history),
        math.log1p(user.source_history),
        float(user.mapped),
        float(user.known),
    )
    for i, c in enumerate(candidates):
        row = out[i]
        proposed = {c.source}
        for s in c.scores:
            if s.rank > 0:
                proposed.add(s.source)
            if s.source in EMBEDDING_SOURCES:
                row[0], row[1] = s.score, _rrank(s.rank)
            elif s.source == Source.ITEM2ITEM:
                row[2], row[3] = math.log1p(max(s.score, 0.0)), _rrank(s.rank)
            elif s.source == Source.RECENT:
                row[4], row[5] = math.log1p(max(s.score, 0.0)), _rrank(s.rank)
            elif s.source == Source.POPULAR:
                row[6], row[7] = math.log1p(max(s.score, 0.0)), _rrank(s.rank)
        row[8:12] = user_cols
        row[12] = len(proposed)
    np.clip(out, -FEATURE_LIMIT, FEATURE_LIMIT, out=out)
    return out
