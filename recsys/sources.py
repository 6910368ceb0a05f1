"""Candidate generation shared by the retrieval service and the training of the ranker: the
sources (the user representation's nearest items, cross-domain item-to-item neighbours, the
neighbours of recent items, popular items), their interleaving, and every source's score of
every candidate, so that the ranker is trained on the candidates and scores it is served."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsys.candidates import Candidate, CandidateTable, Source

NEIGHBOURS_FILE = "neighbours.npz"

# (vector, k, excluded rows) -> (item rows int64, inner products float32), best first
Search = Callable[[np.ndarray, int, "set[int] | frozenset[int]"], "tuple[np.ndarray, np.ndarray]"]


class NeighboursError(ValueError):
    """A neighbours file that does not fit the version it is published with."""


@dataclass(frozen=True)
class Neighbours:
    """Top-N target-item neighbours of every target item and every source item (row -1 pads a
    short list), and each user's source-domain training items (rows of the source item list, in
    the order of the version's users.json)."""

    target: np.ndarray  # int32 [n_items, N]
    target_scores: np.ndarray  # float32 [n_items, N]
    source: np.ndarray  # int32 [n_source_items, N]
    source_scores: np.ndarray  # float32 [n_source_items, N]
    source_seen_indptr: np.ndarray  # int64 [n_users + 1]
    source_seen_indices: np.ndarray  # int64

    @classmethod
    def empty(cls, n_items: int, n_users: int) -> Neighbours:
        return cls(
            np.full((n_items, 0), -1, np.int32),
            np.zeros((n_items, 0), np.float32),
            np.full((0, 0), -1, np.int32),
            np.zeros((0, 0), np.float32),
            np.zeros(n_users + 1, np.int64),
            np.zeros(0, np.int64),
        )

    def save(self, path: Path) -> None:
        np.savez(
            path,
            target=self.target,
            target_scores=self.target_scores,
            source=self.source,
            source_scores=self.source_scores,
            source_seen_indptr=self.source_seen_indptr,
            source_seen_indices=self.source_seen_indices,
        )

    @classmethod
    def load(cls, path: Path, n_items: int, n_users: int) -> Neighbours:
        """Read and check a neighbours file; NeighboursError names what does not fit."""
        try:
            with np.load(path) as data:
                loaded = cls(
                    np.asarray(data["target"], np.int32),
                    np.asarray(data["target_scores"], np.float32),
                    np.asarray(data["source"], np.int32),
                    np.asarray(data["source_scores"], np.float32),
                    np.asarray(data["source_seen_indptr"], np.int64),
                    np.asarray(data["source_seen_indices"], np.int64),
                )
        except (OSError, ValueError, KeyError) as exc:
            raise NeighboursError(f"{path}: cannot be read: {exc}") from exc
        loaded.check(n_items, n_users, str(path))
        return loaded

    def check(self, n_items: int, n_users: int, where: str) -> None:
        for name, rows, scores, n_rows in (
            ("target", self.target, self.target_scores, n_items),
            ("source", self.source, self.source_scores, None),
        ):
            if rows.ndim != 2 or rows.shape != scores.shape:
                raise NeighboursError(f"{where}: {name} lists and scores must be equal 2-D arrays")
            if n_rows is not None and rows.shape[0] != n_rows:
                raise NeighboursError(f"{where}: {name} has {rows.shape[0]} rows, not {n_rows}")
            if rows.size and (rows.min() < -1 or rows.max() >= n_items):
                raise NeighboursError(f"{where}: {name} neighbours must be item rows or -1")
            if not np.isfinite(scores).all():
                raise NeighboursError(f"{where}: {name}_scores holds NaN or infinite values")
        indptr, indices = self.source_seen_indptr, self.source_seen_indices
        if (
            len(indptr) != n_users + 1
            or indptr[0] != 0
            or indptr[-1] != len(indices)
            or (np.diff(indptr) < 0).any()
            or (len(indices) and (indices.min() < 0 or indices.max() >= self.source.shape[0]))
        ):
            raise NeighboursError(
                f"{where}: source_seen must have n_users + 1 rising offsets and source item rows"
            )

    def source_rows(self, user_row: int) -> np.ndarray:
        return self.source_seen_indices[
            self.source_seen_indptr[user_row] : self.source_seen_indptr[user_row + 1]
        ]

    def vote(self, target_rows: np.ndarray, source_rows: np.ndarray) -> Votes:
        """Per target item that any of the given items lists, the sum of its similarities to
        them (the others have 0): work in the number of neighbours, not of items."""
        rows = [self.target[target_rows].ravel(), self.source[source_rows].ravel()]
        weights = [self.target_scores[target_rows].ravel(), self.source_scores[source_rows].ravel()]
        index, weight = np.concatenate(rows), np.concatenate(weights)
        keep = index >= 0
        voted, inverse = np.unique(index[keep], return_inverse=True)
        sums = np.bincount(inverse.ravel(), weights=weight[keep], minlength=len(voted))
        return Votes(voted.astype(np.int64), sums.astype(np.float32))


@dataclass(frozen=True)
class Votes:
    """Item rows (ascending) and their summed similarities; every other item's is 0."""

    rows: np.ndarray
    scores: np.ndarray

    def of(self, rows: np.ndarray) -> np.ndarray:
        """The votes of `rows` (0 for rows without any)."""
        out = np.zeros(len(rows), np.float32)
        if not len(self.rows) or not len(rows):
            return out
        at = np.minimum(np.searchsorted(self.rows, rows), len(self.rows) - 1)
        hit = self.rows[at] == rows
        out[hit] = self.scores[at[hit]]
        return out


def top_positive(
    votes: Votes, k: int, excluded: set[int] | frozenset[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The k rows with the largest positive votes, best first (ties by row), not excluded."""
    positive = votes.scores > 0
    rows, scores = votes.rows[positive], votes.scores[positive]
    if excluded and rows.size:
        keep = ~np.isin(rows, np.fromiter(excluded, np.int64, len(excluded)))
        rows, scores = rows[keep], scores[keep]
    if rows.size > k:
        part = np.argpartition(-scores, k - 1)[:k]
        rows, scores = rows[part], scores[part]
    order = np.lexsort((rows, -scores))
    return rows[order].astype(np.int64), scores[order]


def exact_search(item_embeddings: np.ndarray) -> Search:
    """Exact inner-product search over a matrix (what the flat FAISS index computes)."""

    def search(
        vector: np.ndarray, k: int, excluded: set[int] | frozenset[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        scores = item_embeddings @ vector.astype(np.float32)
        if excluded:
            scores = scores.copy()
            scores[np.fromiter(excluded, np.int64, len(excluded))] = -np.inf
        k = min(k, int(np.isfinite(scores).sum()))
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        part = np.argpartition(-scores, k - 1)[:k]
        order = np.lexsort((part, -scores[part]))
        rows = part[order].astype(np.int64)
        return rows, scores[rows]

    return search


@dataclass(frozen=True)
class UserState:
    """What a version knows of the requesting user."""

    row: int | None  # the user's row, None for users the version does not know
    mapped: bool
    vector: np.ndarray | None  # user representation (or the mean of the recent items)
    personal: Source | None  # ANN, TRANSFER or HISTORY: the source of `vector`
    target_rows: np.ndarray  # target-domain training items
    source_rows: np.ndarray  # source-domain training items
    recent_rows: np.ndarray  # the request's recent items


@dataclass(frozen=True)
class Generated:
    table: CandidateTable
    sources: tuple[Source, ...]  # the sources that proposed at least one candidate, in order

    @property
    def candidates(self) -> list[Candidate]:
        """The row view of `table`."""
        return self.table.rows()


class CandidateSources:
    """The sources over one version's arrays; `search` finds the nearest items of a vector."""

    def __init__(
        self,
        *,
        item_ids: Sequence[str],
        titles: Sequence[str],
        item_embeddings: np.ndarray,
        popularity: np.ndarray,
        neighbours: Neighbours,
        search: Search,
    ) -> None:
        self.item_ids = list(item_ids)
        self.titles = list(titles)
        # Object arrays of the same strings: a request's ids and titles are one gather each.
        self._id_array = np.asarray(self.item_ids, object)
        self._title_array = np.asarray(self.titles, object)
        self.item_embeddings = item_embeddings
        self.popularity = np.asarray(popularity, np.float32)
        self.neighbours = neighbours
        self.search = search
        # Most popular first; ties by item row, so the order is deterministic.
        self.popular_order = np.lexsort((np.arange(len(self.item_ids)), -self.popularity))

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def popular(self, k: int, excluded: set[int] | frozenset[int] = frozenset()) -> list[int]:
        """The k most popular item rows not in `excluded`."""
        if k <= 0:
            return []
        head = self.popular_order[: k + len(excluded)]
        return [int(j) for j in head if int(j) not in excluded][:k]

    def generate(
        self,
        user: UserState,
        k: int,
        wanted: set[Source],
        excluded: set[int] | frozenset[int],
    ) -> Generated:
        """Up to k candidates: the personal and item-to-item lists interleaved by rank (each
        item once, from the first list that reaches it), then popular items to fill; each
        carries every source's score and its rank in each list (as columns: no object per
        candidate)."""
        lists: list[tuple[Source, np.ndarray]] = []  # each list's item rows, best first
        vote: Votes | None = None
        recent: Votes | None = None
        if user.personal is not None and user.personal in wanted and user.vector is not None:
            lists.append((user.personal, self.search(user.vector, k, excluded)[0]))
        if user.target_rows.size or user.source_rows.size:
            vote = self.neighbours.vote(user.target_rows, user.source_rows)
            if Source.ITEM2ITEM in wanted:
                lists.append((Source.ITEM2ITEM, top_positive(vote, k, excluded)[0]))
        if user.recent_rows.size:
            recent = self.neighbours.vote(user.recent_rows, np.zeros(0, np.int64))
            if Source.RECENT in wanted:
                lists.append((Source.RECENT, top_positive(recent, k, excluded)[0]))
        # The lists interleaved by rank (position 0 of every list, then position 1, ...), each
        # row once where it first comes, the first k: one stable sort instead of a loop per item.
        list_rows = [rows for _, rows in lists]
        list_sources = [source for source, _ in lists]
        if lists:
            rows_all = np.concatenate(list_rows)
            positions = np.concatenate([np.arange(len(r)) for r in list_rows])
            which = np.concatenate([np.full(len(r), i) for i, r in enumerate(list_rows)])
            by_rank = np.lexsort((which, positions))
            rows_all, which = rows_all[by_rank], which[by_rank]
            _, first = np.unique(rows_all, return_index=True)
            first = np.sort(first)[:k]
            at = rows_all[first]
            order_sources = np.asarray(list_sources, np.int64)[which[first]]
        else:
            at, order_sources = np.zeros(0, np.int64), np.zeros(0, np.int64)
        rank_rows = dict(zip(list_sources, list_rows, strict=True))
        if Source.POPULAR in wanted and len(at) < k:
            popular = np.asarray(
                self.popular(k - len(at), set(excluded) | set(at.tolist())), np.int64
            )
            rank_rows[Source.POPULAR] = popular
            at = np.concatenate([at, popular])
            order_sources = np.concatenate(
                [order_sources, np.full(len(popular), Source.POPULAR, np.int64)]
            )
        proposing = set(np.unique(order_sources).tolist())
        used = tuple(source for source in (*list_sources, Source.POPULAR) if source in proposing)
        dot = (
            self.item_embeddings[at] @ user.vector
            if user.vector is not None
            else np.zeros(len(at), np.float32)
        )
        vote_of = vote.of(at) if vote is not None else np.zeros(len(at), np.float32)
        recent_of = recent.of(at) if recent is not None else np.zeros(len(at), np.float32)
        personal = user.personal or Source.ANN
        columns = (
            (personal, dot),
            (Source.ITEM2ITEM, vote_of),
            (Source.RECENT, recent_of),
            (Source.POPULAR, self.popularity[at]),
        )
        column_of = np.zeros(max(Source) + 1, np.int64)
        column_of[[src for src, _ in columns]] = np.arange(len(columns))
        source_scores = np.stack([values for _, values in columns], axis=1).astype(np.float32)
        ranks = np.stack([_ranks_in(rank_rows.get(src), at) for src, _ in columns], axis=1)
        table = CandidateTable(
            self._id_array[at].tolist(),
            order_sources,
            source_scores[np.arange(len(at)), column_of[order_sources]],
            self._title_array[at].tolist(),
            tuple(src for src, _ in columns),
            source_scores,
            ranks.astype(np.int64),
        )
        return Generated(table, used)


def _ranks_in(found: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    """Each of `rows`' 1-based position in `found` (a list of distinct rows), 0 where absent."""
    if found is None or not len(found) or not len(rows):
        return np.zeros(len(rows), np.int64)
    sorter = np.argsort(found, kind="stable")
    at = np.minimum(np.searchsorted(found, rows, sorter=sorter), len(found) - 1)
    hit = found[sorter[at]] == rows
    return np.where(hit, sorter[at] + 1, 0)
