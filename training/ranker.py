"""The second stage: cross-domain item-to-item neighbour lists for retrieval, and a learned ranker
(a small MLP over the request-time features of recsys.features) trained on the candidates that
the served retrieval generates, with its ONNX export and parity check.

Labels come from the validation interactions of warm users, which the retrieval model was not
fitted on (its own training items would carry inflated scores): half of those users train the
ranker, the other half choose its epoch and report (a) retrieval order, (b) the dot product and
(c) the ranker on the same candidates. A share of those users is also presented as if cold-start
(source history only), since real cold-start users have no validation items. The test split is
never read here.
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
    n_relevant: int  # the user's held-out items (in or out of the candidates)


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
    personal = sources.generate(state, depth, set(PERSONAL_SOURCES), excluded).candidates
    lists = [personal]
    if popular > 0:
        lists.append(sources.generate(state, popular, {Source.POPULAR}, excluded).candidates)
    merged = merge_candidates(lists)
    labels = np.fromiter((c.item_id in relevant for c in merged), bool, len(merged))
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


def evaluate_orders(model: FeatureRanker | None, sets: list[CandidateSet]) -> dict[str, float]:
    """Mean NDCG@10 of (a) retrieval order, (b) the dot product, (c) the ranker."""
    out = {"retrieval": 0.0, "dot": 0.0, "learned": 0.0, "candidate_recall": 0.0}
    if not sets:
        return out
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
) -> tuple[FeatureRanker, dict[str, Any]]:
    """Listwise softmax over each user's candidates (users with a held-out item among them),
    the epoch chosen on the selection users' NDCG@10."""
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
        history.append({"epoch": epoch, "loss": total / len(usable), "valid_ndcg@10": valid})
        if valid > best[0]:
            best = (valid, epoch, {k: v.clone() for k, v in model.state_dict().items()})
        elif epoch - best[1] >= patience:
            break
    model.load_state_dict(best[2])
    model.eval()
    info = {
        "best_epoch": best[1],
        "epochs_run": len(history),
        "train_users": len(usable),
        "history": history,
    }
    return model, info


def fit_second_stage(
    split: Any,
    checkpoint: dict[str, Any],
    *,
    depth: int,
    popular: int,
    max_users: int,
    n_neighbours: int,
    seed: int,
    cold_share: float = 0.3,
) -> dict[str, Any]:
    """Neighbour lists over the published users, candidates for warm validation users, the
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
    item_table = checkpoint["item_table"].detach().float().numpy()
    user_table = checkpoint["user_table"].detach().float().numpy()
    popularity = np.asarray(checkpoint["popularity"], np.float32)
    sources = CandidateSources(
        item_ids=checkpoint["items"],
        titles=[t or "" for t in checkpoint["titles"]],
        item_embeddings=item_table,
        popularity=popularity,
        neighbours=neighbours,
        search=exact_search(item_table),
    )
    indptr, indices = checkpoint["seen"]
    published_row = {int(r): i for i, r in enumerate(rows)}
    valid_by_user: dict[int, set[str]] = {}
    for u, j in split.valid:
        valid_by_user.setdefault(int(u), set()).add(checkpoint["items"][int(j)])
    warm = [
        u
        for u in sorted(valid_by_user)
        if u in published_row and checkpoint["user_kinds"][published_row[u]] == "target"
    ]
    rng = np.random.default_rng(seed)
    if len(warm) > max_users:
        warm = sorted(rng.choice(warm, max_users, replace=False).tolist())
    sets: list[CandidateSet] = []
    simulated: dict[int, CandidateSet] = {}
    for u in warm:
        r = published_row[u]
        seen = indices[indptr[r] : indptr[r + 1]]
        source_rows = neighbours.source_rows(r)
        state = UserState(
            row=r,
            mapped=False,
            vector=user_table[r],
            personal=Source.ANN,
            target_rows=seen,
            source_rows=source_rows,
            recent_rows=np.zeros(0, np.int64),
        )
        context = UserContext(
            known=True, mapped=False, target_history=len(seen), source_history=len(source_rows)
        )
        excluded = {int(j) for j in seen}
        sets.append(
            user_candidates(sources, state, context, depth, popular, excluded, valid_by_user[u])
        )
        # Cold-start users (source history only) never have validation items: a share of the
        # warm users is also presented as if cold (no target history, mapped, item-to-item votes
        # of source items only), so that the ranker sees that regime. Their vector is still
        # their target-trained one, better than a mapped one: a known optimism.
        if len(source_rows) and rng.random() < cold_share:
            as_cold = UserState(
                row=r,
                mapped=True,
                vector=user_table[r],
                personal=Source.TRANSFER,
                target_rows=np.zeros(0, np.int64),
                source_rows=source_rows,
                recent_rows=np.zeros(0, np.int64),
            )
            context = UserContext(known=True, mapped=True, source_history=len(source_rows))
            simulated[len(sets) - 1] = user_candidates(
                sources, as_cold, context, depth, popular, excluded, valid_by_user[u]
            )
    perm = rng.permutation(len(sets))
    half = len(sets) // 2
    train_sets = [sets[i] for i in perm[:half]] + [
        simulated[i] for i in perm[:half] if i in simulated
    ]
    select_sets = [sets[i] for i in perm[half:]]
    select_cold = [simulated[i] for i in perm[half:] if i in simulated]
    model, info = train_ranker(train_sets, select_sets + select_cold, seed=seed)
    info["validation"] = evaluate_orders(model, select_sets)
    info["validation_simulated_cold"] = evaluate_orders(model, select_cold)
    info["depth"] = {"retrieval_candidates": depth, "popular_candidates": popular}
    logger.info(
        "ranker: validation NDCG@10 retrieval order %.4f, dot product %.4f, learned %.4f "
        "(candidate recall %.3f, %d users)",
        info["validation"]["retrieval"],
        info["validation"]["dot"],
        info["validation"]["learned"],
        info["validation"]["candidate_recall"],
        len(select_sets),
    )
    return {"neighbours": neighbours, "learned_ranker": {"module": model, "info": info}}


def export_ranker(module: FeatureRanker, path: Path, seed: int) -> float:
    """Export the ranker to ONNX (features [N, F] -> score [N]) and check it against torch."""
    from training.export_onnx import _export, check_graph

    rng = np.random.default_rng(seed)
    mean, scale = module.mean.numpy(), module.scale.numpy()
    sample = (mean + scale * rng.standard_normal((257, len(mean)))).astype(np.float32)
    _export(module, (torch.from_numpy(sample[:3]),), ["features"], ["score"], path)
    return check_graph(path, module, {"features": sample})


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
