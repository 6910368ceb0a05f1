"""The shared-plus-private transfer strategy: source users keep their frozen source vector and
train a private target vector that starts at zero, so warm users are personalised."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.config import load_config
from training.data.splits import make_split
from training.data.synthetic import make_synthetic
from training.model import TwoTower
from training.transfer import pretrain_source, train_strategy

CONFIG = Path(__file__).resolve().parents[2] / "training" / "configs" / "synthetic.toml"


def _setup() -> tuple[Any, Any, TwoTower]:
    cfg = load_config(
        CONFIG,
        ["--threads=1", "--epochs=8", "--source_epochs=8", "--patience=8"],
    )
    ds = make_synthetic(n_users=120, n_source_items=60, n_target_items=40, seed=0)
    split = make_split(ds, "target", "source", "ratio", cold_share=0.2, seed=0)
    source = pretrain_source(split, cfg, torch.device("cpu"))
    return cfg, split, source


def test_private_table_starts_at_zero_and_adds_to_the_shared_one() -> None:
    model = TwoTower(5, 3, 4, private_users=True, item_bias=False)
    assert model.user_private is not None
    assert torch.equal(model.user_private.weight, torch.zeros(5, 4))
    with torch.no_grad():
        model.user_private.weight[2] = 1.0
    expected = model.user_emb.weight[2] + 1.0
    assert torch.allclose(model.user_vectors()[2], expected)
    assert torch.allclose(model.user_vectors(torch.tensor([2]))[0], expected)


def test_warm_source_users_train_a_private_vector_over_a_frozen_shared_one() -> None:
    cfg, split, source = _setup()
    model, info = train_strategy("shared_private", split, cfg, torch.device("cpu"), source)
    assert model.user_private is not None
    src = source.user_emb.weight.detach()
    shared = model.user_emb.weight.detach()
    private = model.user_private.weight.detach()
    su = torch.from_numpy(split.source_users)
    # the shared rows of source users are exactly their source vectors
    assert torch.equal(shared[su], src[su])
    # warm source users (target training pairs) moved their private vector away from zero
    has_target = np.zeros(split.n_users, dtype=bool)
    has_target[split.train[:, 0]] = True
    warm_src = torch.from_numpy(np.intersect1d(np.flatnonzero(has_target), split.source_users))
    assert warm_src.numel() > 0
    assert (private[warm_src].norm(dim=1) > 1e-4).float().mean() > 0.9
    # users without target training pairs get no gradient on their private vector
    cold = torch.from_numpy(np.setdiff1d(split.source_users, np.flatnonzero(has_target)))
    assert cold.numel() > 0 and torch.equal(private[cold], torch.zeros_like(private[cold]))
    # and each warm user's vector is no longer the source vector alone
    vec = model.user_vectors().detach()[:, : cfg.dim]
    assert not torch.allclose(vec[warm_src], src[warm_src])
    assert float(info["valid_ndcg@10"]) > 0.0


def test_private_vectors_are_regularised_towards_zero() -> None:
    model = TwoTower(3, 2, 4, private_users=True, item_bias=False)
    with torch.no_grad():
        model.user_emb.weight.zero_()
        model.user_private.weight.fill_(0.5)  # type: ignore[union-attr]
    reg = model._user_reg(torch.tensor([0, 1]))
    assert torch.allclose(reg, torch.full((2,), 4 * 0.25))
    model.private_reg_scale = 0.2
    assert torch.allclose(model._user_reg(torch.tensor([0])), torch.full((1,), 0.2 * 4 * 0.25))
