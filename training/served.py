"""Every row as the user and item tables it is published as (score = user row . item row).

The services serve dot products of a user table and an item table (training/export_onnx.py), so
a baseline or the blend can be published only in that form:

* a linear baseline (``training.baselines.Linear``: popularity, ItemKNN, cross-domain ItemKNN,
  EASE, cross-domain EASE) scores ``votes[u] @ W``; ``W`` is factorised by a truncated SVD
  ``W ~ U_k S_k V_k^T`` (exact below the rank, randomized above it), so the user row is
  ``votes[u] @ U_k S_k`` (every known user, cold users from their source votes in the
  cross-domain variants) and the item row ``V_k``. Items outside the solve (EASE's cap) score
  just below the user's lowest solved item, by popularity: two extra coordinates, the user's
  (lowest served score - 1) against an indicator of those items, and a constant 1 against their
  popularity tie-break. Popularity
  (one row of weights) is exact: a constant user against the item counts.
* the blend ``(1 - w) z(model) + w z(base)`` with the per-user z-score ``z(s) = (s - mean) /
  std`` over all items is exactly ``[(1 - w) u_m / std_m(u), w u_b / std_b(u)] . [v_m - mean(v_m),
  v_b - mean(v_b)]``: the mean over items is a dot product with the mean item vector, and the
  per-user standard deviation ``sqrt(u^T C u)`` with the item covariance ``C``.
* warm users served by one row and users without target history by another become one pair of
  tables by concatenation, each user's block of the other row set to zero.

The rank is chosen from ``RANKS`` on validation of the factorised form (``choose_rank``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from training.baselines import Linear, Validator
from training.evaluate import table_scorer

logger = logging.getLogger(__name__)

RANKS = (64, 128, 256, 512)
OVERSAMPLE = 16
POWER_ITERATIONS = 4


@dataclass
class Served:
    """A row as tables: score(u, i) = users[u] . items[i] for every user of the split."""

    name: str
    users: torch.Tensor
    items: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    # every user's row as if the user had no target-domain history (what a user known only from
    # the source domain is served): the ranker's simulated cold-start users. None: not known.
    mapped: torch.Tensor | None = None

    def scorer(self):  # type: ignore[no-untyped-def]
        return table_scorer(self.users, self.items)


def _svd(weights: Any, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top ``rank`` singular triplets (U, s, V) of ``weights``: exact (LAPACK) when ``rank``
    reaches the smaller dimension, else randomized (torch.svd_lowrank, oversampled, with power
    iterations)."""
    n_rows, n_cols = weights.shape
    full = min(n_rows, n_cols)
    if rank >= full:
        dense = weights.toarray() if sp.issparse(weights) else np.asarray(weights)
        u, s, vt = np.linalg.svd(dense.astype(np.float64), full_matrices=False)
        return u[:, :rank], s[:rank], vt[:rank].T
    q = min(rank + OVERSAMPLE, full)
    if sp.issparse(weights):
        coo = sp.coo_matrix(weights)
        a = torch.sparse_coo_tensor(
            torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64)),
            torch.from_numpy(coo.data.astype(np.float64)),
            coo.shape,
            check_invariants=False,
        ).coalesce()
    else:
        a = torch.from_numpy(np.asarray(weights, dtype=np.float64))
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the randomized range finder draws from torch's global generator
    try:
        tu, ts, tv = torch.svd_lowrank(a, q=q, niter=POWER_ITERATIONS)
    finally:
        torch.random.set_rng_state(gen_state)
    return tu[:, :rank].numpy(), ts[:rank].numpy(), tv[:, :rank].numpy()


def factorise_many(lin: Linear, ranks: tuple[int, ...] | list[int]) -> dict[int, Served]:
    """The factorised tables of ``lin`` at every rank of ``ranks`` (capped by the dimensions of
    its weights; one SVD at the largest), each with its relative Frobenius error."""
    w: Any = lin.weights
    n_rows, n_cols = w.shape
    full = min(n_rows, n_cols)
    caps = sorted({min(int(r), full) for r in ranks})
    sq = w.multiply(w).sum() if sp.issparse(w) else np.square(np.asarray(w, np.float64)).sum()
    norm2 = float(sq)
    if n_rows == 1:  # a single row of weights (popularity) is its own rank-1 factorisation
        left = np.ones((1, 1))
        right = np.asarray(w.toarray() if sp.issparse(w) else w, np.float64).T
        s2 = np.array([norm2])
        triplets = {1: (left, right, s2)}
        caps = [1]
    else:
        u, s, v = _svd(w, caps[-1])
        triplets = {r: (u[:, :r] * s[:r], v[:, :r], s[:r] ** 2) for r in caps}
    out: dict[int, Served] = {}
    votes = lin.votes.astype(np.float64)
    # the votes without the target-domain columns: each user as if known from the source only
    source_votes = (
        None
        if lin.target_votes is None
        else votes @ sp.diags((~lin.target_votes).astype(np.float64))
    )
    left_out = None
    if lin.fill is not None and lin.cols is not None:
        left_out = np.ones(lin.n_items)
        left_out[lin.cols] = 0.0
    for r, (left, right, s2) in triplets.items():
        items = np.zeros((lin.n_items, right.shape[1]))
        if lin.cols is None:
            items[:] = right
        else:
            items[lin.cols] = right

        def user_rows(v: Any, right: np.ndarray = right, left: np.ndarray = left) -> np.ndarray:
            rows = np.asarray(v @ left)
            if left_out is not None and lin.fill_below_row:
                # left-out items: (the row's lowest served score on cols - 1) + fill
                low = _row_min(rows, right)
                return np.hstack([rows, (low - 1.0)[:, None], np.ones((rows.shape[0], 1))])
            if left_out is not None:
                return np.hstack([rows, np.ones((rows.shape[0], 1))])
            return rows

        users = user_rows(votes)
        if left_out is not None and lin.fill_below_row:
            assert lin.fill is not None
            items = np.hstack([items, left_out[:, None], (lin.fill * left_out)[:, None]])
        elif left_out is not None:
            assert lin.fill is not None
            items = np.hstack([items, (lin.fill * left_out)[:, None]])
        mapped = users if source_votes is None else user_rows(source_votes)
        err = float(np.sqrt(max(norm2 - float(s2.sum()), 0.0) / norm2)) if norm2 > 0 else 0.0
        out[r] = Served(
            "",
            torch.from_numpy(users.astype(np.float32)),
            torch.from_numpy(items.astype(np.float32)),
            {"rank": r, "relative_frobenius_error": err},
            mapped=torch.from_numpy(mapped.astype(np.float32)),
        )
    return out


def _row_min(users: np.ndarray, right: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Each user row's lowest score over the columns of ``right`` (users @ right.T), in chunks."""
    if right.shape[0] == 0 or users.shape[0] == 0:
        return np.zeros(users.shape[0])
    rows = range(0, users.shape[0], chunk)
    return np.concatenate([(users[i : i + chunk] @ right.T).min(1) for i in rows])


def factorise(lin: Linear, rank: int) -> Served:
    """The factorised tables of ``lin`` at ``rank`` (capped by its weights' dimensions)."""
    return next(iter(factorise_many(lin, [rank]).values()))


def choose_rank(
    name: str,
    lin: Linear,
    validators: dict[str, Validator],
    ranks: tuple[int, ...] | list[int] = RANKS,
) -> dict[str, Served]:
    """For each validation segment (e.g. warm, cold), the factorised form at the rank with the
    best validation NDCG@10 on it (ties: the smaller rank); every rank's score in ``info``."""
    forms = factorise_many(lin, ranks)
    grid = {
        seg: {r: (v(forms[r].scorer()) if v.users.size else float("nan")) for r in forms}
        for seg, v in validators.items()
    }
    out: dict[str, Served] = {}
    for seg, scores in grid.items():
        best = max(forms, key=lambda r: (np.nan_to_num(scores[r], nan=-1.0), -r))
        f = forms[best]
        out[seg] = Served(
            name,
            f.users,
            f.items,
            f.info | {"valid_ndcg@10": scores[best], "grid": {str(r): scores[r] for r in forms}},
            mapped=f.mapped,
        )
    return out


def _standardiser(
    items: torch.Tensor, *users: torch.Tensor | None
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """(centred items, each user table / its per-user sd of scores): their dot products are the
    per-user z-scores of ``users @ items.T`` (sd with Bessel's correction; zero sd divides by
    one, as training.baselines.standardise)."""
    v = items.double()
    centred = v - v.mean(0, keepdim=True)
    n = max(v.shape[0] - 1, 1)
    cov = centred.T @ centred / n

    def scaled(rows: torch.Tensor | None) -> torch.Tensor | None:
        if rows is None:
            return None
        u = rows.double()
        sd = ((u @ cov) * u).sum(1).clamp_min(0.0).sqrt()
        sd = torch.where(sd > 0, sd, torch.ones_like(sd))
        return u / sd[:, None]

    return centred, [scaled(u) for u in users]


def blend_tables(model: Served, base: Served, w: float, name: str = "blend") -> Served:
    """The blend of two rows at weight ``w`` as one pair of tables (concatenated blocks)."""
    vm, (um, mm) = _standardiser(model.items, model.users, model.mapped)
    vb, (ub, mb) = _standardiser(base.items, base.users, base.mapped)
    assert um is not None and ub is not None
    mapped: torch.Tensor | None
    if w <= 0.0:
        users, items, mapped = um, vm, mm
    elif w >= 1.0:
        users, items, mapped = ub, vb, mb
    else:
        users = torch.cat([(1.0 - w) * um, w * ub], 1)
        items = torch.cat([vm, vb], 1)
        mapped = None if mm is None or mb is None else torch.cat([(1.0 - w) * mm, w * mb], 1)
    return Served(
        name,
        users.float(),
        items.float(),
        {"weight": w},
        mapped=None if mapped is None else mapped.float(),
    )


def by_history(has_target: np.ndarray, warm: Served, cold: Served, name: str) -> Served:
    """``warm``'s rows for users with target training history, ``cold``'s for the others; every
    user's mapped row is ``cold``'s (a user without target history is served by ``cold``)."""
    if warm is cold:
        return Served(name, warm.users, warm.items, mapped=warm.mapped)
    h = torch.from_numpy(has_target)[:, None]
    users = torch.cat(
        [warm.users * h.to(warm.users.dtype), cold.users * (~h).to(cold.users.dtype)], 1
    )
    mapped = (
        None if cold.mapped is None else torch.cat([torch.zeros_like(warm.users), cold.mapped], 1)
    )
    return Served(name, users, torch.cat([warm.items, cold.items], 1), mapped=mapped)
