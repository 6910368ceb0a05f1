"""Deterministic synthetic cross-domain data with planted shared user tastes, for fast tests.

Every user has a taste: a distribution over ``n_topics`` topics that is the same in both domains.
Every item of each domain belongs to one topic. A user's interactions in a domain are items drawn
from their preferred topics, so what a model learns about a user in the source domain tells it
which target items the user will pick. The target domain is thin (fewer interactions per user).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data.dataset import Dataset, DomainData, deduplicate


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
            w = 1.0 / np.arange(1, pool.size + 1)
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
