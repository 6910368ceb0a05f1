"""Ranking metrics (Recall, NDCG, HR, MRR at K) under full ranking or against sampled negatives.

Every model is evaluated through a scorer: a function from a batch of user indices to their
scores over every target item (a two-tower model's is ``users[u] @ items.T``; the baselines of
``training.baselines`` supply their own), so baselines and models share one evaluation code.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Scorer = Callable[[np.ndarray], torch.Tensor]  # user indices [b] -> scores [b, n_items]


def table_scorer(user_table: torch.Tensor, item_table: torch.Tensor) -> Scorer:
    """The scorer of a pair of tables: score(u, i) = <users[u], items[i]>."""

    def score(batch: np.ndarray) -> torch.Tensor:
        return user_table[torch.from_numpy(batch)] @ item_table.T

    return score


METRICS = ("recall", "ndcg", "hit", "mrr")


def _group(pairs: np.ndarray) -> dict[int, np.ndarray]:
    if len(pairs) == 0:
        return {}
    order = np.argsort(pairs[:, 0], kind="stable")
    p = pairs[order]
    bounds = np.flatnonzero(np.r_[True, p[1:, 0] != p[:-1, 0], True])
    return {int(p[a, 0]): p[a:b, 1] for a, b in zip(bounds[:-1], bounds[1:], strict=True)}


def metrics_from_ranks(
    hit_ranks: list[np.ndarray], n_relevant: np.ndarray, ks: tuple[int, ...]
) -> dict[str, float]:
    """Metrics averaged over users, from the 0-based ranks of each user's relevant items."""
    out: dict[str, float] = {}
    n_users = len(hit_ranks)
    if n_users == 0:
        return {f"{m}@{k}": float("nan") for k in ks for m in METRICS} | {"users": 0}
    for k in ks:
        rec = ndcg = hit = mrr = 0.0
        disc = 1.0 / np.log2(np.arange(2, k + 2))
        for ranks, n_rel in zip(hit_ranks, n_relevant, strict=True):
            r = ranks[ranks < k]
            if r.size:
                rec += r.size / n_rel
                ndcg += disc[r].sum() / disc[: min(int(n_rel), k)].sum()
                hit += 1.0
                mrr += 1.0 / (r.min() + 1)
        out[f"recall@{k}"] = rec / n_users
        out[f"ndcg@{k}"] = ndcg / n_users
        out[f"hit@{k}"] = hit / n_users
        out[f"mrr@{k}"] = mrr / n_users
    out["users"] = n_users
    return out


@torch.no_grad()
def full_ranking(
    user_table: torch.Tensor,
    item_table: torch.Tensor,
    test: np.ndarray,
    exclude: list[np.ndarray],
    users: np.ndarray | None = None,
    ks: tuple[int, ...] = (10, 20),
    chunk: int = 1024,
) -> dict[str, float]:
    """Rank every item not in ``exclude`` for each test user (RecBole's full-sort protocol)."""
    return rank_full(table_scorer(user_table, item_table), test, exclude, users, ks, chunk)


@torch.no_grad()
def rank_full(
    scorer: Scorer,
    test: np.ndarray,
    exclude: list[np.ndarray],
    users: np.ndarray | None = None,
    ks: tuple[int, ...] = (10, 20),
    chunk: int = 1024,
) -> dict[str, float]:
    """Full ranking through a scorer: every item not in ``exclude``, for each test user."""
    truth = _group(test)
    excl: dict[int, list[np.ndarray]] = {}
    for pairs in exclude:
        for u, items in _group(pairs).items():
            excl.setdefault(u, []).append(items)
    test_users = np.array(sorted(truth), dtype=np.int64)
    if users is not None:
        test_users = np.intersect1d(test_users, users)
    kmax = max(ks)
    hit_ranks: list[np.ndarray] = []
    n_rel = np.array([truth[int(u)].size for u in test_users], dtype=np.float64)
    for a in range(0, test_users.size, chunk):
        batch = test_users[a : a + chunk]
        scores = scorer(batch).clone()
        rows, cols = [], []
        for r, u in enumerate(batch.tolist()):
            for items in excl.get(u, []):
                rows.append(np.full(items.size, r))
                cols.append(items)
        if rows:
            scores[
                torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(cols))
            ] = -torch.inf
        top = torch.topk(scores, k=min(kmax, scores.shape[1]), dim=1).indices.numpy()
        for r, u in enumerate(batch.tolist()):
            hit_ranks.append(np.flatnonzero(np.isin(top[r], truth[u])))
    return metrics_from_ranks(hit_ranks, n_rel, ks)


@torch.no_grad()
def sampled_ranking(
    user_table: torch.Tensor,
    item_table: torch.Tensor,
    test: np.ndarray,
    negatives: np.ndarray,
    users: np.ndarray | None = None,
    ks: tuple[int, ...] = (10, 20),
) -> dict[str, float]:
    """Rank each test item against its sampled negatives (ties count half)."""
    rows = np.arange(len(test)) if users is None else np.flatnonzero(np.isin(test[:, 0], users))
    u = user_table[torch.from_numpy(test[rows, 0])]
    pos = (u * item_table[torch.from_numpy(test[rows, 1])]).sum(-1, keepdim=True)
    neg = torch.einsum("bd,bnd->bn", u, item_table[torch.from_numpy(negatives[rows])])
    return _sampled_metrics(pos, neg, ks)


def _sampled_metrics(pos: torch.Tensor, neg: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    rank = (neg > pos).sum(1).double() + 0.5 * (neg == pos).sum(1).double()
    ranks = [np.array([int(r)]) for r in rank.floor().long().numpy()]
    return metrics_from_ranks(ranks, np.ones(len(ranks)), ks)


@torch.no_grad()
def rank_sampled(
    scorer: Scorer,
    test: np.ndarray,
    negatives: np.ndarray,
    users: np.ndarray | None = None,
    ks: tuple[int, ...] = (10, 20),
    chunk: int = 512,
) -> dict[str, float]:
    """Sampled ranking through a scorer: each test item against its negatives (ties count half)."""
    rows = np.arange(len(test)) if users is None else np.flatnonzero(np.isin(test[:, 0], users))
    pos_parts, neg_parts = [], []
    for a in range(0, rows.size, chunk):
        r = rows[a : a + chunk]
        scores = scorer(test[r, 0])
        idx = torch.arange(r.size)
        pos_parts.append(scores[idx, torch.from_numpy(test[r, 1])][:, None])
        neg_parts.append(torch.gather(scores, 1, torch.from_numpy(negatives[r])))
    if not pos_parts:
        return metrics_from_ranks([], np.ones(0), ks)
    return _sampled_metrics(torch.cat(pos_parts), torch.cat(neg_parts), ks)
