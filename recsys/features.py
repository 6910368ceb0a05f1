"""The ranker's per-candidate features, built from what retrieval returns (every source's score
and rank per candidate, and what it knows of the user) by the gateway at request time and by
training from the same candidate generation: one function, so both build the same values."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from recsys.candidates import EMBEDDING_SOURCES, CandidateTable, Source

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


# Source -> (score column, reciprocal-rank column, log1p of the score)
_COLUMNS = {
    **dict.fromkeys(EMBEDDING_SOURCES, (0, 1, False)),
    Source.ITEM2ITEM: (2, 3, True),
    Source.RECENT: (4, 5, True),
    Source.POPULAR: (6, 7, True),
}


def candidate_features(candidates: CandidateTable, user: UserContext) -> np.ndarray:
    """FP32 [len(candidates), len(FEATURE_NAMES)], columns as FEATURE_NAMES, one column of the
    table at a time. An absent entry (score 0, rank 0) gives 0 in both of its columns; where a
    table has several embedding-source columns, a present entry of a later one wins."""
    n = len(candidates)
    out = np.zeros((n, len(FEATURE_NAMES)), np.float32)
    out[:, 8:12] = (
        math.log1p(user.target_history),
        math.log1p(user.source_history),
        float(user.mapped),
        float(user.known),
    )
    n_sources = np.ones(n, np.float32)
    for j, src in enumerate(candidates.score_sources):
        columns = _COLUMNS.get(src)
        score = candidates.source_scores[:, j].astype(np.float64)
        rank = candidates.source_ranks[:, j]
        n_sources += (rank > 0) & (candidates.sources != int(src))
        if columns is None:
            continue
        score_col, rank_col, log = columns
        rrank = np.where(rank > 0, 1.0 / np.maximum(rank, 1), 0.0)
        value = np.log1p(np.maximum(score, 0.0)) if log else score
        if src in EMBEDDING_SOURCES:
            present = (score != 0) | (rank > 0)
            out[present, score_col], out[present, rank_col] = value[present], rrank[present]
        else:
            out[:, score_col], out[:, rank_col] = value, rrank
    out[:, 12] = n_sources
    np.clip(out, -FEATURE_LIMIT, FEATURE_LIMIT, out=out)
    return out
