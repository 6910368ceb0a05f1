"""Two-tower model: user tower and item tower (embedding tables, an optional residual MLP and an
optional private user table added to the shared one) scored by a dot product, and the losses it
is trained with."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F


class Candidates(NamedTuple):
    """The items a batch of the sampled softmax scores besides each row's positive: in-batch
    positives and/or items drawn from a proposal, shared by every row of the batch."""

    items: torch.Tensor  # [C] item ids
    log_expected: torch.Tensor  # [C] log of each candidate's expected count in the batch's draw


def sampled_softmax_loss(
    u: torch.Tensor,
    pos_v: torch.Tensor,
    cand_v: torch.Tensor,
    log_expected: torch.Tensor,
    hits: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Per-row loss ``logsumexp([s_pos, s_c - log E[n_c]]) - s_pos`` over the shared candidates.

    ``s = <u, v> / temperature``. A candidate drawn ``E[n_c]`` times in expectation stands for
    ``1 / E[n_c]`` of itself, so ``sum_c exp(s_c - log E[n_c])`` is an unbiased estimate of the
    full softmax's sum over the other items (the logQ correction); the positive enters once,
    uncorrected, as in the full softmax. ``hits`` [B, C] marks candidates that are the row's own
    positive (accidental hits): they are removed, not counted twice.
    """
    pos = (u * pos_v).sum(-1) / temperature
    neg = (u @ cand_v.T) / temperature - log_expected
    neg = neg.masked_fill(hits, float("-inf"))
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1)
    return torch.logsumexp(logits, dim=1) - pos


class ResidualMLP(nn.Module):
    """x + W2 relu(W1 x); W2 starts at zero so the tower starts as the identity."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


class TwoTower(nn.Module):
    """score(u, i) = <user_tower(u), item_tower(i)>; ``forward`` returns the training loss."""

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int,
        tower_hidden: int = 0,
        private_users: bool = False,
        init_std: float = 0.1,
        item_bias: bool = True,
    ) -> None:
        super().__init__()
        self.user_emb = nn.Embedding(n_users, dim)
        self.item_emb = nn.Embedding(n_items, dim)
        nn.init.normal_(self.user_emb.weight, std=init_std)
        nn.init.normal_(self.item_emb.weight, std=init_std)
        self.user_mlp: nn.Module = ResidualMLP(dim, tower_hidden) if tower_hidden else nn.Identity()
        self.item_mlp: nn.Module = ResidualMLP(dim, tower_hidden) if tower_hidden else nn.Identity()
        # shared-plus-private users: the user vector is user_emb[u] + user_private[u], the
        # private table starting at zero (set by the ``shared_private`` transfer strategy, which
        # keeps the shared rows of source users frozen at their source vectors)
        self.user_private: nn.Embedding | None = None
        if private_users:
            self.user_private = nn.Embedding(n_users, dim)
            nn.init.zeros_(self.user_private.weight)
        self.private_reg_scale = 1.0  # factor on the L2 of the private part
        # an item bias folded into the dot product: user vectors end in a constant 1, item
        # vectors in the bias, so retrieval stays a pure inner product of dimension dim + 1
        self.item_bias = nn.Embedding(n_items, 1) if item_bias else None
        if self.item_bias is not None:
            nn.init.zeros_(self.item_bias.weight)
        self.dim = dim
        # optional anchor of the user-embedding L2: rows are penalised towards anchor[u]
        # instead of zero (set by the ``anchored`` transfer strategy; None = towards zero)
        self.user_anchor: torch.Tensor | None = None

    def set_anchor(self, anchor: torch.Tensor | None) -> None:
        self.user_anchor = None if anchor is None else anchor.detach().clone()

    def _user_reg(self, users: torch.Tensor) -> torch.Tensor:
        e = self.user_emb(users)
        if self.user_anchor is not None:
            e = e - self.user_anchor.to(e.device)[users]
        out = e.pow(2).sum(-1)
        if self.user_private is not None:  # the private part is pulled towards zero
            out = out + self.private_reg_scale * self.user_private(users).pow(2).sum(-1)
        return out

    def user_vectors(self, users: torch.Tensor | None = None) -> torch.Tensor:
        e = self.user_emb.weight if users is None else self.user_emb(users)
        if self.user_private is not None:
            e = e + (self.user_private.weight if users is None else self.user_private(users))
        out: torch.Tensor = self.user_mlp(e)
        if self.item_bias is not None:
            out = torch.cat([out, torch.ones_like(out[:, :1])], dim=1)
        return out

    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:
        e = self.item_emb.weight if items is None else self.item_emb(items)
        out: torch.Tensor = self.item_mlp(e)
        if self.item_bias is not None:
            b = self.item_bias.weight if items is None else self.item_bias(items)
            out = torch.cat([out, b], dim=1)
        return out

    def forward(
        self,
        users: torch.Tensor,
        items: torch.Tensor,
        negatives: torch.Tensor | Candidates | None,
        loss: str,
        reg: float,
        temperature: float,
        scale: float,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum of losses times ``scale`` (1/global number of pairs, times world size).

        ``softmax``: ``users`` is a batch of distinct users and ``items`` their multi-hot targets
        [batch, n_items]; the loss is the full softmax cross-entropy of every (user, item) pair,
        computed once per user. ``bpr``: ``users``/``items``/``negatives`` are aligned pairs.
        ``sampled_softmax``: ``users``/``items`` are aligned pairs and ``negatives`` the batch's
        :class:`Candidates`; ``weights`` (optional) weighs each pair's loss and L2.
        """
        u = self.user_vectors(users)
        if loss == "softmax":
            targets = items
            counts = targets.sum(1)
            logp = torch.log_softmax(u @ self.item_vectors().T / temperature, dim=1)
            rows = -(logp * targets).sum()
            reg_term = reg * (
                (self._user_reg(users) * counts).sum()
                + (targets.sum(0) * self.item_emb.weight.pow(2).sum(1)).sum()
            )
        elif loss == "sampled_softmax":
            assert isinstance(negatives, Candidates)
            cand = negatives.items
            hits = items.unsqueeze(1) == cand.unsqueeze(0)
            per_row = sampled_softmax_loss(
                u,
                self.item_vectors(items),
                self.item_vectors(cand),
                negatives.log_expected,
                hits,
                temperature,
            )
            per_reg = self._user_reg(users) + self.item_emb(items).pow(2).sum(-1)
            if weights is not None:
                per_row, per_reg = per_row * weights, per_reg * weights
            rows = per_row.sum()
            reg_term = reg * per_reg.sum()
        elif loss == "bpr":
            assert isinstance(negatives, torch.Tensor)
            assert negatives is not None
            pos = (u * self.item_vectors(items)).sum(-1)
            neg = (u * self.item_vectors(negatives)).sum(-1)
            rows = -F.logsigmoid(pos - neg).sum()
            reg_term = reg * (
                self._user_reg(users).sum()
                + self.item_emb(items).pow(2).sum()
                + self.item_emb(negatives).pow(2).sum()
            )
        else:
            raise ValueError(f"unknown loss {loss!r}")
        return (rows + reg_term) * scale
