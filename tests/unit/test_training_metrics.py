"""Ranking metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.evaluate import full_ranking, sampled_ranking


def test_full_ranking_hand_computed() -> None:
    # one-dimensional towers: user 0 ranks items by score, user 1 by minus score
    items = torch.tensor([[3.0], [5.0], [2.0], [1.0], [0.0]])
    users = torch.tensor([[1.0], [-1.0]])
    test = np.array([[0, 0], [0, 3], [1, 2]])
    train = np.array([[0, 1]])  # user 0's best item was seen in training: excluded
    m = full_ranking(users, items, test, [train], ks=(1, 3))
    # user 0: ranking 0,2,3,4 -> test items at ranks 0 and 2; user 1: ranking 4,3,2,... -> rank 2
    ndcg3_u0 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert m["recall@1"] == pytest.approx((0.5 + 0) / 2)
    assert m["ndcg@1"] == pytest.approx((1 + 0) / 2)
    assert m["hit@1"] == pytest.approx(0.5)
    assert m["mrr@1"] == pytest.approx(0.5)
    assert m["recall@3"] == pytest.approx(1.0)
    assert m["ndcg@3"] == pytest.approx((ndcg3_u0 + 1 / math.log2(4)) / 2)
    assert m["hit@3"] == pytest.approx(1.0)
    assert m["mrr@3"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["users"] == 2
    only_u1 = full_ranking(users, items, test, [train], users=np.array([1]), ks=(3,))
    assert only_u1["ndcg@3"] == pytest.approx(0.5) and only_u1["users"] == 1


def test_full_ranking_without_exclusion_counts_seen_items() -> None:
    items = torch.tensor([[3.0], [5.0]])
    users = torch.tensor([[1.0]])
    m = full_ranking(users, items, np.array([[0, 0]]), [], ks=(1,))
    assert m["hit@1"] == 0.0  # item 1 outranks it when training items are not excluded


def test_sampled_ranking_hand_computed() -> None:
    items = torch.tensor([[0.0], [1.0], [2.0], [3.0], [2.0]])
    users = torch.tensor([[1.0], [1.0]])
    test = np.array([[0, 2], [1, 1]])
    negatives = np.array([[0, 3, 4], [0, 2, 3]])
    m = sampled_ranking(users, items, test, negatives, ks=(1, 2))
    # user 0: score 2 vs (0, 3, 2): one above, one tie (half) -> rank floor(1.5) = 1
    # user 1: score 1 vs (0, 2, 3): two above -> rank 2
    assert m["hit@1"] == 0.0
    assert m["hit@2"] == pytest.approx(0.5)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / 2)
    assert m["mrr@2"] == pytest.approx(0.5 / 2)
    assert m["recall@2"] == m["hit@2"]
