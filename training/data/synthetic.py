"""Deterministic synthetic cross-domain data with planted shared user tastes: in memory for fast
tests (``make_synthetic``), or written to Parquet in chunks at any size (``write_synthetic``, and
``python -m training.data.synthetic``).

Every user has a taste: a distribution over ``n_topics`` topics that is the same in both domains.
Every item of each domain belongs to one topic. A user's interactions in a domain are items drawn
from their preferred topics, so what a model learns about a user in the source domain tells it
which target items the user will pick. The target domain is thin (fewer interactions per user).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from training.data.dataset import Dataset, DomainData, deduplicate
from training.errors import DataError

logger = logging.getLogger(__name__)


def _zipf_weights(n: int, alpha: float = 1.0) -> np.ndarray:
    """Power-law weights ``1 / rank ** alpha`` of ``n`` items by rank (unnormalised)."""
    return 1.0 / np.arange(1, n + 1) ** alpha


def _domain(
    name: str,
    rng: np.random.Generator,
    tastes: np.ndarray,
    users: np.ndarray,
    n_items: int,
    per_user: int,
) -> DomainData:
    n_topics = tastes.shape[1]
    topic_of = np.arange(n_items) % n_topics
    rng.shuffle(topic_of)
    by_topic = [np.flatnonzero(topic_of == t) for t in range(n_topics)]
    # within a topic, a skewed item popularity
    u_out: list[str] = []
    i_out: list[str] = []
    for u in users:
        topics = rng.choice(n_topics, size=per_user, p=tastes[u])
        for t in topics:
            pool = by_topic[t]
            w = _zipf_weights(pool.size)
            i_out.append(f"{name[0]}{pool[rng.choice(pool.size, p=w / w.sum())]}")
            u_out.append(f"u{u}")
    titles = {f"{name[0]}{i}": f"{name} item {i} (topic {topic_of[i]})" for i in range(n_items)}
    return deduplicate(
        DomainData(
            name=name,
            users=np.asarray(u_out),
            items=np.asarray(i_out),
            ratings=None,
            titles=titles,
        )
    )


def make_synthetic(
    n_users: int = 400,
    n_source_items: int = 300,
    n_target_items: int = 200,
    n_topics: int = 8,
    source_per_user: int = 30,
    target_per_user: int = 8,
    overlap: float = 0.8,
    seed: int = 0,
    source_name: str = "source",
    target_name: str = "target",
) -> Dataset:
    """A two-domain data set; ``overlap`` is the share of users present in both domains."""
    rng = np.random.default_rng(seed)
    # peaked tastes: each user likes mostly one or two topics
    tastes = rng.dirichlet(np.full(n_topics, 0.15), size=n_users)
    n_overlap = int(round(overlap * n_users))
    rest = n_users - n_overlap
    everyone = np.arange(n_users)
    source_users = everyone[: n_overlap + rest // 2]
    target_users = np.r_[everyone[:n_overlap], everyone[n_overlap + rest // 2 :]]
    src = _domain(source_name, rng, tastes, source_users, n_source_items, source_per_user)
    tgt = _domain(target_name, rng, tastes, target_users, n_target_items, target_per_user)
    return Dataset(
        name=f"synthetic-{seed}",
        path=Path("synthetic"),
        domains={source_name: src, target_name: tgt},
        fingerprint=f"synthetic-{n_users}-{n_source_items}-{n_target_items}-{n_topics}-{seed}",
    )


# ----------------------------------------------------------------------------- at scale, to Parquet

DATASET_TOML = """name = "{name}"
# written by python -m training.data.synthetic ({args})
[domains.source]
file = "source.parquet"
[domains.target]
file = "target.parquet"
"""


@dataclass
class ScaleSpec:
    """What ``write_synthetic`` writes: interactions over both domains, items over both domains."""

    interactions: int
    items: int
    users: int = 0  # 0: one user per 50 interactions
    target_share: float = 0.3  # share of the interactions (and items) in the target domain
    overlap: float = 0.8  # share of the users present in both domains
    alpha: float = 1.0  # item popularity ~ 1 / rank ** alpha
    topic_share: float = 0.5  # share of a user's interactions drawn from their own topic
    n_topics: int = 64
    chunk_rows: int = 1 << 21  # rows per row group (and per generated chunk)
    seed: int = 0

    def n_users(self) -> int:
        return self.users or max(2, self.interactions // 50)


def _cdf(n: int, alpha: float) -> np.ndarray:
    w = _zipf_weights(n, alpha)
    c = np.cumsum(w)
    return c / c[-1]


def _chunk(
    spec: ScaleSpec,
    domain: int,
    index: int,
    rows: int,
    pool: tuple[int, int],
    n_items: int,
    perm: np.ndarray,
    topic_of_user: np.ndarray,
    cdf_all: np.ndarray,
    cdf_topic: np.ndarray,
    prefix: str,
) -> pa.Table:
    """One chunk of a domain: its own generator (seed, domain, chunk), so any chunk can be
    generated alone and the file is the same however it is produced."""
    rng = np.random.default_rng([spec.seed, domain, index])
    lo, hi = pool
    u = rng.integers(lo, hi, size=rows, dtype=np.int64) % spec.n_users()
    rank = np.searchsorted(cdf_all, rng.random(rows), side="right")
    own = rng.random(rows) < spec.topic_share
    t = topic_of_user[u[own]]
    k = np.searchsorted(cdf_topic, rng.random(int(own.sum())), side="right")
    rank[own] = k * spec.n_topics + t  # ranks t, t + T, t + 2T, ...: the topic's items
    rank %= n_items  # the last ranks of a topic past the catalogue wrap to the top
    item = perm[rank]

    def ids(p: str, values: np.ndarray) -> pa.Array:
        return pc.binary_join_element_wise(p, pc.cast(pa.array(values), pa.string()), "")

    return pa.table({"user_id": ids("u", u), "item_id": ids(prefix, item)})


def write_synthetic(spec: ScaleSpec, out: Path) -> dict[str, int]:
    """Write ``spec`` as a data set folder: ``source.parquet`` and ``target.parquet`` (string ids
    ``user_id``, ``item_id``; one row group per chunk) and ``dataset.toml``. Chunks are generated
    and written one at a time, so memory stays at a few chunks whatever the size.

    Users share a topic in both domains (``topic_share`` of their interactions come from it), and
    item popularity follows a power law (Zipf, exponent ``alpha``) overall and within each topic.
    Users ``[0, overlap * users)`` are in both domains, the rest split between the two. Rows may
    repeat a (user, item) pair, as real logs do: the loader removes and counts them.
    """
    if spec.interactions < 2 or spec.items < 2:
        raise DataError("synthetic data needs at least 2 interactions and 2 items")
    if not 0 < spec.target_share < 1 or not 0 < spec.overlap <= 1:
        raise DataError("target_share must be in (0, 1) and overlap in (0, 1]")
    out.mkdir(parents=True, exist_ok=True)
    n_users = spec.n_users()
    rng = np.random.default_rng([spec.seed, 99])
    topic_of_user = rng.integers(0, spec.n_topics, size=n_users).astype(np.int32)
    shared = int(round(spec.overlap * n_users))
    rest = n_users - shared
    pools = [(0, shared + rest // 2), (shared + rest // 2, n_users + shared)]  # mod n_users
    n_target_items = max(1, int(round(spec.target_share * spec.items)))
    counts = {}
    for d, (name, prefix) in enumerate((("source", "s"), ("target", "t"))):
        n_items = spec.items - n_target_items if d == 0 else n_target_items
        n_rows = (
            spec.interactions - int(round(spec.target_share * spec.interactions))
            if d == 0
            else int(round(spec.target_share * spec.interactions))
        )
        perm = np.random.default_rng([spec.seed, d, 98]).permutation(n_items).astype(np.int64)
        cdf_all = _cdf(n_items, spec.alpha)
        cdf_topic = _cdf(max(1, -(-n_items // spec.n_topics)), spec.alpha)
        path = out / f"{name}.parquet"
        schema = pa.schema([("user_id", pa.string()), ("item_id", pa.string())])
        with pq.ParquetWriter(path, schema) as writer:
            for index, start in enumerate(range(0, n_rows, spec.chunk_rows)):
                rows = min(spec.chunk_rows, n_rows - start)
                table = _chunk(
                    spec,
                    d,
                    index,
                    rows,
                    pools[d],
                    n_items,
                    perm,
                    topic_of_user,
                    cdf_all,
                    cdf_topic,
                    prefix,
                )
                writer.write_table(table, row_group_size=spec.chunk_rows)
        counts[name] = n_rows
        logger.info("wrote %s: %d rows, %d items", path, n_rows, n_items)
    args = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(spec).items())
    (out / "dataset.toml").write_text(
        DATASET_TOML.format(name=f"synthetic-scale-{spec.seed}", args=args), encoding="utf-8"
    )
    return counts


def main(argv: list[str] | None = None) -> int:
    """``python -m training.data.synthetic --interactions N --items M --out DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m training.data.synthetic",
        description="Write a two-domain synthetic data set (Parquet, power-law popularity).",
    )
    parser.add_argument("--interactions", type=int, required=True, help="rows over both domains")
    parser.add_argument("--items", type=int, required=True, help="items over both domains")
    parser.add_argument("--users", type=int, default=0, help="users (default: interactions / 50)")
    parser.add_argument("--target-share", type=float, default=ScaleSpec.target_share)
    parser.add_argument("--overlap", type=float, default=ScaleSpec.overlap)
    parser.add_argument("--alpha", type=float, default=ScaleSpec.alpha)
    parser.add_argument("--chunk-rows", type=int, default=ScaleSpec.chunk_rows)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="the data set folder to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = ScaleSpec(
        interactions=args.interactions,
        items=args.items,
        users=args.users,
        target_share=args.target_share,
        overlap=args.overlap,
        alpha=args.alpha,
        chunk_rows=args.chunk_rows,
        seed=args.seed,
    )
    if spec.chunk_rows < 1 or spec.users < 0:
        parser.error("--chunk-rows must be positive and --users not negative")
    try:
        write_synthetic(spec, args.out)
    except DataError as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


def synthetic_pairs(
    n_users: int,
    n_items: int,
    n_interactions: int,
    n_topics: int = 64,
    seed: int = 0,
) -> np.ndarray:
    """(user, item) int64 pairs [n_interactions, 2] with the same planted structure, vectorised
    for tens of millions of rows (no string ids, repeated pairs kept; in memory).

    Each user has a main and a second topic (70 % / 20 % of their interactions, 10 % any
    topic); items are spread over the topics at random and, within a topic, drawn with a
    1/rank popularity (the continuous inverse CDF of 1/x over the topic's items).
    """
    if min(n_users, n_items, n_interactions, n_topics) <= 0:
        raise ValueError("synthetic_pairs: every size must be positive")
    n_topics = min(n_topics, n_items)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_items)  # item at slot (t + n_topics * r): topic t, rank r
    main = rng.integers(0, n_topics, n_users)
    second = rng.integers(0, n_topics, n_users)
    users = rng.integers(0, n_users, n_interactions)
    pick = rng.random(n_interactions)
    topic = np.where(pick < 0.7, main[users], second[users])
    anywhere = pick >= 0.9
    topic[anywhere] = rng.integers(0, n_topics, int(anywhere.sum()))
    size = (n_items - topic + n_topics - 1) // n_topics  # items in each row's topic
    rank = np.floor(np.exp(rng.random(n_interactions) * np.log(size + 1.0))).astype(np.int64) - 1
    rank = np.minimum(rank, size - 1)
    items = perm[topic + n_topics * rank]
    return np.stack([users, items], axis=1).astype(np.int64)
