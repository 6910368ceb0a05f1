"""Evaluation protocols: how a data set becomes index arrays for training, validation and test.

Protocols (every one driven by a fixed seed, and saved with the run):

* ``ratio``: RecBole's. Positives are ratings at or above a threshold, optional k-core, a random
  8:1:1 split of each user's target interactions, full ranking over every item the user has not
  seen in training.
* ``loo``: leave-one-out against ``n_negatives`` sampled items. The test item is the one the data
  set gives (DisenCDR's ``test.txt``) or one drawn at random; a validation item is drawn from the
  rest.

On top of either, ``cold_share`` of the users present in both domains lose all their target
interactions from training and are tested on them (cold-start users). A further quarter as many
overlapping users (at least one) lose theirs too and become cold-start *validation* users
(``cold_valid``: all their target pairs), so that what serves users without target history is
chosen on validation users in the same situation, never on test.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.data.dataset import (
    TEST,
    TRAIN,
    VALID,
    Dataset,
    DomainData,
    compact,
    joint_codes,
    stable_argsort,
)
from training.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

COLD_VALID = -2  # part code of the target pairs of cold-start validation users


@dataclass
class Split:
    """Index arrays of one run. User indices are global (shared by both domains)."""

    protocol: str
    users: list[str]
    target_items: list[str]
    source_items: list[str]
    train: np.ndarray  # [n, 2] (user, item) target-domain training pairs
    valid: np.ndarray  # [n, 2]
    test: np.ndarray  # [n, 2]
    source_train: np.ndarray  # [n, 2] source-domain pairs for pretraining
    source_valid: np.ndarray  # [n, 2]
    cold_users: np.ndarray  # user indices whose target interactions were all moved to test
    negatives: np.ndarray | None = None  # [n_test, n_neg] sampled items (loo protocol)
    cold_valid: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    target_titles: list[str | None] = field(default_factory=list)
    source_users: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_target_items(self) -> int:
        return len(self.target_items)

    @property
    def n_source_items(self) -> int:
        return len(self.source_items)

    def target_train_users(self) -> np.ndarray:
        return np.unique(self.train[:, 0])

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {
            "train": self.train,
            "valid": self.valid,
            "test": self.test,
            "source_train": self.source_train,
            "source_valid": self.source_valid,
            "cold_users": self.cold_users,
            "source_users": self.source_users,
            "cold_valid": self.cold_valid,
        }
        if self.negatives is not None:
            arrays["negatives"] = self.negatives
        np.savez_compressed(folder / "split.npz", **arrays)  # type: ignore[arg-type]
        (folder / "split_vocab.json").write_text(
            json.dumps(
                {
                    "protocol": self.protocol,
                    "users": self.users,
                    "target_items": self.target_items,
                    "source_items": self.source_items,
                    "target_titles": self.target_titles,
                }
            )
        )

    @classmethod
    def load(cls, folder: Path) -> Split:
        vocab = json.loads((folder / "split_vocab.json").read_text())
        z = np.load(folder / "split.npz")
        return cls(
            protocol=vocab["protocol"],
            users=vocab["users"],
            target_items=vocab["target_items"],
            source_items=vocab["source_items"],
            target_titles=vocab["target_titles"],
            train=z["train"],
            valid=z["valid"],
            test=z["test"],
            source_train=z["source_train"],
            source_valid=z["source_valid"],
            cold_users=z["cold_users"],
            source_users=z["source_users"],
            negatives=z["negatives"] if "negatives" in z.files else None,
            cold_valid=z["cold_valid"] if "cold_valid" in z.files else np.zeros((0, 2), np.int64),
        )


def kcore(domain: DomainData, k: int) -> DomainData:
    """Iteratively drop users and items with fewer than ``k`` interactions (over the codes)."""
    if k <= 1:
        return domain
    keep = np.ones(len(domain), dtype=bool)
    nu, ni = len(domain.user_vocab), len(domain.item_vocab)
    while True:
        u, i = domain.user_codes[keep], domain.item_codes[keep]
        ucnt = np.bincount(u, minlength=nu)
        icnt = np.bincount(i, minlength=ni)
        ok = (ucnt[u] >= k) & (icnt[i] >= k)
        if ok.all():
            break
        idx = np.flatnonzero(keep)
        keep[idx[~ok]] = False
    return domain.take(keep, kcore_kept=int(keep.sum()))


def _ratio_counts_many(
    tot: np.ndarray, ratios: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_ratio_counts`` of every group size in ``tot`` at once."""
    tot = np.asarray(tot, dtype=np.int64)
    cnt = [(r * tot.astype(np.float64)).astype(np.int64) for r in ratios]
    cnt[0] = tot - cnt[1] - cnt[2]
    active = np.ones(tot.shape, dtype=bool)
    for i in range(1, len(ratios)):
        active &= cnt[0] > 1
        share = ratios[-i] * tot
        bump = active & (share > 0) & (share < 1)
        cnt[-i] = cnt[-i] + bump
        cnt[0] = cnt[0] - bump
    return cnt[0], cnt[1], cnt[2]


def _ratio_counts(tot: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """RecBole's ``_calcu_split_ids``: sizes of the train/valid/test parts of ``tot`` rows."""
    a, b, c = _ratio_counts_many(np.array([tot]), ratios)
    return int(a[0]), int(b[0]), int(c[0])


@dataclass
class _Groups:
    """Rows grouped by user in a random order within each user: ``order`` lists the row indices,
    ``sizes`` the size of every group (user), ``rank`` every row's position in its group (in the
    order of ``order``)."""

    order: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray
    rank: np.ndarray

    def per_row(self, values: np.ndarray) -> np.ndarray:
        """A value per group, repeated for each of the group's rows (in the order of ``order``)."""
        return np.repeat(values, self.sizes)

    def rank_among(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For rows in ``order`` where ``mask`` holds: their rank among such rows of their group
        (per row), and how many such rows each group has (per group)."""
        m = mask.astype(np.int32)
        csum = np.cumsum(m, dtype=np.int64)
        before = (csum - m)[self.starts]
        counts = np.add.reduceat(m, self.starts) if m.size else m
        return (csum - m - self.per_row(before)).astype(np.int32), counts


def _groups(user_idx: np.ndarray, rng: np.random.Generator) -> _Groups:
    # users in order, a random order within each user: np.lexsort((random, user)), computed as
    # a sort of the random keys and a stable radix sort by user
    order = stable_argsort(user_idx, np.argsort(rng.random(user_idx.size)))
    su = user_idx[order]
    starts = np.flatnonzero(np.r_[True, su[1:] != su[:-1]]) if su.size else np.zeros(0, np.int64)
    del su
    sizes = np.diff(np.r_[starts, order.size]).astype(np.int32)
    rank = np.arange(order.size, dtype=np.int32) - np.repeat(starts.astype(np.int32), sizes)
    return _Groups(order, starts, sizes, rank)


def _target_parts(
    t_u: np.ndarray,
    given: np.ndarray | None,
    protocol: str,
    ratios: tuple[float, float, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """TRAIN / VALID / TEST of every target interaction: per user by `ratios` (or the data set's
    own split), or leave-one-out (the first shuffled row tests, the next validates). Vectorised
    over every user at once."""
    part = np.full(len(t_u), TRAIN, dtype=np.int8)
    if protocol == "ratio" and given is not None and (given == VALID).any():
        return given.copy()
    g = _groups(t_u, rng)
    out = np.full(len(t_u), TRAIN, dtype=np.int8)  # in the order of g.order
    if protocol == "ratio":
        if given is not None:  # a given test set: keep it, split the rest into train/valid
            is_test = given[g.order] == TEST
            rank, count = g.rank_among(~is_test)
            n_tr, _, _ = _ratio_counts_many(count, (0.9, 0.1, 0.0))
            out[~is_test & (rank >= g.per_row(n_tr))] = VALID
            out[is_test] = TEST
        else:
            n_tr, n_va, _ = _ratio_counts_many(g.sizes, ratios)
            row_tr, row_te = (
                g.per_row(n_tr.astype(np.int32)),
                g.per_row((n_tr + n_va).astype(np.int32)),
            )
            out[(g.rank >= row_tr) & (g.rank < row_te)] = VALID
            out[g.rank >= row_te] = TEST
    elif given is not None:  # loo with the data set's test items
        is_test = given[g.order] == TEST
        rank, count = g.rank_among(~is_test)
        out[is_test] = TEST
        out[~is_test & (rank == 0) & g.per_row(count >= 3)] = VALID
    else:  # loo: the first shuffled row tests (2+ rows), the next validates (3+ rows left)
        out[(g.rank == 0) & g.per_row(g.sizes >= 2)] = TEST
        out[(g.rank == 1) & g.per_row(g.sizes >= 4)] = VALID
    part[g.order] = out
    return part


def _mark_cold(
    part: np.ndarray,
    t_u: np.ndarray,
    source_users: np.ndarray,
    cold_share: float,
    protocol: str,
    rng: np.random.Generator,
    *,
    has_source: bool,
) -> np.ndarray:
    """Turn a share of the test users who also have source interactions into cold-start users
    (no target training data; tested on every target interaction under `ratio`), and a quarter
    as many other overlapping users into cold-start validation users. Returns the cold users."""
    if cold_share <= 0:
        return np.zeros(0, dtype=np.int64)
    if not has_source:
        raise ConfigError("cold_share > 0 needs a source domain")
    overlap = np.intersect1d(source_users, np.unique(t_u[part == TEST]))
    n_cold = int(round(cold_share * overlap.size))
    cold = np.sort(rng.choice(overlap, size=n_cold, replace=False))
    is_cold = np.isin(t_u, cold)
    if protocol == "ratio":
        part[is_cold] = TEST  # tested on all their target interactions
    else:
        part[is_cold & (part != TEST)] = -1  # removed from training; keep their test item
    rest = np.setdiff1d(np.intersect1d(source_users, np.unique(t_u)), cold)
    n_cv = min(rest.size, max(1, int(round(0.25 * n_cold)))) if n_cold else 0
    cold_valid_users = rng.choice(rest, size=n_cv, replace=False)
    part[np.isin(t_u, cold_valid_users)] = COLD_VALID
    return cold


def _source_split(
    src_items: np.ndarray, s_u: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A 9:1 per-user train/validation split of the source domain for early stopping of
    pretraining (its own generator: independent of the target split and the cold share)."""
    g = _groups(s_u, np.random.default_rng(seed + 1))
    n_tr, _, _ = _ratio_counts_many(g.sizes, (0.9, 0.1, 0.0))
    s_part = np.zeros(len(s_u), dtype=np.int8)
    s_part[g.order[g.rank >= g.per_row(n_tr.astype(np.int32))]] = VALID
    del g
    s_train = np.stack([s_u[s_part == TRAIN], src_items[s_part == TRAIN]], 1).astype(np.int64)
    s_valid = np.stack([s_u[s_part == VALID], src_items[s_part == VALID]], 1).astype(np.int64)
    return s_train, s_valid


def make_split(
    dataset: Dataset,
    target: str,
    source: str | None,
    protocol: str = "ratio",
    rating_threshold: float | None = None,
    k_core: int = 0,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    cold_share: float = 0.0,
    n_negatives: int = 999,
    use_given_split: bool = True,
    seed: int = 0,
) -> Split:
    """Build the split of one run (target domain, optional source domain)."""
    if protocol not in ("ratio", "loo"):
        raise ConfigError(f"protocol: expected 'ratio' or 'loo', got {protocol!r}")
    if not 0.0 <= cold_share < 1.0:
        raise ConfigError(f"cold_share: expected a share in [0, 1), got {cold_share}")
    rng = np.random.default_rng(seed)
    tgt = kcore(dataset.domain(target).positives(rating_threshold), k_core)
    src = dataset.domain(source).positives(rating_threshold) if source else None
    if len(tgt) == 0:
        raise DataError(f"{dataset.path}: domain {target!r} has no positive interactions")

    # ids are mapped to codes once: one sorted user vocabulary over both domains, the items of
    # each domain that remain (sorted), every interaction as (user code, item code)
    coded = [(tgt.user_codes, tgt.user_vocab)]
    if src is not None:
        coded.append((src.user_codes, src.user_vocab))
    user_vocab, user_codes = joint_codes(coded)
    users = user_vocab.to_pylist()
    t_u = user_codes[0].astype(np.int64)
    t_items, t_vocab = compact(tgt.item_codes, tgt.item_vocab)
    t_i = t_items.astype(np.int64)
    titems = t_vocab.to_pylist()
    part = _target_parts(t_u, tgt.given_split if use_given_split else None, protocol, ratios, rng)
    source_users = np.zeros(0, dtype=np.int64)
    if src is not None:
        source_users = np.flatnonzero(np.bincount(user_codes[1], minlength=len(users)) > 0)
    cold = _mark_cold(
        part, t_u, source_users, cold_share, protocol, rng, has_source=src is not None
    )

    def pairs(mask: np.ndarray) -> np.ndarray:
        return np.stack([t_u[mask], t_i[mask]], axis=1).astype(np.int64)

    train, valid, test = pairs(part == TRAIN), pairs(part == VALID), pairs(part == TEST)
    cold_valid = pairs(part == COLD_VALID)

    negatives = None
    if protocol == "loo":
        negatives = _sample_negatives(t_u, t_i, test, len(titems), n_negatives, rng)

    sitems: list[str] = []
    s_train = s_valid = np.zeros((0, 2), dtype=np.int64)
    if src is not None:
        s_items, s_vocab = compact(src.item_codes, src.item_vocab)
        sitems = s_vocab.to_pylist()
        s_train, s_valid = _source_split(s_items, user_codes[1], seed)

    split = Split(
        protocol=protocol,
        users=users,
        target_items=titems,
        source_items=sitems,
        train=train,
        valid=valid,
        test=test,
        source_train=s_train.astype(np.int64),
        source_valid=s_valid.astype(np.int64),
        cold_users=cold,
        negatives=negatives,
        target_titles=[tgt.titles.get(it) for it in titems],
        source_users=source_users,
        cold_valid=cold_valid,
    )
    logger.info(
        "split %s/%s<-%s: users %d, target items %d, train %d, valid %d, test %d, cold users %d",
        protocol,
        target,
        source,
        split.n_users,
        split.n_target_items,
        len(train),
        len(valid),
        len(test),
        cold.size,
    )
    return split


def check_split(split: Split, target: str, source: str | None) -> None:
    """Refuse a split that cannot give a meaningful model; say loudly when transfer cannot work.

    A target domain needs at least two users, and the split needs validation pairs (to choose the
    epoch and the exported strategy) and test pairs (to report metrics: with none they are NaN).
    A source domain sharing no user with the target cannot transfer anything: every strategy and
    the EMCDR mapping go through the users both domains share.
    """
    all_pairs = np.concatenate([split.train, split.valid, split.test])
    target_users = np.unique(all_pairs[:, 0])
    if target_users.size < 2:
        raise DataError(
            f"domain {target!r}: {target_users.size} user(s) with positive interactions; a model "
            "needs at least 2"
        )
    for part, pairs in (("validation", split.valid), ("test", split.test)):
        if len(pairs) == 0:
            raise DataError(
                f"domain {target!r}: the {split.protocol} split leaves no {part} users (too few "
                "interactions per user); nothing can be chosen or measured"
            )
    if source is None:
        return
    shared = np.intersect1d(split.source_users, target_users)
    if shared.size == 0:
        message = (
            f"TRANSFER IMPOSSIBLE: source domain {source!r} and target domain {target!r} share no "
            f"user ({split.source_users.size} source users, {target_users.size} target users); "
            "every transfer strategy goes through shared users. Train the target alone with "
            '--source= (or source = "" in the config)'
        )
        logger.warning("%s", message)
        raise DataError(message)
    if shared.size < 10:
        logger.warning(
            "source domain %r and target domain %r share only %d users: transfer can do little",
            source,
            target,
            shared.size,
        )


def _sample_negatives(
    t_u: np.ndarray,
    t_i: np.ndarray,
    test: np.ndarray,
    n_items: int,
    n_neg: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """For each test pair, ``n_neg`` items the user never interacted with.

    Drawn without replacement, except for a user with fewer than ``n_neg`` unseen items, whose
    negatives repeat.
    """
    if n_neg >= n_items:
        raise ConfigError(f"n_negatives={n_neg} must be below the number of items ({n_items})")
    order = np.argsort(t_u, kind="stable")
    su, si = t_u[order], t_i[order]
    out = np.empty((len(test), n_neg), dtype=np.int64)
    for row, (u, _) in enumerate(test):
        a, b = np.searchsorted(su, [u, u + 1])
        seen = set(si[a:b].tolist())
        if n_items - len(seen) < 2 * n_neg:  # few unseen items: draw from them directly
            unseen = np.setdiff1d(np.arange(n_items), si[a:b])
            if unseen.size == 0:
                raise DataError(f"user index {u} has interacted with every item; no negatives")
            out[row] = rng.choice(unseen, n_neg, replace=unseen.size < n_neg)
            continue
        chosen: list[int] = []
        while len(chosen) < n_neg:
            cand = rng.integers(0, n_items, size=2 * n_neg)
            for c in cand.tolist():
                if c not in seen:
                    seen.add(c)
                    chosen.append(c)
                    if len(chosen) == n_neg:
                        break
        out[row] = chosen
    return out
