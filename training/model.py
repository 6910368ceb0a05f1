"""Two-tower model: user tower and item tower (embedding tables, an optional residual MLP and an
optional private user table added to the shared one) scored by a dot product, and the losses it
is trained with."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F


class Candidates(NamedTuple):
    """The items a batch of the sampled softmax scores besides each row's positive: in-batch
    positives and/or items drawn from a proposal, shared by every row of the batch."""

    items: torch.Tensor  # [C] item ids
    log_expected: torch.Tensor  # [C] log of each candidate's expected count in the batch's draw


# rows of the [rows, candidates] block of scores the sampled softmax works on at a time: about
# 1 MB of float32, so that the block's passes (scores, max, exp, sum) run in cache, one buffer
# serves every block (a fresh multi-megabyte tensor costs more in page faults than its
# product), and no [batch, candidates] tensor is ever held
_BLOCK_BYTES = 2**20


class _CandidateLogSumExp(torch.autograd.Function):
    """``lse[b] = logsumexp_c(u[b] . v[c] + bias[c])`` without the entries ``(rows, cols)``,
    computed over blocks of rows. The backward pass recomputes each block's scores instead of
    keeping a [B, C] tensor from the forward pass: one more matrix product, far less memory
    traffic."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        u: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
    ) -> torch.Tensor:
        lse = torch.empty(u.shape[0], dtype=u.dtype, device=u.device)
        for r0, r1, block in _score_blocks(u, v, bias, rows, cols):
            top = block.amax(1, keepdim=True)
            top = top.masked_fill_(top == float("-inf"), 0.0)  # rows with every entry removed
            lse[r0:r1] = block.sub_(top).exp_().sum(1).log_().add_(top.squeeze(1))
        ctx.save_for_backward(u, v, bias, rows, cols, lse)
        return lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        u, v, bias, rows, cols, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        need_u, need_v, need_bias = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        grad_u = torch.empty_like(u) if need_u else None
        grad_v = torch.zeros_like(v) if need_v else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        lse = lse.masked_fill(lse == float("-inf"), 0.0)  # rows with every entry removed
        for r0, r1, block in _score_blocks(u, v, bias, rows, cols):
            # d lse[b] / d score[b, c] = softmax: exp(score - lse), times the incoming gradient
            g = block.sub_(lse[r0:r1, None]).exp_().mul_(grad[r0:r1, None])
            if grad_u is not None:
                torch.mm(g, v, out=grad_u[r0:r1])
            if grad_v is not None:
                grad_v.addmm_(g.T, u[r0:r1])
            if grad_bias is not None:
                grad_bias += g.sum(0)
        return grad_u, grad_v, grad_bias, None, None


def _score_blocks(
    u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(first row, end row, scores ``u @ v.T + bias`` of those rows with the removed entries at
    -inf) for consecutive blocks of rows; ``rows`` is sorted. Every block is the same buffer:
    use it before taking the next."""
    n, c = u.shape[0], v.shape[0]
    step = max(1, min(n, _BLOCK_BYTES // (u.element_size() * max(1, c))))
    starts = torch.arange(0, n + step, step, device=rows.device)
    bounds = torch.searchsorted(rows, starts).tolist()
    buf = torch.empty(step, c, dtype=u.dtype, device=u.device)
    for k, r0 in enumerate(range(0, n, step)):
        r1 = min(n, r0 + step)
        block = torch.mm(u[r0:r1], v.T, out=buf[: r1 - r0]).add_(bias)
        lo, hi = bounds[k], bounds[k + 1]
        if hi > lo:
            block[rows[lo:hi] - r0, cols[lo:hi]] = float("-inf")
        yield r0, r1, block


def accidental_hits(items: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns), rows sorted, of the candidates ``cand`` [C] equal to the row's positive
    ``items`` [B]: found by binary search in the sorted candidates, not a [B, C] comparison."""
    sorted_cand, order = torch.sort(cand)
    lo = torch.searchsorted(sorted_cand, items)
    hi = torch.searchsorted(sorted_cand, items, right=True)
    n = hi - lo
    rows = torch.repeat_interleave(torch.arange(items.numel(), device=items.device), n)
    first = torch.repeat_interleave(lo, n)
    offset = torch.arange(rows.numel(), device=items.device) - torch.repeat_interleave(
        torch.cumsum(n, 0) - n, n
    )
    return rows, order[first + offset]


def sampled_softmax_loss(
    u: torch.Tensor,
    pos_v: torch.Tensor,
    cand_v: torch.Tensor,
    log_expected: torch.Tensor,
    hits: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    temperature: float,
) -> torch.Tensor:
    """Per-row loss ``logsumexp([s_pos, s_c - log E[n_c]]) - s_pos`` over the shared candidates.

    ``s = <u, v> / temperature``. A candidate drawn ``E[n_c]`` times in expectation stands for
    ``1 / E[n_c]`` of itself, so ``sum_c exp(s_c - log E[n_c])`` is an unbiased estimate of the
    full softmax's sum over the other items (the logQ correction); the positive enters once,
    uncorrected, as in the full softmax. ``hits`` marks candidates that are the row's own
    positive (accidental hits), as a [B, C] mask or as (rows, columns) with rows sorted
    (:func:`accidental_hits`): they are removed, not counted twice. The candidates' term is
    computed block by block (:class:`_CandidateLogSumExp`).
    """
    if isinstance(hits, torch.Tensor):
        rows, cols = hits.nonzero(as_tuple=True)
    else:
        rows, cols = hits
    u = u / temperature
    pos = (u * pos_v).sum(-1)
    neg = _CandidateLogSumExp.apply(u, cand_v, -log_expected, rows, cols)
    return torch.logaddexp(pos, neg) - pos


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

    def _user_side(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(vectors, L2 terms) of the users ``users`` [B], from one lookup per table of the
        distinct ids (a sparse gradient then holds each row once)."""
        ids, inv = torch.unique(users, return_inverse=True)
        e = self.user_emb(ids)
        anchored = e if self.user_anchor is None else e - self.user_anchor.to(e.device)[ids]
        reg = anchored.pow(2).sum(-1)
        if self.user_private is not None:  # the private part is pulled towards zero
            private = self.user_private(ids)
            e = e + private
            reg = reg + self.private_reg_scale * private.pow(2).sum(-1)
        return self._user_tower(e)[inv], reg[inv]

    def _user_reg(self, users: torch.Tensor) -> torch.Tensor:
        return self._user_side(users)[1]

    def _item_side(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(vectors, squared norms of the embedding rows) of the items ``items`` [N], from one
        lookup per table of the distinct ids."""
        ids, inv = torch.unique(items, return_inverse=True)
        e = self.item_emb(ids)
        bias = None if self.item_bias is None else self.item_bias(ids)
        return self._item_tower(e, bias)[inv], e.pow(2).sum(-1)[inv]

    def _user_tower(self, e: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.user_mlp(e)
        if self.item_bias is not None:
            out = torch.cat([out, torch.ones_like(out[:, :1])], dim=1)
        return out

    def _item_tower(self, e: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out: torch.Tensor = self.item_mlp(e)
        if bias is not None:
            out = torch.cat([out, bias], dim=1)
        return out

    def user_vectors(self, users: torch.Tensor | None = None) -> torch.Tensor:
        e = self.user_emb.weight if users is None else self.user_emb(users)
        if self.user_private is not None:
            e = e + (self.user_private.weight if users is None else self.user_private(users))
        return self._user_tower(e)

    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:
        e = self.item_emb.weight if items is None else self.item_emb(items)
        bias = None
        if self.item_bias is not None:
            bias = self.item_bias.weight if items is None else self.item_bias(items)
        return self._item_tower(e, bias)

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
        u, user_reg = self._user_side(users)
        if loss == "softmax":
            targets = items
            counts = targets.sum(1)
            logp = torch.log_softmax(u @ self.item_vectors().T / temperature, dim=1)
            rows = -(logp * targets).sum()
            reg_term = reg * (
                (user_reg * counts).sum()
                + (targets.sum(0) * self.item_emb.weight.pow(2).sum(1)).sum()
            )
        elif loss == "sampled_softmax":
            assert isinstance(negatives, Candidates)
            cand = negatives.items
            b = items.numel()
            v, sq = self._item_side(torch.cat([items, cand]))
            per_row = sampled_softmax_loss(
                u,
                v[:b],
                v[b:],
                negatives.log_expected,
                accidental_hits(items, cand),
                temperature,
            )
            per_reg = user_reg + sq[:b]
            if weights is not None:
                per_row, per_reg = per_row * weights, per_reg * weights
            rows = per_row.sum()
            reg_term = reg * per_reg.sum()
        elif loss == "bpr":
            assert isinstance(negatives, torch.Tensor)
            b = items.numel()
            v, sq = self._item_side(torch.cat([items, negatives]))
            pos = (u * v[:b]).sum(-1)
            neg = (u * v[b:]).sum(-1)
            rows = -F.logsigmoid(pos - neg).sum()
            reg_term = reg * (user_reg.sum() + sq.sum())
        else:
            raise ValueError(f"unknown loss {loss!r}")
        return (rows + reg_term) * scale
