"""Row-wise sharded embedding tables under torchrun: each process holds a contiguous slice of a
table's rows; a lookup gathers the ids of every process, each process reads the rows it owns and
an autograd-aware all_reduce assembles them, so that a row's gradient reaches its owner only."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import distributed as dist
from torch import nn
from torch.distributed.nn import functional as dist_nn
from torch.nn import functional as F

# the tables of a TwoTower that are sharded (every one present); the towers stay replicated
SHARDED = ("user_emb", "user_private", "item_emb", "item_bias")


class RowShardedEmbedding(nn.Module):
    """This process's rows ``[start, end)`` of a ``num_embeddings x embedding_dim`` table, every
    process holding ``ceil(num_embeddings / world_size)`` rows (the last ones fewer).

    ``forward(ids)`` is a collective: every process calls it (the same number of times, in the
    same order) with its own ids and gets their rows, as ``nn.Embedding`` would give them. The
    gradient of a row lands in its owner's ``weight`` only, summed over every process's lookups
    (sparse when ``sparse`` is set, as ``nn.Embedding(sparse=True)``).
    """

    def __init__(self, full: torch.Tensor, rank: int, world_size: int, sparse: bool = False):
        super().__init__()
        self.num_embeddings, self.embedding_dim = full.shape
        self.rank, self.world_size = rank, world_size
        self.chunk = -(-self.num_embeddings // world_size)
        self.start = min(self.num_embeddings, rank * self.chunk)
        self.end = min(self.num_embeddings, self.start + self.chunk)
        rows = full.detach()[self.start : self.end].clone()
        self.weight = nn.Parameter(rows, requires_grad=full.requires_grad)
        self.sparse = sparse

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        n = flat.numel()
        sizes = [torch.zeros(1, dtype=torch.int64, device=flat.device) for _ in self._ranks()]
        dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=flat.device))
        width = max(int(s) for s in sizes)
        padded = flat.new_zeros(width)
        padded[:n] = flat
        parts = [torch.empty_like(padded) for _ in self._ranks()]
        dist.all_gather(parts, padded)
        every = torch.cat(parts)
        slot = torch.arange(width, device=flat.device)
        valid = torch.cat([slot < s for s in sizes])
        mine = (valid & (every >= self.start) & (every < self.end)).nonzero().squeeze(1)
        rows = F.embedding(every[mine] - self.start, self.weight, sparse=self.sparse)
        partial = rows.new_zeros(every.numel(), self.embedding_dim).index_copy(0, mine, rows)
        # the sum has each row from its owner; its backward sums every process's gradient, which
        # index_copy routes to the owner's rows
        assembled = dist_nn.all_reduce(partial)
        out = assembled[self.rank * width : self.rank * width + n]
        return out.reshape(*ids.shape, self.embedding_dim)

    def _ranks(self) -> range:
        return range(self.world_size)

    def full(self) -> torch.Tensor:
        """The whole table, gathered from every process (a collective; no gradient)."""
        pad = self.weight.detach().new_zeros(self.chunk, self.embedding_dim)
        pad[: self.end - self.start] = self.weight.detach()
        parts = [torch.empty_like(pad) for _ in self._ranks()]
        dist.all_gather(parts, pad)
        return torch.cat(parts)[: self.num_embeddings]

    def local_rows(self, values: torch.Tensor) -> torch.Tensor:
        """The rows of a whole-table tensor (e.g. a row mask) that this process owns."""
        return values[self.start : self.end]

    def unsharded(self) -> nn.Embedding:
        return nn.Embedding.from_pretrained(
            self.full(), freeze=not self.weight.requires_grad, sparse=self.sparse
        )


def shard_tables(model: nn.Module, rank: int, world_size: int) -> None:
    """Replace the model's tables by this process's rows of them (the rest is freed)."""
    for name in SHARDED:
        emb = getattr(model, name, None)
        if isinstance(emb, nn.Embedding):
            setattr(model, name, RowShardedEmbedding(emb.weight, rank, world_size, emb.sparse))


def _sharded(model: nn.Module) -> dict[str, RowShardedEmbedding]:
    return {
        name: emb
        for name in SHARDED
        if isinstance(emb := getattr(model, name, None), RowShardedEmbedding)
    }


def unshard_tables(model: nn.Module) -> None:
    """Gather the whole tables back into the model, in every process (a collective)."""
    for name, emb in _sharded(model).items():
        setattr(model, name, emb.unsharded())


@contextmanager
def whole_tables(model: nn.Module) -> Iterator[nn.Module]:
    """The model with its whole tables for the duration (validation), its shards after."""
    shards = _sharded(model)
    for name, emb in shards.items():
        setattr(model, name, emb.unsharded())
    try:
        yield model
    finally:
        for name, emb in shards.items():
            setattr(model, name, emb)


def rows_held(model: nn.Module) -> dict[str, list[int]]:
    """The rows of each sharded table every process holds, by rank (a collective)."""
    mine = {f"{name}.weight": int(emb.weight.shape[0]) for name, emb in _sharded(model).items()}
    if not mine:
        return {}
    every: list[dict[str, int]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(every, mine)
    return {name: [d[name] for d in every] for name in mine}
