"""The second stage: cross-domain item-to-item neighbour lists for retrieval, and a learned ranker
(a small MLP over the request-time features of recsys.features) trained on the candidates that
the served retrieval generates, with its ONNX export and parity check.

Warm labels come from the validation interactions of warm users, which the retrieval model was
not fitted on (its own training items would carry inflated scores). They are few, so the ranker
is cross-fitted: those users fall into two halves, one MLP trains on each half (a share of its
users also with recent items) with its epoch chosen on the other, and the served ranker is the
mean of the two (every warm label trains it; each member is judged on users it never saw). Cold-start
examples are training users presented as retrieval serves source-only users (no target history,
their mapped vector), labelled with their own target training items; the split's cold-start
validation users select. The served order mixes the MLP with the retrieval model's dot product,
the weight chosen per segment (warm, mapped) on the same validation users (WithDot), so it is
never below the dot product's order on validation. The test split is never read
(ranker_examples).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recsys.candidates import PERSONAL_SOURCES, Source, merge_candidates
from recsys.features import FEATURE_NAMES, UserContext, candidate_features
from recsys.sources import CandidateSources, Neighbours, UserState, exact_search

logger = logging.getLogger(__name__)

# Largest dense block of similarities computed at once (floats).
_BLOCK = 4_000_000


def _unique_pairs(pairs: np.ndarray, n_cols: int) -> np.ndarray:
    """(row, col) pairs once each, sorted by row then column."""
    if len(pairs) == 0:
        return np.zeros((0, 2), np.int64)
    keys = np.unique(pairs[:, 0].astype(np.int64) * n_cols + pairs[:, 1])
    return np.stack([keys // n_cols, keys % n_cols], axis=1)


def _sparse(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> Any:
    index = torch.from_numpy(np.stack([rows, cols]).astype(np.int64))
    return torch.sparse_coo_tensor(
        index, torch.from_numpy(values), shape, check_invariants=True
    ).coalesce()


def _top_n(block: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the n largest positive columns, best first (-1 pads)."""
    n = min(n, block.shape[1])
    part = np.argpartition(-block, n - 1, axis=1)[:, :n]
    vals = np.take_along_axis(block, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    cols = np.take_along_axis(part, order, axis=1).astype(np.int32)
    vals = np.take_along_axis(vals, order, axis=1).astype(np.float32)
    cols[vals <= 0] = -1
    vals[vals <= 0] = 0.0
    return cols, vals


def compute_neighbours(
    target_pairs: np.ndarray,
    source_pairs: np.ndarray,
    n_users: int,
    n_target: int,
    n_source: int,
    user_rows: np.ndarray,
    n: int = 50,
) -> Neighbours:
    """Cosine similarity of items over the users who consumed them (the user x [source items |
    target items] matrix), top-n target neighbours of every target and every source item; and
    the source items of each user of `user_rows` (the published users, in order)."""
    target = _unique_pairs(target_pairs, n_target)
    source = _unique_pairs(source_pairs, n_source)
    # Columns of [source items | target items], each user-item pair once.
    users = np.concatenate([source[:, 0], target[:, 0]])
    items = np.concatenate([source[:, 1], target[:, 1] + n_source])
    n_all = n_source + n_target
    counts = np.bincount(items, minlength=n_all).astype(np.float64)
    inv = 1.0 / np.sqrt(np.maximum(counts, 1.0))
    weight = inv[items].astype(np.float32)
    is_target = items >= n_source
    # target items x users, sparse; each block of items is a dense [users, block] right side
    right_t = _sparse(
        items[is_target] - n_source, users[is_target], weight[is_target], (n_target, n_users)
    )
    order = np.argsort(items, kind="stable")
    items_sorted, users_sorted, weight_sorted = items[order], users[order], weight[order]
    lists = np.full((n_all, n), -1, np.int32)
    scores = np.zeros((n_all, n), np.float32)
    step = max(1, _BLOCK // max(1, n_target, n_users))
    for start in range(0, n_all, step):
        stop = min(n_all, start + step)
        lo, hi = np.searchsorted(items_sorted, [start, stop])
        if hi == lo:
            continue
        left = torch.zeros((n_users, stop - start), dtype=torch.float32)
        left[
            torch.from_numpy(users_sorted[lo:hi]), torch.from_numpy(items_sorted[lo:hi] - start)
        ] = torch.from_numpy(weight_sorted[lo:hi])
        block = torch.sparse.mm(right_t, left).T.contiguous().numpy()
        own = np.arange(max(start, n_source), stop)
        block[own - start, own - n_source] = 0.0  # an item is not its own neighbour
        cols, vals = _top_n(block, n)
        lists[start:stop, : cols.shape[1]] = cols
        scores[start:stop, : vals.shape[1]] = vals
    # Each published user's source items, in the order of `user_rows`.
    by_user: dict[int, list[int]] = {}
    for u, j in source:
        by_user.setdefault(int(u), []).append(int(j))
    per_user = [by_user.get(int(u), []) for u in user_rows]
    indptr = np.r_[0, np.cumsum([len(x) for x in per_user])].astype(np.int64)
    flat = np.fromiter((j for x in per_user for j in x), np.int64, int(indptr[-1]))
    neighbours = Neighbours(
        target=np.ascontiguousarray(lists[n_source:]),
        target_scores=np.ascontiguousarray(scores[n_source:]),
        source=np.ascontiguousarray(lists[:n_source]),
        source_scores=np.ascontiguousarray(scores[:n_source]),
        source_seen_indptr=indptr,
        source_seen_indices=flat,
    )
    neighbours.check(n_target, len(user_rows), "computed neighbours")
    return neighbours


@dataclass
class CandidateSet:
    """The merged candidates of one user, as the gateway builds them, with labels."""

    features: np.ndarray  # FP32 [C, F]
    labels: np.ndarray  # bool [C]
    n_relevant: int  # the user's labelled items (in or out of the candidates)
    user: int = -1  # the split's user index
    kind: str = ""  # warm, warm+recent, cold (simulated) or cold-valid
    relevant: frozenset[str] = frozenset()  # the labelled item ids


def user_candidates(
    sources: CandidateSources,
    state: UserState,
    user: UserContext,
    depth: int,
    popular: int,
    excluded: set[int],
    relevant: set[str],
) -> CandidateSet:
    """What the gateway's pipeline does for one user: a personal call (every personal source,
    `depth` candidates) and a popular call (`popular`), merged; their features and labels."""
    personal = sources.generate(state, depth, set(PERSONAL_SOURCES), excluded).table
    lists = [personal]
    if popular > 0:
        lists.append(sources.generate(state, popular, {Source.POPULAR}, excluded).table)
    merged = merge_candidates(lists)
    labels = np.fromiter((i in relevant for i in merged.item_ids), bool, len(merged))
    return CandidateSet(candidate_features(merged, user), labels, len(relevant))


def ndcg_at(order_scores: np.ndarray, labels: np.ndarray, n_relevant: int, k: int = 10) -> float:
    """NDCG@k of candidates ordered by score (ties in candidate order); relevant items that are
    not among the candidates count as misses."""
    if n_relevant == 0:
        return 0.0
    order = np.argsort(-order_scores, kind="stable")[:k]
    gains = labels[order] / np.log2(np.arange(2, len(order) + 2))
    ideal = (1.0 / np.log2(np.arange(2, min(n_relevant, k) + 2))).sum()
    return float(gains.sum() / ideal)


class FeatureRanker(nn.Module):
    """features [N, F] -> score [N]: standardisation (fixed) then an MLP."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, mean: np.ndarray, scale: np.ndarray, hidden: int = 64) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(mean.astype(np.float32)))
        self.register_buffer("scale", torch.from_numpy(scale.astype(np.float32)))
        width = len(mean)
        self.net = nn.Sequential(
            nn.Linear(width, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden // 2),
            nn.ReLU(),
            nn.Linear(hidden // 2, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.scale).squeeze(-1)


# The feature columns the served ranker mixes with its MLP (recsys.features.FEATURE_NAMES).
PERSONAL = FEATURE_NAMES.index("personal_score")
MAPPED = FEATURE_NAMES.index("mapped")
# Weights of the dot product (personal_score) in the served order, chosen on validation.
DOT_WEIGHTS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


class CrossFitted(nn.Module):
    """features [N, F] -> score [N]: the mean of the members' scores (one ONNX graph)."""

    def __init__(self, members: list[FeatureRanker]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(features) for m in self.members]).mean(dim=0)


# Members of the cross-fitted ranker: each trains on all warm validation users but one fold's
# (three quarters of them with 4 folds, against half with 2: out-of-fold NDCG@10 of a member
# +0.0023 on 12 runs of five pairs, docs/ranking-features.md).
FOLDS = 4

HeldOut = list[tuple[FeatureRanker, list[CandidateSet]]]  # each member, the warm users it left out


class WithDot(nn.Module):
    """features [N, F] -> ``a * ranker(features) + b * personal_score``, with (a, b) one pair
    for users with target history and one for users mapped from the source domain (the
    ``mapped`` feature), so that validation decides, per segment, how much of the retrieval
    model's own dot product the served order keeps (``b = 0``: the MLP alone; ``a = 0``: the
    dot product alone)."""

    a: torch.Tensor
    b: torch.Tensor

    def __init__(self, ranker: nn.Module, a: tuple[float, float], b: tuple[float, float]) -> None:
        super().__init__()
        self.ranker = ranker
        self.register_buffer("a", torch.tensor(a, dtype=torch.float32))  # (warm, mapped)
        self.register_buffer("b", torch.tensor(b, dtype=torch.float32))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        mapped = features[:, MAPPED] > 0.5
        a = torch.where(mapped, self.a[1], self.a[0])
        b = torch.where(mapped, self.b[1], self.b[0])
        return a * self.ranker(features) + b * features[:, PERSONAL]


def _scores(model: nn.Module, sets: list[CandidateSet]) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(torch.from_numpy(s.features)).numpy().astype(np.float64) for s in sets]


def _sd(parts: list[np.ndarray]) -> float:
    sd = float(np.concatenate(parts).std()) if parts else 0.0
    return sd if sd > 1e-12 else 1.0


def _dot_weight(
    learned: list[np.ndarray], sets: list[CandidateSet]
) -> tuple[float, list[dict[str, float]]]:
    """The weight w of the dot product in ``(1 - w) learned / sd + w dot / sd`` (each term
    scaled by its standard deviation over the rows of `sets`) with the best mean NDCG@10 on
    `sets` (ties: the smaller w); with every grid point's score."""
    dots = [s.features[:, PERSONAL].astype(np.float64) for s in sets]
    sd_l, sd_d = _sd(learned), _sd(dots)
    grid, best = [], (-1.0, 0.0)
    for w in DOT_WEIGHTS:
        score = float(
            np.mean(
                [
                    ndcg_at((1 - w) * x / sd_l + w * d / sd_d, s.labels, s.n_relevant)
                    for x, d, s in zip(learned, dots, sets, strict=True)
                ]
            )
        )
        grid.append({"dot_weight": w, "valid_ndcg@10": score})
        if score > best[0]:
            best = (score, w)
    return best[1], grid


def with_dot(
    model: CrossFitted, sets: dict[str, list[CandidateSet]], held_out: HeldOut
) -> tuple[WithDot, dict[str, Any]]:
    """The served ranker: `model` mixed with the dot product, the weight of each segment chosen
    on its validation users. Warm users: out of fold (each member's scores on the fold it did
    not train on, `held_out`, standardised by that member's spread). Mapped users: the cold
    selection users under the mean ranker (no cold selection users: the MLP alone)."""
    learned: list[np.ndarray] = []
    warm_sets: list[CandidateSet] = []
    for member, part in held_out:
        scores = _scores(member, part)
        sd = _sd(scores)
        learned += [x / sd for x in scores]
        warm_sets += part
    info: dict[str, Any] = {}
    weights = {}
    for seg, parts, segment_sets in (
        ("warm", learned, warm_sets),
        ("mapped", _scores(model, sets["select_cold"]), sets["select_cold"]),
    ):
        if segment_sets:
            w, grid = _dot_weight(parts, segment_sets)
        else:
            w, grid = 0.0, []
        # the served graph scales the mean ranker by its own spread on the segment's candidates
        sd_l = _sd(_scores(model, segment_sets))
        sd_d = _sd([s.features[:, PERSONAL].astype(np.float64) for s in segment_sets])
        weights[seg] = ((1 - w) / sd_l, w / sd_d)
        info[seg] = {"dot_weight": w, "grid": grid, "users": len(segment_sets)}
    served = WithDot(
        model,
        (weights["warm"][0], weights["mapped"][0]),
        (weights["warm"][1], weights["mapped"][1]),
    ).eval()
    return served, info


def _pad(sets: list[CandidateSet]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s.labels) for s in sets)
    n_features = sets[0].features.shape[1]
    x = np.zeros((len(sets), width, n_features), np.float32)
    y = np.zeros((len(sets), width), np.float32)
    mask = np.zeros((len(sets), width), bool)
    for i, s in enumerate(sets):
        x[i, : len(s.labels)] = s.features
        y[i, : len(s.labels)] = s.labels
        mask[i, : len(s.labels)] = True
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask)


def evaluate_orders(model: nn.Module | None, sets: list[CandidateSet]) -> dict[str, float]:
    """Mean NDCG@10 of (a) retrieval order, (b) the dot product, (c) the ranker."""
    out = {"retrieval": 0.0, "dot": 0.0, "learned": 0.0, "candidate_recall": 0.0}
    if not sets:  # e.g. no cold-start users (a single-domain job)
        return out | {"users": 0}
    for s in sets:
        n = len(s.labels)
        out["retrieval"] += ndcg_at(-np.arange(n, dtype=np.float64), s.labels, s.n_relevant)
        out["dot"] += ndcg_at(s.features[:, 0].astype(np.float64), s.labels, s.n_relevant)
        if model is not None:
            with torch.no_grad():
                scores = model(torch.from_numpy(s.features)).numpy()
            out["learned"] += ndcg_at(scores.astype(np.float64), s.labels, s.n_relevant)
        out["candidate_recall"] += s.labels.sum() / max(1, s.n_relevant)
    return {k: v / len(sets) for k, v in out.items()} | {"users": len(sets)}


def train_ranker(
    train_sets: list[CandidateSet],
    select_sets: list[CandidateSet],
    *,
    seed: int,
    epochs: int = 40,
    patience: int = 5,
    lr: float = 3e-3,
    batch_users: int = 64,
    select_cold: list[CandidateSet] | None = None,
) -> tuple[FeatureRanker, dict[str, Any]]:
    """Listwise softmax over each user's candidates (users with a labelled item among them),
    the epoch chosen on the selection users' NDCG@10 (with `select_cold`, the mean of the warm
    and the cold selection users' NDCG@10, each segment weighing the same)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    usable = [s for s in train_sets if s.labels.any()]
    if not usable:
        raise ValueError("no training user has a held-out item among its candidates")
    stacked = np.concatenate([s.features for s in usable])
    mean = stacked.mean(axis=0)
    scale = stacked.std(axis=0)
    scale[scale < 1e-6] = 1.0
    model = FeatureRanker(mean, scale)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    x, y, mask = _pad(usable)
    best = (-1.0, 0, {k: v.clone() for k, v in model.state_dict().items()})
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        order = rng.permutation(len(usable))
        total = 0.0
        for start in range(0, len(order), batch_users):
            idx = torch.from_numpy(order[start : start + batch_users])
            logits = model(x[idx]).masked_fill(~mask[idx], -1e9)
            log_p = torch.log_softmax(logits, dim=1)
            target = y[idx] / y[idx].sum(dim=1, keepdim=True)
            loss = -(target * log_p).sum(dim=1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(idx)
        model.eval()
        valid = evaluate_orders(model, select_sets)["learned"]
        record = {"epoch": epoch, "loss": total / len(usable), "valid_ndcg@10": valid}
        if select_cold:
            cold = evaluate_orders(model, select_cold)["learned"]
            record["valid_cold_ndcg@10"] = cold
            valid = (valid + cold) / 2
        history.append(record)
        if valid > best[0]:
            best = (valid, epoch, {k: v.clone() for k, v in model.state_dict().items()})
        elif epoch - best[1] >= patience:
            break
    model.load_state_dict(best[2])
    model.eval()
    info = {
        # what chose the epoch: the warm selection users' NDCG@10, averaged with the cold ones'
        "selection_ndcg@10": best[0],
        "best_epoch": best[1],
        "epochs_run": len(history),
        "train_users": len(usable),
        "history": history,
    }
    return model, info


# How many of a user's training items stand in for the request's recent items.
RECENT_ITEMS = 5


@dataclass
class _Published:
    """The arrays of a checkpoint that candidate generation for training needs."""

    sources: CandidateSources
    neighbours: Neighbours
    user_table: np.ndarray
    mapped_table: np.ndarray | None  # every published user's mapped (transfer) vector
    indptr: np.ndarray
    indices: np.ndarray
    row_of: dict[int, int]  # split user index -> published row
    kinds: list[str]
    items: list[str]


def _state(
    p: _Published, r: int, *, cold: bool, recent: np.ndarray | None = None
) -> tuple[UserState, UserContext, set[int]]:
    """The retrieval state of published row r: warm (its target history, its own vector) or
    cold (no target history, the mapped vector, as retrieval serves a source-only user)."""
    source_rows = p.neighbours.source_rows(r)
    recent_rows = np.zeros(0, np.int64) if recent is None else recent
    if cold:
        vector = p.mapped_table[r] if p.mapped_table is not None else p.user_table[r]
        state = UserState(
            row=r,
            mapped=True,
            vector=vector,
            personal=Source.TRANSFER,
            target_rows=np.zeros(0, np.int64),
            source_rows=source_rows,
            recent_rows=recent_rows,
        )
        context = UserContext(known=True, mapped=True, source_history=len(source_rows))
        return state, context, set()
    seen = p.indices[p.indptr[r] : p.indptr[r + 1]]
    state = UserState(
        row=r,
        mapped=False,
        vector=p.user_table[r],
        personal=Source.ANN,
        target_rows=seen,
        source_rows=source_rows,
        recent_rows=recent_rows,
    )
    context = UserContext(
        known=True, mapped=False, target_history=len(seen), source_history=len(source_rows)
    )
    return state, context, {int(j) for j in seen}


def ranker_examples(
    split: Any,
    p: _Published,
    *,
    depth: int,
    popular: int,
    max_users: int,
    seed: int,
    cold_share: float,
    recent_share: float,
) -> dict[str, list[CandidateSet]]:
    """The labelled candidate sets of the ranker, by role:

    - ``train_warm``: half of the warm validation users (labels: their validation items);
    - ``train_recent``: a share of those again, with up to RECENT_ITEMS of their training items
      as the request's recent items (the RECENT source and features);
    - ``select_recent``: the same for the other half (``select_warm``), whose users train the
      second member of the cross-fitted ranker;
    - ``train_cold``: simulated cold-start users drawn from training users with source history
      who are not selection users: their target history hidden (no seen items, the mapped
      vector, item-to-item votes of source items only) and their own target *training* items
      as labels, so no validation or test item is ever read;
    - ``select_warm``: the other half of the warm validation users;
    - ``select_cold``: the cold-start validation users of the split (``cold_valid``, served with
      their mapped rows), or, where the split has none, selection users simulated cold as above.
    """
    rng = np.random.default_rng(seed)
    valid_by_user: dict[int, set[str]] = {}
    for u, j in split.valid:
        valid_by_user.setdefault(int(u), set()).add(p.items[int(j)])
    train_by_user: dict[int, set[str]] = {}
    for u, j in split.train:
        train_by_user.setdefault(int(u), set()).add(p.items[int(j)])

    def is_warm(u: int) -> bool:
        return u in p.row_of and p.kinds[p.row_of[u]] == "target"

    warm = [u for u in sorted(valid_by_user) if is_warm(u)]
    if len(warm) > max_users:
        warm = sorted(rng.choice(warm, max_users, replace=False).tolist())
    perm = rng.permutation(len(warm))
    half = len(warm) // 2
    train_users = sorted(warm[i] for i in perm[:half])
    select_users = {warm[i] for i in perm[half:]}

    def build(u: int, *, cold: bool, relevant: set[str], kind: str, recent: bool = False) -> Any:
        r = p.row_of[u]
        recent_rows = None
        if recent:
            seen = p.indices[p.indptr[r] : p.indptr[r + 1]]
            take = min(RECENT_ITEMS, len(seen))
            recent_rows = np.sort(rng.choice(seen, take, replace=False)).astype(np.int64)
        state, context, excluded = _state(p, r, cold=cold, recent=recent_rows)
        s = user_candidates(p.sources, state, context, depth, popular, excluded, relevant)
        s.user, s.kind, s.relevant = u, kind, frozenset(relevant)
        return s

    out: dict[str, list[CandidateSet]] = {k: [] for k in _ROLES}
    for u in train_users:
        out["train_warm"].append(build(u, cold=False, relevant=valid_by_user[u], kind="warm"))
        if recent_share > 0 and rng.random() < recent_share:
            out["train_recent"].append(
                build(u, cold=False, relevant=valid_by_user[u], kind="warm+recent", recent=True)
            )
    for u in sorted(select_users):
        out["select_warm"].append(build(u, cold=False, relevant=valid_by_user[u], kind="warm"))
        if recent_share > 0 and rng.random() < recent_share:
            out["select_recent"].append(
                build(u, cold=False, relevant=valid_by_user[u], kind="warm+recent", recent=True)
            )
    # Simulated cold: training users with source history and target training items, never a
    # selection user; as many as cold_share of the warm training users.
    pool = [
        u
        for u in sorted(train_by_user)
        if is_warm(u) and u not in select_users and len(p.neighbours.source_rows(p.row_of[u]))
    ]
    n_cold = min(len(pool), int(round(cold_share * len(train_users))))
    if n_cold:
        for u in sorted(rng.choice(pool, n_cold, replace=False).tolist()):
            out["train_cold"].append(build(u, cold=True, relevant=train_by_user[u], kind="cold"))
    cold_valid: dict[int, set[str]] = {}
    for u, j in split.cold_valid:
        cold_valid.setdefault(int(u), set()).add(p.items[int(j)])
    real = [u for u in sorted(cold_valid) if u in p.row_of and p.kinds[p.row_of[u]] == "mapped"]
    for u in real:
        # served as retrieval serves them: their row is the mapped vector, no target history
        out["select_cold"].append(build(u, cold=True, relevant=cold_valid[u], kind="cold-valid"))
    if not real and cold_share > 0:
        for u in sorted(select_users):
            if u in train_by_user and len(p.neighbours.source_rows(p.row_of[u])):
                s = build(u, cold=True, relevant=train_by_user[u], kind="cold")
                out["select_cold"].append(s)
    return out


def published_arrays(
    checkpoint: dict[str, Any], neighbours: Neighbours, rows: np.ndarray
) -> _Published:
    """The candidate sources over a checkpoint's tables (`rows`: the split's user index of each
    published user, in order)."""
    item_table = checkpoint["item_table"].detach().float().numpy()
    mapped = checkpoint.get("mapped_table")
    if mapped is None:
        logger.warning(
            "ranker: no mapped vectors in the checkpoint; simulated cold users keep their own"
        )
    indptr, indices = checkpoint["seen"]
    return _Published(
        sources=CandidateSources(
            item_ids=checkpoint["items"],
            titles=[t or "" for t in checkpoint["titles"]],
            item_embeddings=item_table,
            popularity=np.asarray(checkpoint["popularity"], np.float32),
            neighbours=neighbours,
            search=exact_search(item_table),
        ),
        neighbours=neighbours,
        user_table=checkpoint["user_table"].detach().float().numpy(),
        mapped_table=None if mapped is None else mapped.detach().float().numpy(),
        indptr=np.asarray(indptr),
        indices=np.asarray(indices),
        row_of={int(r): i for i, r in enumerate(rows)},
        kinds=list(checkpoint["user_kinds"]),
        items=list(checkpoint["items"]),
    )


_ROLES = (
    "train_warm",
    "train_recent",
    "train_cold",
    "select_warm",
    "select_recent",
    "select_cold",
)


def fit_second_stage(
    split: Any,
    checkpoint: dict[str, Any],
    *,
    depth: int,
    popular: int,
    max_users: int,
    n_neighbours: int,
    seed: int,
    cold_share: float = 1.0,
    recent_share: float = 0.5,
    folds: int = FOLDS,
) -> dict[str, Any]:
    """Neighbour lists over the published users, labelled candidates (ranker_examples), the
    ranker trained and selected on them. Returns what publishing needs (checkpoint keys
    `neighbours` and `learned_ranker`)."""
    users_index = {u: i for i, u in enumerate(split.users)}
    rows = np.fromiter((users_index[u] for u in checkpoint["users"]), np.int64)
    source_pairs = np.concatenate([split.source_train, split.source_valid])
    neighbours = compute_neighbours(
        split.train,
        source_pairs,
        split.n_users,
        split.n_target_items,
        len(split.source_items),
        rows,
        n_neighbours,
    )
    published = published_arrays(checkpoint, neighbours, rows)
    sets = ranker_examples(
        split,
        published,
        depth=depth,
        popular=popular,
        max_users=max_users,
        seed=seed,
        cold_share=cold_share,
        recent_share=recent_share,
    )
    mlp, info, held_out = cross_fit(sets, seed, folds)
    model, info["dot_weight"] = with_dot(mlp, sets, held_out)
    # out of fold, as before, now of the served order (the MLP mixed with the chosen weight of
    # the dot product; the weight was chosen on these users, so "learned" is the grid's best)
    warm = info["dot_weight"]["warm"]
    if warm["grid"]:
        chosen = next(g for g in warm["grid"] if g["dot_weight"] == warm["dot_weight"])
        info["validation"] = info["validation"] | {
            "mlp": info["validation"]["learned"],
            "learned": chosen["valid_ndcg@10"],
        }
    info["validation_cold"] = evaluate_orders(model, sets["select_cold"])
    info["validation_cold_kind"] = sets["select_cold"][0].kind if sets["select_cold"] else None
    info["examples"] = {k: len(v) for k, v in sets.items()}
    info["depth"] = {"retrieval_candidates": depth, "popular_candidates": popular}
    for name in ("validation", "validation_cold"):
        v = info[name]
        logger.info(
            "ranker %s: NDCG@10 retrieval order %.4f, dot product %.4f, learned %.4f "
            "(candidate recall %.3f, %d users)",
            name,
            v["retrieval"],
            v["dot"],
            v["learned"],
            v["candidate_recall"],
            v["users"],
        )
    return {"neighbours": neighbours, "learned_ranker": {"module": model, "info": info}}


def _with_or_without_cold(
    warm: list[CandidateSet],
    select_warm: list[CandidateSet],
    simulated_cold: list[CandidateSet],
    select_cold: list[CandidateSet],
    seed: int,
) -> tuple[FeatureRanker, dict[str, Any]]:
    """A ranker trained on the warm examples alone and, where there are simulated cold-start
    users, on the warm examples and those: the one the selection users prefer. Simulated users
    are labelled with training items the retrieval tables were fitted on (an optimism that can
    teach the ranker the wrong weights), so validation decides whether they help."""
    options = {"without": warm} | ({"with": warm + simulated_cold} if simulated_cold else {})
    fitted = {
        k: train_ranker(v, select_warm, seed=seed, select_cold=select_cold)
        for k, v in options.items()
    }
    score = {k: info["selection_ndcg@10"] for k, (_, info) in fitted.items()}
    chosen = max(score, key=lambda k: (score[k], k == "without"))
    model, info = fitted[chosen]
    info["simulated_cold"] = {
        "used": chosen == "with",
        "selection_ndcg@10": score,
        "examples": len(simulated_cold),
    }
    return model, info


def warm_folds(sets: dict[str, list[CandidateSet]], folds: int) -> list[list[CandidateSet]]:
    """The warm validation users' sets cut into ``folds`` contiguous parts (at most one per
    user) of the selection half followed by the training half (both halves random): with 2
    folds, the two halves."""
    warm = sets["select_warm"] + sets["train_warm"]
    folds = min(folds, len(warm))
    if folds < 2:
        raise ValueError(f"cross-fitting needs 2 folds of warm validation users, {len(warm)} given")
    return [warm[f * len(warm) // folds : (f + 1) * len(warm) // folds] for f in range(folds)]


def cross_fit(
    sets: dict[str, list[CandidateSet]], seed: int, folds: int = FOLDS
) -> tuple[CrossFitted, dict[str, Any], HeldOut]:
    """One member per fold of the warm validation users (:func:`warm_folds`), trained on the
    other folds' users (their warm and recent-item examples; simulated cold users outside the
    fold, where validation prefers them) with its epoch chosen on its fold and the cold
    selection users; the ranker is their mean. `validation` is out of fold: every warm user
    ordered by the member that did not train on it. Also returns each member with its fold."""
    parts = warm_folds(sets, folds)
    recent = sets["train_recent"] + sets["select_recent"]
    members, infos, held_out, scores = [], [], [], []
    for i, select in enumerate(parts):
        left_out = {s.user for s in select}
        train = [
            s for s in sets["select_warm"] + sets["train_warm"] + recent if s.user not in left_out
        ]
        cold = [s for s in sets["train_cold"] if s.user not in left_out]
        model, info = _with_or_without_cold(train, select, cold, sets["select_cold"], seed + i)
        members.append(model)
        infos.append(info)
        held_out.append((model, select))
        scores.append(evaluate_orders(model, select))
    users = sum(v["users"] for v in scores)
    validation = {
        k: sum(v[k] * v["users"] for v in scores) / max(1, users)
        for k in ("retrieval", "dot", "learned", "candidate_recall")
    } | {"users": users}
    info = {
        # the mean of the members' selection scores (warm held-out fold and cold users)
        "selection_ndcg@10": sum(i["selection_ndcg@10"] for i in infos) / len(infos),
        "validation": validation,
        "folds": len(parts),
        "members": infos,
    }
    return CrossFitted(members).eval(), info, held_out


def export_ranker(module: nn.Module, path: Path, seed: int) -> float:
    """Export the ranker (a FeatureRanker, a CrossFitted mean of them, or either mixed with the
    dot product by WithDot) to ONNX (features [N, F] -> score [N]) and check it against
    torch."""
    from training.export_onnx import _export, check_graph

    rng = np.random.default_rng(seed)
    inner = module.ranker if isinstance(module, WithDot) else module
    first = inner.members[0] if isinstance(inner, CrossFitted) else inner
    assert isinstance(first, FeatureRanker)
    mean, scale = first.mean.numpy(), first.scale.numpy()
    sample = (mean + scale * rng.standard_normal((257, len(mean)))).astype(np.float32)
    _export(module, (torch.from_numpy(sample[:3]),), ["features"], ["score"], path)
    return check_graph(path, module, {"features": sample})


def int8_ranker(
    module: nn.Module, calibration: list[CandidateSet], folder: Path, seed: int
) -> tuple[Path, Path, str]:
    """The ranker's fp32 graph and its int8 graph (training/quantize.py: static, calibrated on
    the feature rows of `calibration`, at most 16 batches of 1,000 rows) in `folder`."""
    from training.quantize import CALIBRATION_BATCH, CALIBRATION_BATCHES, quantise

    fp32, int8 = folder / "ranker.onnx", folder / "ranker.int8.onnx"
    export_ranker(module, fp32, seed)
    rows = np.concatenate([s.features for s in calibration])
    rng = np.random.default_rng(seed)
    batches = [
        (rows[rng.integers(0, len(rows), min(CALIBRATION_BATCH, len(rows)))],)
        for _ in range(CALIBRATION_BATCHES)
    ]
    method = quantise(fp32, int8, ["features"], batches)
    return fp32, int8, method


def compare_precisions(fp32: Path, int8: Path, sets: list[CandidateSet]) -> dict[str, float]:
    """NDCG@10 of the fp32 and the int8 graph on the same labelled candidate sets, and how
    alike they rank (Spearman's rho and the top-10 agreement per user, means)."""
    import onnxruntime as ort

    from training.quantize import spearman, top_k_agreement

    sessions = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32, int8)
    ]
    out = {"fp32_ndcg@10": 0.0, "int8_ndcg@10": 0.0, "spearman_mean": 0.0, "top10_agreement": 0.0}
    for s in sets:
        a, b = (np.asarray(x.run(None, {"features": s.features})[0], np.float64) for x in sessions)
        out["fp32_ndcg@10"] += ndcg_at(a, s.labels, s.n_relevant)
        out["int8_ndcg@10"] += ndcg_at(b, s.labels, s.n_relevant)
        out["spearman_mean"] += float(spearman(a[None], b[None])[0])
        out["top10_agreement"] += float(top_k_agreement(a[None], b[None])[0])
    return {k: v / max(1, len(sets)) for k, v in out.items()} | {"users": len(sets)}


def int8_report(run_dir: Path, seed: int) -> dict[str, Any]:
    """int8 beside fp32 for a finished run (its checkpoint and split): the learned ranker
    quantised with calibration on its training examples' features, both graphs' NDCG@10 on the
    warm and the cold selection users (the examples are rebuilt as training built them)."""
    from training.data.splits import Split

    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    config = checkpoint["config"]
    shares = config.get("cold_shares") or [0.0]
    split = Split.load(run_dir / f"split-cold{shares[0]}")
    users_index = {u: i for i, u in enumerate(split.users)}
    rows = np.fromiter((users_index[u] for u in checkpoint["users"]), np.int64)
    published = published_arrays(checkpoint, checkpoint["neighbours"], rows)
    sets = ranker_examples(
        split,
        published,
        depth=config["ranker_depth"],
        popular=config["ranker_popular"],
        max_users=config["ranker_users"],
        seed=seed,
        cold_share=config.get("ranker_cold_share", 1.0),
        recent_share=config.get("ranker_recent_share", 0.5),
    )
    module = checkpoint["learned_ranker"]["module"].eval()
    with tempfile.TemporaryDirectory() as tmp:
        train = sets["train_warm"] + sets["train_recent"] + sets["train_cold"]
        fp32, int8, method = int8_ranker(module, train, Path(tmp), seed)
        return {
            "method": method,
            "warm": compare_precisions(fp32, int8, sets["select_warm"]),
            "cold": compare_precisions(fp32, int8, sets["select_cold"]),
            "bytes": {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size},
        }


def stage_learned_ranker(
    pub: Any,
    name: str,
    retrieval_name: str,
    learned: dict[str, Any],
    base_meta: dict[str, Any],
    seed: int,
) -> Path:
    """Export, check and stage `name` as a feature ranker expecting `retrieval_name`'s features
    of the same publish (the publisher fills in the version)."""
    from recsys.repository import MODEL_FILE, feature_ranker_signature

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ranker.onnx"
        err = export_ranker(learned["module"], path, seed)
        d = pub.describe(
            name,
            kind="ranker",
            signature=feature_ranker_signature(len(FEATURE_NAMES)),
            metadata=base_meta
            | {
                "ranker": "learned",
                "features": {"names": list(FEATURE_NAMES), "retrieval_model": retrieval_name},
                "training": learned["info"],
                "export_check": {"max_relative_error": err},
            },
        )
        (d / MODEL_FILE).write_bytes(path.read_bytes())
    return Path(d)
