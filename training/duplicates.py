"""Items listed in both domains: target items whose set of users is identical or nearly identical
(Jaccard similarity at or above a threshold) to that of a source item.

Such pairs are almost certainly the same product listed twice, and a cross-domain model (or a
cross-domain item-item baseline) that finds them gains for a reason that is not transfer of
taste. Detection runs on the positives of both domains before the split (a property of the
catalogue, like de-duplication of rows); the pipeline reports every row with and without test
pairs on such items; ``duplicates = "drop"`` removes them from the target domain, and
``duplicates = "merge"`` keeps each such product once, as its target item (the source copy's rows
move to it).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from training.data.dataset import TRAIN, Dataset, DomainData, joint_codes

logger = logging.getLogger(__name__)


@dataclass
class Duplicates:
    """Target items that duplicate a source item, with the counts behind the decision."""

    target_items: list[str]  # raw ids of duplicated target items
    source_match: dict[str, str]  # target item -> the source item it duplicates (best Jaccard)
    identical: int  # of which the user sets are identical
    target_positives: int
    positives_on_duplicates: int

    def summary(self) -> dict[str, float | int]:
        return {
            "duplicated_target_items": len(self.target_items),
            "identical_user_sets": self.identical,
            "share_of_target_positives": self.positives_on_duplicates
            / max(1, self.target_positives),
        }


def _matrix(user_codes: np.ndarray, domain: DomainData, n_users: int) -> sp.csr_matrix:
    """The binary [users, items] matrix of a domain, columns in the order of its item vocabulary."""
    m = sp.csr_matrix(
        (np.ones(len(domain), dtype=np.float32), (user_codes, domain.item_codes)),
        shape=(n_users, len(domain.item_vocab)),
    )
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def find_duplicates(
    target: DomainData, source: DomainData, jaccard: float = 0.8, min_users: int = 2
) -> Duplicates:
    """Target items with at least ``min_users`` users whose user set has Jaccard similarity
    ``>= jaccard`` with some source item's (1.0: identical sets only)."""
    vocab, (tu, su) = joint_codes(
        [(target.user_codes, target.user_vocab), (source.user_codes, source.user_vocab)]
    )
    xt, xs = _matrix(tu, target, len(vocab)), _matrix(su, source, len(vocab))
    t_items, s_items = target.item_vocab.to_pylist(), source.item_vocab.to_pylist()
    nt = np.asarray(xt.sum(0)).ravel()
    ns = np.asarray(xs.sum(0)).ravel()
    inter = (xs.T @ xt).tocoo()  # [source items, target items] shared users
    union = ns[inter.row] + nt[inter.col] - inter.data
    jac = inter.data / union
    ok = (jac >= jaccard - 1e-9) & (nt[inter.col] >= min_users)
    best: dict[int, tuple[float, int]] = {}
    for s_i, t_i, j in zip(inter.row[ok], inter.col[ok], jac[ok], strict=True):
        if t_i not in best or j > best[t_i][0]:
            best[int(t_i)] = (float(j), int(s_i))
    dup = sorted(best)
    counts = nt
    out = Duplicates(
        target_items=[str(t_items[t]) for t in dup],
        source_match={str(t_items[t]): str(s_items[best[t][1]]) for t in dup},
        identical=sum(1 for t in dup if best[t][0] >= 1.0 - 1e-9),
        target_positives=int(counts.sum()),
        positives_on_duplicates=int(counts[dup].sum()) if dup else 0,
    )
    logger.info("cross-domain duplicates: %s", out.summary())
    return out


def drop_items(dataset: Dataset, domain: str, items: list[str]) -> Dataset:
    """The data set with ``items`` removed from ``domain``."""
    d = dataset.domains[domain]
    found = pc.index_in(pa.array(items, pa.string()), value_set=d.item_vocab)
    codes = found.drop_null().to_numpy().astype(np.int32)
    keep = ~np.isin(d.item_codes, codes)
    new = d.take(keep, duplicate_item_rows_dropped=int((~keep).sum()))
    return dataclasses.replace(dataset, domains={**dataset.domains, domain: new})


def merge_items(dataset: Dataset, target: str, source: str, dups: Duplicates) -> Dataset:
    """The data set with each duplicated product kept once, as its target item.

    The source copy of every pair in ``dups.source_match`` leaves the source domain; its rows of
    users who do not already have the target copy become rows of the target item (rating and
    timestamp kept; marked as training rows where the data fixes the split). The product then has
    one id, in the domain that is recommended, and the source no longer holds a second listing of
    a target test item.
    """
    tgt, src = dataset.domains[target], dataset.domains[source]
    match = {s: t for t, s in dups.source_match.items()}
    s_items = src.items.astype(str)
    on_copy = np.isin(s_items, np.asarray(list(match), dtype=str))
    have = set(zip(tgt.users.tolist(), tgt.items.tolist(), strict=True))
    moved_items = np.array([match[i] for i in s_items[on_copy]], dtype=object)
    moved_users = src.users[on_copy]
    new = np.fromiter(
        ((u, i) not in have for u, i in zip(moved_users, moved_items, strict=True)),
        bool,
        len(moved_items),
    )

    def joined(a_t: np.ndarray | None, a_s: np.ndarray | None, fill: Any) -> np.ndarray | None:
        if a_t is None:
            return None
        extra = a_s[on_copy][new] if a_s is not None else np.full(int(new.sum()), fill)
        return np.concatenate([a_t, extra.astype(a_t.dtype)])

    merged_target = DomainData(
        tgt.name,
        users=np.concatenate([tgt.users, moved_users[new]]),
        items=np.concatenate([tgt.items, moved_items[new]]),
        ratings=joined(tgt.ratings, src.ratings, np.float32(np.nan)),
        timestamps=joined(tgt.timestamps, src.timestamps, 0),
        given_split=joined(tgt.given_split, None, TRAIN),
        titles=tgt.titles,
        stats=dict(tgt.stats, duplicate_rows_merged_in=int(new.sum())),
    )
    merged_source = src.take(~on_copy, duplicate_item_rows_merged_out=int(on_copy.sum()))
    logger.info(
        "merged %d duplicated products: %d source rows removed, %d moved to the target",
        len(match),
        int(on_copy.sum()),
        int(new.sum()),
    )
    return dataclasses.replace(
        dataset, domains={**dataset.domains, target: merged_target, source: merged_source}
    )
