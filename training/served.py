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
    for r, (left, right, s2) in triplets.items():
        users = np.asarray(votes @ left)
        items = np.zeros((lin.n_items, right.shape[1]))
        if lin.cols is None:
            items[:] = right
        else:
            items[lin.cols] = right
        if lin.fill is not None and lin.cols is not None and lin.fill_below_row:
            # left-out items: (the row's lowest served score on cols - 1) + fill, as two columns
            left_out = np.ones(lin.n_items)
            left_out[lin.cols] = 0.0
            low = _row_min(users, right)
            users = np.hstack([users, (low - 1.0)[:, None], np.ones((users.shape[0], 1))])
            items = np.hstack([items, left_out[:, None], (lin.fill * left_out)[:, None]])
        elif lin.fill is not None and lin.cols is not None:
            extra = lin.fill.astype(np.float64).copy()
            extra[lin.cols] = 0.0
            users = np.hstack([users, np.ones((users.shape[0], 1))])
            items = np.hstack([items, extra[:, None]])
        err = float(np.sqrt(max(norm2 - float(s2.sum()), 0.0) / norm2)) if norm2 > 0 else 0.0
        out[r] = Served(
            "",
            torch.from_numpy(users.astype(np.float32)),
            torch.from_numpy(items.astype(np.float32)),
            {"rank": r, "relative_frobenius_error": err},
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
        )
    return out


def _standardiser(users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(users / per-user sd of their scores, centred items): their dot products are the per-user
    z-scores of ``users @ items.T`` (sd with Bessel's correction; zero sd divides by one, as
    training.baselines.standardise)."""
    v = items.double()
    centred = v - v.mean(0, keepdim=True)
    n = max(v.shape[0] - 1, 1)
    cov = centred.T @ centred / n
    u = users.double()
    var = ((u @ cov) * u).sum(1).clamp_min(0.0)
    sd = var.sqrt()
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    return u / sd[:, None], centred


def blend_tables(model: Served, base: Served, w: float, name: str = "blend") -> Served:
    """The blend of two rows at weight ``w`` as one pair of tables (concatenated blocks)."""
    um, vm = _standardiser(model.users, model.items)
    ub, vb = _standardiser(base.users, base.items)
    if w <= 0.0:
        users, items = um, vm
    elif w >= 1.0:
        users, items = ub, vb
    else:
        users = torch.cat([(1.0 - w) * um, w * ub], 1)
        items = torch.cat([vm, vb], 1)
    return Served(name, users.float(), items.float(), {"weight": w})


def by_history(has_target: np.ndarray, warm: Served, cold: Served, name: str) -> Served:
    """``warm``'s rows for users with target training history, ``cold``'s for the others."""
    if warm is cold:
        return Served(name, warm.users, warm.items)
    h = torch.from_numpy(has_target)[:, None]
    users = torch.cat(
        [warm.users * h.to(warm.users.dtype), cold.users * (~h).to(cold.users.dtype)], 1
    )
    return Served(name, users, torch.cat([warm.items, cold.items], 1))
