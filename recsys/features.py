"""The ranker's per-candidate features, built from what retrieval returns (every source's score
and rank per candidate, and what it knows of the user) by the gateway at request time and by
training from the same candidate generation: one function, so both build the same values."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

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


# Source -> (score column, reciprocal-rank column, log1p of the score)
_COLUMNS = {
    **dict.fromkeys(EMBEDDING_SOURCES, (0, 1, False)),
    Source.ITEM2ITEM: (2, 3, True),
    Source.RECENT: (4, 5, True),
    Source.POPULAR: (6, 7, True),
}


def candidate_features(candidates: Sequence[Candidate], user: UserContext) -> np.ndarray:
    """FP32 [len(candidates), len(FEATURE_NAMES)], columns as FEATURE_NAMES."""
    n = len(candidates)
    out = np.zeros((n, len(FEATURE_NAMES)), np.float32)
    out[:, 8:12] = (
        math.log1p(user.target_history),
        math.log1p(user.source_history),
        float(user.mapped),
        float(user.known),
    )
    # Every (source, score, rank) of every candidate, flattened in C (no tuple per score).
    counts = np.fromiter((len(c.scores) for c in candidates), np.int64, n)
    m = int(counts.sum())
    primary = np.fromiter((c.source for c in candidates), np.int64, n)
    n_sources = np.ones(n, np.float32)
    if m:
        scores = chain.from_iterable(c.scores for c in candidates)
        table = np.fromiter(chain.from_iterable(scores), np.float64, 3 * m).reshape(m, 3)
        row = np.repeat(np.arange(n), counts)
        source = table[:, 0].astype(np.int64)
        score, rank = table[:, 1], table[:, 2]
        for src, (score_col, rank_col, log) in _COLUMNS.items():
            mask = source == int(src)
            if not mask.any():
                continue
            value = np.log1p(np.maximum(score[mask], 0.0)) if log else score[mask]
            out[row[mask], score_col] = value
            r = rank[mask]
            out[row[mask], rank_col] = np.where(r > 0, 1.0 / np.maximum(r, 1.0), 0.0)
        other = (rank > 0) & (source != primary[row])
        n_sources += np.bincount(row[other], minlength=n).astype(np.float32)
    out[:, 12] = n_sources
    np.clip(out, -FEATURE_LIMIT, FEATURE_LIMIT, out=out)
    return out
