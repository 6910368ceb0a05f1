"""Candidate sources, the candidate tuple (the row view) and the candidate table (the columns
retrieval computes, the wire carries and the gateway merges and ranks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import numpy as np


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


@dataclass(frozen=True)
class CandidateTable:
    """A candidate list as columns (what retrieval computes, the wire's CandidateColumns and what
    the gateway merges and ranks): entry i of every column is candidate i. Per-source columns
    hold every candidate's score and 1-based rank in that source's list (0: not proposed); an
    entry with score 0 and rank 0 counts as absent where lists are merged."""

    item_ids: list[str]
    sources: np.ndarray  # int64 [n]: the source each item was taken from
    scores: np.ndarray  # float32 [n]: that source's score
    titles: list[str]
    score_sources: tuple[Source, ...]  # the sources of the columns below
    source_scores: np.ndarray  # float32 [n, len(score_sources)]
    source_ranks: np.ndarray  # int64 [n, len(score_sources)]

    def __len__(self) -> int:
        return len(self.item_ids)

    @classmethod
    def unscored(
        cls, item_ids: list[str], source: Source, scores: np.ndarray, titles: list[str]
    ) -> CandidateTable:
        """Items of one source with their scores and no per-source columns."""
        n = len(item_ids)
        return cls(
            item_ids,
            np.full(n, int(source), np.int64),
            np.asarray(scores, np.float32),
            titles,
            (),
            np.zeros((n, 0), np.float32),
            np.zeros((n, 0), np.int64),
        )

    @classmethod
    def empty(cls) -> CandidateTable:
        return cls.unscored([], Source.UNSPECIFIED, np.zeros(0, np.float32), [])

    @classmethod
    def from_rows(cls, rows: Sequence[Candidate]) -> CandidateTable:
        """The table of a row list; a source that some rows lack is absent (0, 0) there."""
        columns = tuple(dict.fromkeys(s.source for c in rows for s in c.scores))
        at = {source: i for i, source in enumerate(columns)}
        scores = np.zeros((len(rows), len(columns)), np.float32)
        ranks = np.zeros((len(rows), len(columns)), np.int64)
        for i, c in enumerate(rows):
            for s in c.scores:
                scores[i, at[s.source]], ranks[i, at[s.source]] = s.score, s.rank
        return cls(
            [c.item_id for c in rows],
            np.fromiter((c.source for c in rows), np.int64, len(rows)),
            np.fromiter((c.score for c in rows), np.float32, len(rows)),
            [c.title for c in rows],
            columns,
            scores,
            ranks,
        )

    def rows(self) -> list[Candidate]:
        """The row view: one Candidate per item with every column's score and rank."""
        source_of, unknown = SOURCE_BY_VALUE.get, Source.UNSPECIFIED
        columns = [source_of(int(s), unknown) for s in self.score_sources]
        scores, ranks = self.source_scores.tolist(), self.source_ranks.tolist()
        return [
            Candidate(
                item,
                score,
                source_of(source, unknown),
                title,
                tuple(map(SourceScore, columns, row_scores, row_ranks)),
            )
            for item, score, source, title, row_scores, row_ranks in zip(
                self.item_ids,
                self.scores.tolist(),
                self.sources.tolist(),
                self.titles,
                scores,
                ranks,
                strict=True,
            )
        ]

    def take(self, index: np.ndarray | Sequence[int]) -> CandidateTable:
        """The candidates at `index`, in that order."""
        index = np.asarray(index, np.int64)
        positions = index.tolist()
        return CandidateTable(
            [self.item_ids[i] for i in positions],
            self.sources[index],
            self.scores[index],
            [self.titles[i] for i in positions],
            self.score_sources,
            self.source_scores[index],
            self.source_ranks[index],
        )

    def with_columns(self, columns: tuple[Source, ...]) -> CandidateTable:
        """The same candidates with exactly `columns` (a source this table lacks is absent)."""
        if columns == self.score_sources:
            return self
        scores = np.zeros((len(self), len(columns)), np.float32)
        ranks = np.zeros((len(self), len(columns)), np.int64)
        for j, source in enumerate(self.score_sources):
            if source in columns:
                scores[:, columns.index(source)] = self.source_scores[:, j]
                ranks[:, columns.index(source)] = self.source_ranks[:, j]
        return CandidateTable(
            self.item_ids, self.sources, self.scores, self.titles, columns, scores, ranks
        )

    def proposed_by(self, i: int) -> tuple[Source, ...]:
        """The sources that proposed item i (rank > 0), the one it was taken from first."""
        first = SOURCE_BY_VALUE.get(int(self.sources[i]), Source.UNSPECIFIED)
        others = tuple(
            s
            for s, rank in zip(self.score_sources, self.source_ranks[i].tolist(), strict=True)
            if rank > 0 and s != first
        )
        return (first, *others)


def merge_candidates(
    tables: Sequence[CandidateTable], exclude: frozenset[str] = frozenset()
) -> CandidateTable:
    """Concatenate candidate lists in priority order, keeping each item's first (best-source)
    occurrence and dropping excluded ids. A later occurrence contributes its per-source entries
    where the first has none (score 0, rank 0) or proposed the item at a worse rank (or not at
    all); the lists themselves hold no duplicates (retrieval's answers do not)."""
    columns = tuple(dict.fromkeys(s for t in tables for s in t.score_sources))
    tables = [t.with_columns(columns) for t in tables if len(t)]
    if not tables:
        return CandidateTable.empty().with_columns(columns)
    ids = [i for t in tables for i in t.item_ids]
    # Each id's first row (built in C: later rows are overwritten by earlier ones), less the
    # excluded ids; the rows kept are those first rows in order.
    first = dict(zip(reversed(ids), range(len(ids) - 1, -1, -1), strict=True))
    for item in exclude:
        first.pop(item, None)
    kept = np.sort(np.fromiter(first.values(), np.int64, len(first)))
    if len(tables) == 1 and len(kept) == len(ids):
        return tables[0]
    # Per list, (first row, row) of its items that an earlier list already had.
    later: list[list[tuple[int, int]]] = []
    if len(kept) < len(ids):
        is_first = np.zeros(len(ids), bool)
        is_first[kept] = True
        offset = 0
        for table in tables:
            repeats = []
            for row in np.flatnonzero(~is_first[offset : offset + len(table)]).tolist():
                at = first.get(ids[offset + row])
                if at is not None:
                    repeats.append((at, offset + row))
            later.append(repeats)
            offset += len(table)
    merged = CandidateTable(
        ids,
        np.concatenate([t.sources for t in tables]),
        np.concatenate([t.scores for t in tables]),
        [i for t in tables for i in t.titles],
        columns,
        np.concatenate([t.source_scores for t in tables]),
        np.concatenate([t.source_ranks for t in tables]),
    )
    scores, ranks = merged.source_scores, merged.source_ranks
    for repeats in later:
        if not repeats:
            continue
        target, again = (np.asarray(x, np.int64) for x in zip(*repeats, strict=True))
        have_score, have_rank = scores[target], ranks[target]
        new_score, new_rank = scores[again], ranks[again]
        absent = (have_score == 0) & (have_rank == 0)
        better = (new_rank > 0) & ((have_rank == 0) | (new_rank < have_rank))
        replace = absent | better
        scores[target] = np.where(replace, new_score, have_score)
        ranks[target] = np.where(replace, new_rank, have_rank)
    return merged.take(kept)
