"""Non-neural baselines evaluated by the same code as the models, and the validated blend.

Every baseline is a scorer (``training.evaluate.Scorer``) built from the target training pairs
and, for the cross-domain ones, the source-domain pairs (source data is never evaluated, so all
of it may vote). Each has a small declared hyper-parameter grid (``GRIDS``); the grid point is
chosen by NDCG@10 on the validation split (full ranking, training items excluded, the same
validation users as the two-tower models), never on test.

* ``popularity``: training count of each target item.
* ``itemknn``: cosine item-item similarity on the user x target-item matrix, the top ``k``
  neighbours of each item kept; a user's target items vote.
* ``cd_itemknn``: the same on the user x [source items | target items] matrix; the user's source
  items (weight ``source_weight``) and target items both vote for target items, so users without
  target history are served by their source items.
* ``ease``: EASE (Steck, 2019), ``B = I - P / diag(P)`` with ``P = (X^T X + lam I)^-1`` on the
  target items; ``cd_ease``: the same on [source | target] items, scored on the target columns.
  Above ``ease_max_items`` items, only the most popular ``ease_max_items`` items of X enter the
  solve; the others score below every kept item, ordered by popularity (a declared handicap on
  catalogues too large for one dense solve on this machine).
* ``blend``: a per-user standardised mix ``(1 - w) z(model) + w z(baseline)`` of a trained model
  and a baseline, ``w`` chosen on validation; ``w = 0`` is the model and ``w = 1`` the baseline,
  so on validation the blend is never below either. The pipeline fits one for users with target
  history (partner: the best baseline on validation) and one for users without (partner: the
  best cross-domain baseline on the cold-start validation users, which also choose its ``w``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from training.data.splits import Split
from training.evaluate import Scorer, rank_full

logger = logging.getLogger(__name__)

GRIDS: dict[str, list[dict[str, float]]] = {
    "popularity": [{}],
    "itemknn": [{"k": k} for k in (20, 100, 0)],  # k = 0: every neighbour
    "cd_itemknn": [{"k": k, "source_weight": w} for k in (20, 100, 0) for w in (0.3, 1.0)],
    # EASE's L2: validation picked the top of (10 .. 1000) on MovieLens-1M on every seed, so the
    # grid reaches past it
    "ease": [{"lam": lam} for lam in (10.0, 50.0, 250.0, 1000.0, 2500.0, 6000.0)],
    "cd_ease": [{"lam": lam} for lam in (10.0, 50.0, 250.0, 1000.0, 2500.0, 6000.0)],
}
CROSS_DOMAIN = ("cd_itemknn", "cd_ease")
BLEND_WEIGHTS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)
EASE_MAX_ITEMS = 4000


@dataclass
class Selected:
    """A baseline (or blend) with the grid point chosen on validation."""

    name: str
    params: dict[str, float]
    valid_ndcg: float
    scorer: Scorer
    grid: list[dict[str, Any]] = field(default_factory=list)  # every point with its score
    linear: Linear | None = None  # the chosen point as a linear map (baselines only)

    def summary(self) -> dict[str, Any]:
        return {"params": self.params, "valid_ndcg@10": self.valid_ndcg, "grid": self.grid}


def interactions(pairs: np.ndarray, n_rows: int, n_cols: int) -> sp.csr_matrix:
    """Binary sparse matrix of (row, column) pairs (repeated pairs count once)."""
    m = sp.csr_matrix(
        (np.ones(len(pairs), dtype=np.float32), (pairs[:, 0], pairs[:, 1])), shape=(n_rows, n_cols)
    )
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def matrices(split: Split) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(target train, source) user x item matrices; the source uses all its pairs."""
    xt = interactions(split.train, split.n_users, split.n_target_items)
    src = np.concatenate([split.source_train, split.source_valid])
    xs = interactions(src, split.n_users, max(split.n_source_items, 1))
    return xt, xs


def _dense(m: sp.spmatrix) -> torch.Tensor:
    return torch.from_numpy(np.asarray(m.toarray(), dtype=np.float32))


@dataclass
class Linear:
    """A baseline as a linear map: score(u, cols[j]) = votes[u] . weights[:, j]; items not in
    ``cols`` score ``fill`` (None: ``cols`` is every item), or, with ``fill_below_row``, the
    row's lowest score on ``cols`` minus 1 plus ``fill``. Popularity, ItemKNN and EASE are all
    of this form, which is what lets them be factorised into user and item tables
    (training/served.py) and published like a two-tower model."""

    votes: sp.csr_matrix  # [n_users, n_cols]
    weights: np.ndarray | sp.csr_matrix  # [n_cols, len(cols)]
    n_items: int
    cols: np.ndarray | None = None
    fill: np.ndarray | None = None  # [n_items]
    fill_below_row: bool = False
    # bool [n_cols]: the columns of ``votes`` that count the user's target-domain interactions
    # (None: the votes do not depend on them, as popularity's)
    target_votes: np.ndarray | None = None

    def scorer(self) -> Scorer:
        dense = isinstance(self.weights, np.ndarray)
        w: Any = torch.from_numpy(np.asarray(self.weights, np.float32)) if dense else self.weights
        cols = None if self.cols is None else torch.from_numpy(self.cols)
        fill = None if self.fill is None else torch.from_numpy(self.fill.astype(np.float32))
        left: torch.Tensor | None = None  # items scored below the row's lowest solved one
        left_fill = torch.zeros(0)
        if self.fill_below_row and fill is not None and cols is not None:
            left = torch.ones(self.n_items, dtype=torch.bool)
            left[cols] = False
            left_fill = fill[left] - 1.0

        def score(batch: np.ndarray) -> torch.Tensor:
            part = _dense(self.votes[batch]) @ w if dense else _dense(self.votes[batch] @ w)
            if cols is None:
                return part
            if fill is None or left is not None:
                out = torch.zeros(batch.size, self.n_items)
            else:
                out = fill.expand(batch.size, -1).clone()
            out[:, cols] = part
            if left is not None:
                low = (
                    part.min(1, keepdim=True).values
                    if part.shape[1]
                    else torch.zeros(batch.size, 1)
                )
                out[:, left] = low + left_fill
            return out

        return score


def popularity_linear(xt: sp.csr_matrix) -> Linear:
    """A constant vote of every user against the item counts."""
    counts = np.asarray(xt.sum(0), dtype=np.float32).reshape(1, -1)
    ones = sp.csr_matrix(np.ones((xt.shape[0], 1), np.float32))
    return Linear(ones, counts, xt.shape[1])


def popularity(xt: sp.csr_matrix) -> Scorer:
    return popularity_linear(xt).scorer()


def cosine_neighbours(x: sp.csr_matrix, n_target: int, k: int) -> sp.csc_matrix:
    """Cosine similarity of every column of ``x`` to its last ``n_target`` columns (the target
    items), without self-similarity, keeping the ``k`` largest of each target column (0: all)."""
    n_all = x.shape[1]
    offset = n_all - n_target
    norms = np.sqrt(np.asarray(x.sum(0), dtype=np.float64).ravel())
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    xn = (x @ sp.diags(inv.astype(np.float32))).tocsc()
    coo = (xn.T @ xn[:, offset:]).tocoo()
    off_diag = coo.row != coo.col + offset
    sim = sp.csc_matrix(
        (coo.data[off_diag], (coo.row[off_diag], coo.col[off_diag])), shape=(n_all, n_target)
    )
    if k > 0:
        for j in range(n_target):
            a, b = sim.indptr[j], sim.indptr[j + 1]
            if b - a > k:
                col = sim.data[a:b]
                drop = np.argpartition(-col, k)[k:]
                col[drop] = 0.0
        sim.eliminate_zeros()
    return sim


def itemknn_linear(votes: sp.csr_matrix, sim: sp.csc_matrix) -> Linear:
    """Score = the user's vote row times the similarity matrix (the target items are the last
    ``sim.shape[1]`` columns of ``votes``)."""
    n_cols = votes.shape[1]
    target = np.arange(n_cols) >= n_cols - sim.shape[1]
    return Linear(votes.tocsr(), sim.tocsr(), sim.shape[1], target_votes=target)


def itemknn(votes: sp.csr_matrix, sim: sp.csc_matrix) -> Scorer:
    return itemknn_linear(votes, sim).scorer()


def ease_solve(x: sp.csr_matrix, lam: float) -> np.ndarray:
    """EASE's closed form on the columns of ``x``: B with a zero diagonal."""
    g = np.asarray((x.T @ x).toarray(), dtype=np.float64)
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return b


def ease_keep(x: sp.csr_matrix, max_items: int) -> np.ndarray:
    """Columns of ``x`` that enter the EASE solve: all, or the ``max_items`` most popular."""
    counts = np.asarray(x.sum(0)).ravel()
    cols = np.flatnonzero(counts > 0)
    if cols.size > max_items:
        cols = np.sort(cols[np.argsort(-counts[cols], kind="stable")[:max_items]])
    return cols


def ease_linear(votes: sp.csr_matrix, n_target: int, b: np.ndarray, keep: np.ndarray) -> Linear:
    """EASE scores on the target columns (the last ``n_target`` of ``votes``)."""
    offset = votes.shape[1] - n_target
    tgt_in_keep = np.flatnonzero(keep >= offset)
    counts = np.asarray(votes[:, offset:].sum(0), dtype=np.float64).ravel()
    # items left out of the solve rank after every kept item of the user's row, by popularity,
    # just below the row's lowest kept score (a fixed far-off value would dominate the row's
    # spread and flatten the standardised scores the blend mixes)
    return Linear(
        votes[:, keep].tocsr(),
        np.ascontiguousarray(b[:, tgt_in_keep], dtype=np.float32),
        n_target,
        cols=(keep[tgt_in_keep] - offset).astype(np.int64),
        fill=(counts / (counts.max() + 1.0)).astype(np.float32),
        fill_below_row=True,
        target_votes=keep >= offset,
    )


def ease(votes: sp.csr_matrix, n_target: int, b: np.ndarray, keep: np.ndarray) -> Scorer:
    return ease_linear(votes, n_target, b, keep).scorer()


def standardise(scores: torch.Tensor) -> torch.Tensor:
    """Per-row z-score (rows with no spread become zero)."""
    mean = scores.mean(1, keepdim=True)
    std = scores.std(1, keepdim=True)
    return (scores - mean) / torch.where(std > 0, std, torch.ones_like(std))


def by_history(has_target: np.ndarray, warm: Scorer, cold: Scorer) -> Scorer:
    """``warm`` for users with target training history, ``cold`` for the others."""

    def score(batch: np.ndarray) -> torch.Tensor:
        h = has_target[batch]
        if h.all():
            return warm(batch)
        if not h.any():
            return cold(batch)
        out = warm(batch)
        out[torch.from_numpy(~h)] = cold(batch[~h])
        return out

    return score


def blend(model: Scorer, base: Scorer, w: float) -> Scorer:
    def score(batch: np.ndarray) -> torch.Tensor:
        if w <= 0.0:
            return standardise(model(batch))
        if w >= 1.0:
            return standardise(base(batch))
        return (1.0 - w) * standardise(model(batch)) + w * standardise(base(batch))

    return score


class Validator:
    """NDCG@10 on validation pairs: full ranking, training items excluded, fixed users.

    ``Validator(split, users)`` validates on the warm validation split; ``Validator.cold(split)``
    on the cold-start validation users (their target pairs, none of them in training).
    """

    def __init__(self, split: Split, users: np.ndarray, pairs: np.ndarray | None = None) -> None:
        self.valid = split.valid if pairs is None else pairs
        self.train, self.users = split.train, users

    @classmethod
    def cold(cls, split: Split) -> Validator:
        return cls(split, np.unique(split.cold_valid[:, 0]), split.cold_valid)

    def __call__(self, scorer: Scorer) -> float:
        if self.users.size == 0:
            return float("nan")
        return float(
            rank_full(scorer, self.valid, [self.train], users=self.users, ks=(10,))["ndcg@10"]
        )


def _search(
    name: str, build: Callable[[dict[str, float]], Linear], validate: Validator
) -> Selected:
    best: Selected | None = None
    grid: list[dict[str, Any]] = []
    for params in GRIDS[name]:
        lin = build(params)
        scorer = lin.scorer()
        score = validate(scorer)
        grid.append({**params, "valid_ndcg@10": score})
        if best is None or score > best.valid_ndcg:
            best = Selected(name, dict(params), score, scorer, linear=lin)
    assert best is not None
    best.grid = grid
    logger.info("baseline %s: %s valid NDCG@10 %.4f", name, best.params, best.valid_ndcg)
    return best


def fit_baselines(
    split: Split,
    validate: Validator,
    names: tuple[str, ...] | list[str] = tuple(GRIDS),
    ease_max_items: int = EASE_MAX_ITEMS,
) -> dict[str, Selected]:
    """Every baseline in ``names``, each at its grid point chosen on validation."""
    xt, xs = matrices(split)
    nt = split.n_target_items
    has_source = split.n_source_items > 0 and xs.nnz > 0
    out: dict[str, Selected] = {}
    cache: dict[tuple[str, float], Any] = {}
    for name in names:
        if name in CROSS_DOMAIN and not has_source:
            continue
        if name == "popularity":
            out[name] = _search(name, lambda p: popularity_linear(xt), validate)
        elif name in ("itemknn", "cd_itemknn"):
            both = sp.hstack([xs, xt]).tocsr() if name == "cd_itemknn" else xt

            def build_knn(p: dict[str, float], name: str = name, both: Any = both) -> Linear:
                key = (name, p["k"])
                if key not in cache:
                    cache[key] = cosine_neighbours(both, nt, int(p["k"]))
                if name == "itemknn":
                    return itemknn_linear(xt, cache[key])
                votes = sp.hstack([xs * float(p["source_weight"]), xt]).tocsr()
                return itemknn_linear(votes, cache[key])

            out[name] = _search(name, build_knn, validate)
        elif name in ("ease", "cd_ease"):
            x = sp.hstack([xs, xt]).tocsr() if name == "cd_ease" else xt
            keep = ease_keep(x, ease_max_items)
            xk = x[:, keep]

            def build_ease(
                p: dict[str, float], x: Any = x, xk: Any = xk, keep: np.ndarray = keep
            ) -> Linear:
                return ease_linear(x, nt, ease_solve(xk, float(p["lam"])), keep)

            sel = _search(name, build_ease, validate)
            sel.params["items_in_solve"] = int(keep.size)
            out[name] = sel
        else:
            raise ValueError(f"unknown baseline {name!r}")
    return out


def fit_blend(model: Scorer, base: Selected, validate: Validator) -> Selected:
    """The blend of ``model`` with ``base``, its weight chosen on validation."""
    best: Selected | None = None
    grid: list[dict[str, Any]] = []
    for w in BLEND_WEIGHTS:
        scorer = blend(model, base.scorer, w)
        score = validate(scorer)
        grid.append({"weight": w, "valid_ndcg@10": score})
        if best is None or score > best.valid_ndcg:
            best = Selected("blend", {"weight": w}, score, scorer)
    assert best is not None
    best.grid = grid
    best.params["partner"] = base.name  # type: ignore[assignment]
    return best
