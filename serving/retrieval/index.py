"""One version of a domain's retrieval model in memory: id maps, item embeddings in a FAISS index,
user representations, seen items and popularity, and the candidate sources built on them."""

from __future__ import annotations

import functools
import gc
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort

from recsys import ann
from recsys.ann import AnnIndex, AnnParams
from recsys.candidates import Candidate, CandidateTable, Source
from recsys.features import UserContext
from recsys.repository import (
    ITEMS_FILE,
    MODEL_FILE,
    USERS_FILE,
    RepositoryError,
    check_signature,
    read_items,
    read_users,
    user_tower_signature,
    verify_version,
)
from recsys.sources import (
    NEIGHBOURS_FILE,
    CandidateSources,
    Neighbours,
    NeighboursError,
    UserState,
)

logger = logging.getLogger(__name__)

RETRIEVAL_SUFFIX = "-retrieval"
_USER_TOWER_CHUNK = 65_536


def domain_of(model_name: str) -> str:
    """'books-retrieval' -> 'books'."""
    if not model_name.endswith(RETRIEVAL_SUFFIX) or len(model_name) == len(RETRIEVAL_SUFFIX):
        raise ValueError(f"{model_name!r} is not a retrieval model name (<domain>-retrieval)")
    return model_name[: -len(RETRIEVAL_SUFFIX)]


@dataclass(frozen=True)
class IndexOptions:
    """How a version without a stored index (published before items.faiss) gets one at load,
    and the search parameters of every index (recsys/ann.py; docs/scale.md)."""

    exact_search_max_items: int = AnnParams.exact_max_items
    hnsw_max_items: int = AnnParams.hnsw_max_items
    hnsw_m: int = AnnParams.hnsw_m
    hnsw_ef_construction: int = AnnParams.hnsw_ef_construction
    hnsw_ef_search: int = AnnParams.hnsw_ef_search
    ivf_nprobe: int = 0  # 0: the version's own (default: an eighth of the lists)
    rerank_factor: int = AnnParams.rerank_factor
    onnx_threads: int = 1

    def ann_params(self) -> AnnParams:
        return AnnParams(
            exact_max_items=self.exact_search_max_items,
            hnsw_max_items=max(self.hnsw_max_items, self.exact_search_max_items),
            hnsw_m=self.hnsw_m,
            hnsw_ef_construction=self.hnsw_ef_construction,
            hnsw_ef_search=self.hnsw_ef_search,
            ivf_nprobe=self.ivf_nprobe,
            rerank_factor=self.rerank_factor,
        )


@dataclass(frozen=True)
class RetrieveResult:
    table: CandidateTable
    sources: tuple[Source, ...]  # sources that contributed, in order
    user: UserContext = UserContext()
    # The popular list asked for with `popular_k` (None when not asked).
    popular: CandidateTable | None = None

    @property
    def candidates(self) -> list[Candidate]:
        """The row view of `table`."""
        return self.table.rows()


def _user_tower(
    path: Path, n_users: int, metadata: dict[str, Any], dim: int, threads: int
) -> np.ndarray:
    """Every user's representation: the user tower run once over all user indices."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    check_signature(
        metadata,
        session.get_inputs(),
        session.get_outputs(),
        path.parent,
        expected=user_tower_signature(dim),
        graph_file=path.name,
    )
    input_name = session.get_inputs()[0].name
    chunks = []
    for start in range(0, n_users, _USER_TOWER_CHUNK):
        index = np.arange(start, min(n_users, start + _USER_TOWER_CHUNK), dtype=np.int64)
        chunks.append(np.asarray(session.run(None, {input_name: index})[0], dtype=np.float32))
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(chunks))


def build_faiss_index(embeddings: np.ndarray, options: IndexOptions) -> tuple[faiss.Index, str]:
    """The index a version without items.faiss gets at load: exact inner-product search up to
    `exact_search_max_items` items, HNSW up to `hnsw_max_items`, IVF-PQ above (recsys/ann.py)."""
    built = ann.build(embeddings, options.ann_params())
    return built.index, built.kind


def search_excluding(
    index: AnnIndex, vector: np.ndarray, k: int, excluded: set[int] | frozenset[int] = frozenset()
) -> tuple[np.ndarray, np.ndarray]:
    """`RetrievalIndex.search` over `index` (a function: the candidate sources hold it without
    holding the version, so a dropped version is freed at once, without the cyclic collector)."""
    n = index.ntotal
    k = min(k, n - len(excluded)) if len(excluded) < n else 0
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    query = np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32)
    fetch = min(n, k + len(excluded))
    dropped = np.fromiter(excluded, dtype=np.int64, count=len(excluded))
    while True:
        found, scores = index.search(query, fetch)
        keep = found >= 0
        if len(dropped):
            keep &= ~np.isin(found, dropped)
        found_rows, found_scores = found[keep][:k], scores[keep][:k]
        if len(found_rows) >= k or fetch >= n:
            return found_rows.astype(np.int64), found_scores
        fetch = min(n, fetch * 2)


class RetrievalIndex:
    """A loaded, verified retrieval model version. Thread-safe for concurrent reads."""

    def __init__(
        self,
        *,
        model_name: str,
        version: int,
        user_ids: list[str],
        user_kinds: list[str],
        item_ids: list[str],
        titles: list[str],
        popularity: np.ndarray,
        item_embeddings: np.ndarray,
        user_embeddings: np.ndarray,
        seen_indptr: np.ndarray,
        seen_indices: np.ndarray,
        options: IndexOptions,
        neighbours: Neighbours | None = None,
        stored_index: AnnIndex | None = None,
    ) -> None:
        self.model_name = model_name
        self.domain = domain_of(model_name)
        self.version = version
        self.user_ids = user_ids
        self.user_rows = {u: i for i, u in enumerate(user_ids)}
        self.mapped = np.asarray([k == "mapped" for k in user_kinds], dtype=bool)
        self.item_ids = item_ids
        self.item_rows = {item: j for j, item in enumerate(item_ids)}
        self.titles = titles
        self.popularity = popularity.astype(np.float32)
        self.item_embeddings = item_embeddings
        self.user_embeddings = user_embeddings
        self.seen_indptr = seen_indptr
        self.seen_indices = seen_indices
        self.options = options
        # The version's stored index (items.faiss), else one built here (older versions).
        self.ann = stored_index or ann.build(item_embeddings, options.ann_params())
        self.index, self.index_kind = self.ann.index, self.ann.kind
        self.neighbours = neighbours or Neighbours.empty(len(item_ids), len(user_ids))
        self.sources = CandidateSources(
            item_ids=item_ids,
            titles=titles,
            item_embeddings=item_embeddings,
            popularity=self.popularity,
            neighbours=self.neighbours,
            search=functools.partial(search_excluding, self.ann),
        )

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @classmethod
    def load(cls, directory: Path, model_name: str, options: IndexOptions) -> RetrievalIndex:
        """Verify and load a version directory (docs/model-repository.md); raises RepositoryError."""
        start = time.perf_counter()
        metadata = verify_version(directory)
        kind = metadata.get("kind")
        if kind is not None and kind != "retrieval":
            raise RepositoryError(f"{directory}: metadata kind is {kind!r}, not 'retrieval'")
        version = int(directory.name)
        users = read_users(directory / USERS_FILE)
        items = read_items(directory / ITEMS_FILE)
        user_ids, user_kinds = users.ids, users.kinds
        item_ids, titles = items.ids, items.titles
        popularity = np.asarray(items.popularity, dtype=np.float32)
        try:
            # Memory-mapped: pods on one node share the pages (versions are never rewritten).
            item_embeddings = np.ascontiguousarray(
                np.load(directory / ann.EMBEDDINGS_FILE, mmap_mode="r"), dtype=np.float32
            )
            seen = np.load(directory / "seen.npz")
            seen_indptr = np.asarray(seen["indptr"], dtype=np.int64)
            seen_indices = np.asarray(seen["indices"], dtype=np.int64)
        except (OSError, ValueError, KeyError) as exc:
            raise RepositoryError(
                f"{directory}: cannot read embeddings or seen items: {exc}"
            ) from exc
        if item_embeddings.ndim != 2 or item_embeddings.shape[0] != len(item_ids):
            raise RepositoryError(
                f"{directory}/item_embeddings.npy has shape {item_embeddings.shape}, "
                f"expected [{len(item_ids)}, D]"
            )
        if not np.isfinite(item_embeddings).all():
            bad = int((~np.isfinite(item_embeddings).all(axis=1)).sum())
            raise RepositoryError(
                f"{directory}/item_embeddings.npy: {bad} of {len(item_ids)} item rows hold "
                "NaN or infinite values"
            )
        if len(seen_indptr) != len(user_ids) + 1:
            raise RepositoryError(f"{directory}/seen.npz: indptr must have n_users + 1 entries")
        if (
            seen_indptr[0] != 0
            or seen_indptr[-1] != len(seen_indices)
            or (np.diff(seen_indptr) < 0).any()
            or (
                len(seen_indices)
                and (seen_indices.min() < 0 or seen_indices.max() >= len(item_ids))
            )
        ):
            raise RepositoryError(
                f"{directory}/seen.npz: indptr must rise from 0 to len(indices), and indices "
                f"must be item rows in [0, {len(item_ids)})"
            )
        neighbours = None
        if NEIGHBOURS_FILE in metadata.get("files", {}):
            try:
                neighbours = Neighbours.load(
                    directory / NEIGHBOURS_FILE, len(item_ids), len(user_ids)
                )
            except NeighboursError as exc:
                raise RepositoryError(str(exc)) from exc
        try:
            user_embeddings = _user_tower(
                directory / MODEL_FILE,
                len(user_ids),
                metadata,
                item_embeddings.shape[1],
                options.onnx_threads,
            )
        except RepositoryError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RepositoryError(f"{directory}/{MODEL_FILE} cannot be run: {exc}") from exc
        if user_embeddings.shape != (len(user_ids), item_embeddings.shape[1]):
            raise RepositoryError(
                f"{directory}/{MODEL_FILE} gives user embeddings of shape "
                f"{user_embeddings.shape}, expected ({len(user_ids)}, {item_embeddings.shape[1]})"
            )
        if not np.isfinite(user_embeddings).all():
            bad = int((~np.isfinite(user_embeddings).all(axis=1)).sum())
            raise RepositoryError(
                f"{directory}/{MODEL_FILE} gives NaN or infinite embeddings for {bad} of "
                f"{len(user_ids)} users"
            )
        stored_index = None
        if ann.METADATA_KEY in metadata:
            started = time.perf_counter()
            stored_index = ann.load(directory, metadata, item_embeddings, options.ann_params())
            logger.info(
                "%s version %d: read the stored %s index (%s) in %.2f s",
                model_name,
                version,
                stored_index.kind,
                "memory-mapped" if stored_index.mmapped else "in memory",
                time.perf_counter() - started,
            )
        loaded = cls(
            model_name=model_name,
            version=version,
            user_ids=user_ids,
            user_kinds=user_kinds,
            item_ids=item_ids,
            titles=titles,
            popularity=popularity,
            item_embeddings=item_embeddings,
            user_embeddings=user_embeddings,
            seen_indptr=seen_indptr,
            seen_indices=seen_indices,
            options=options,
            neighbours=neighbours,
            stored_index=stored_index,
        )
        loaded.warm_up()
        # The version's millions of long-lived objects (ids, the row dictionaries) out of the
        # cyclic collector's sight: otherwise every full collection walks them all, pausing
        # requests for hundreds of milliseconds at 10 M items (docs/scale.md). Unfrozen and
        # collected first, so garbage frozen at an earlier load is collected once here.
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        logger.info(
            "Loaded %s version %d: %d users, %d items, dim %d, %s index (%s), in %.2f s",
            model_name,
            version,
            len(user_ids),
            len(item_ids),
            item_embeddings.shape[1],
            loaded.index_kind,
            "stored" if stored_index is not None else "built at load",
            time.perf_counter() - start,
        )
        return loaded

    def warm_up(self) -> None:
        """One search for the first user, checked: item rows in range and finite scores."""
        rows, scores = self.search(self.user_embeddings[0], min(10, self.n_items))
        if (
            not len(rows)
            or rows.min() < 0
            or rows.max() >= self.n_items
            or not np.isfinite(scores).all()
        ):
            raise RepositoryError(
                f"{self.model_name} v{self.version}: warm-up search returned rows "
                f"{rows[:3].tolist()}, scores {scores[:3].tolist()}"
            )

    # -- searching ------------------------------------------------------------------------------

    def search(
        self, vector: np.ndarray, k: int, excluded: set[int] | frozenset[int] = frozenset()
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k item rows (int64) with the largest inner product with `vector` and those
        products, best first, leaving out `excluded` item rows (over-fetching as many more as
        are excluded, then more if the approximate index returns too few)."""
        return search_excluding(self.ann, vector, k, excluded)

    def popular(self, k: int, excluded: set[int] | frozenset[int] = frozenset()) -> list[int]:
        """The k most popular item rows not in `excluded`."""
        return self.sources.popular(k, excluded)

    def seen_rows(self, user_row: int) -> np.ndarray:
        return self.seen_indices[self.seen_indptr[user_row] : self.seen_indptr[user_row + 1]]

    def _rows(self, item_ids: Iterable[str]) -> list[int]:
        return [self.item_rows[i] for i in item_ids if i in self.item_rows]

    def retrieve(
        self,
        user_id: str,
        k: int,
        *,
        exclude_item_ids: Sequence[str] = (),
        exclude_seen: bool = False,
        history_item_ids: Sequence[str] = (),
        sources: Sequence[Source] = (),
        popular_k: int = 0,
    ) -> RetrieveResult:
        """Up to k candidates, best first, no duplicates, each with every source's score; with
        `popular_k`, also the popular list a call with sources [POPULAR] and k = popular_k would
        answer (`RetrieveResult.popular`), from the same user state.

        The personal source depends on the user: ANN for users with target-domain history,
        TRANSFER for users known only from the source domain (their row holds the mapped
        representation), HISTORY (the mean of the embeddings of `history_item_ids`) for users the
        model does not know. ITEM2ITEM votes with the user's source and target training items
        through the published neighbour lists, RECENT with `history_item_ids`; the personal and
        item-to-item lists are interleaved by rank, POPULAR fills the rest. `sources` limits
        which are used (empty: all). Unknown item ids in the exclusions and history are ignored.
        """
        wanted = set(sources) or {
            Source.ANN,
            Source.TRANSFER,
            Source.HISTORY,
            Source.ITEM2ITEM,
            Source.RECENT,
            Source.POPULAR,
        }
        row = self.user_rows.get(user_id) if user_id else None
        history_rows = self._rows(history_item_ids)
        excluded: set[int] = set(self._rows(exclude_item_ids))
        seen = self.seen_rows(row) if row is not None else np.zeros(0, np.int64)
        if exclude_seen:
            excluded.update(history_rows)
            excluded.update(seen.tolist())

        vector: np.ndarray | None = None
        personal: Source | None = None
        if row is not None:
            personal = Source.TRANSFER if self.mapped[row] else Source.ANN
            vector = self.user_embeddings[row]
        elif history_rows:
            personal = Source.HISTORY
            vector = self.item_embeddings[history_rows].mean(axis=0)
        source_rows = self.neighbours.source_rows(row) if row is not None else np.zeros(0, np.int64)
        state = UserState(
            row=row,
            mapped=bool(row is not None and self.mapped[row]),
            vector=vector,
            personal=personal,
            target_rows=seen,
            source_rows=source_rows,
            recent_rows=np.asarray(history_rows, np.int64),
        )
        generated = self.sources.generate(state, k, wanted, excluded)
        popular = (
            self.sources.generate(state, popular_k, {Source.POPULAR}, excluded).table
            if popular_k > 0
            else None
        )
        user = UserContext(
            known=row is not None,
            mapped=state.mapped,
            target_history=len(seen),
            source_history=len(source_rows),
        )
        return RetrieveResult(generated.table, generated.sources, user, popular)
