"""Row-sharded embedding lookups across two gloo processes: planted rows come back in every
process, gradients land in the owning process's rows only, and the table gathers whole; the
shard_embeddings settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import distributed as dist
from torch import multiprocessing as mp

from training.config import load_config
from training.errors import ConfigError
from training.model import Candidates, TwoTower
from training.sharding import RowShardedEmbedding, shard_tables, unshard_tables
from training.trainer import _Optimizer

N, DIM = 5, 2
TABLE = torch.stack([torch.arange(N, dtype=torch.float32), 10.0 * torch.arange(N)], dim=1)
IDS = {0: torch.tensor([[4, 0], [4, 4]]), 1: torch.tensor([1, 3])}  # rank 0 asks 4 three times
EMPTY = {0: torch.tensor([2, 2]), 1: torch.tensor([], dtype=torch.int64)}  # rank 1 asks nothing


def _coeff(rank: int, ids: torch.Tensor) -> torch.Tensor:
    """Distinct weights per lookup and process, so every gradient entry is identifiable."""
    n = ids.numel()
    return (torch.arange(n * DIM, dtype=torch.float32).reshape(*ids.shape, DIM) + 1) * (rank + 1)


def _expected_grad(asks: dict[int, torch.Tensor]) -> torch.Tensor:
    g = torch.zeros(N, DIM)
    for r, ids in asks.items():
        g.index_add_(0, ids.reshape(-1), _coeff(r, ids).reshape(-1, DIM))
    return g


def _model_step(rank: int) -> None:
    """A two-tower step with towers on sharded tables: each process's share of the batch gives,
    summed, the gradients of the whole batch in one process (shards: their rows; towers: after
    the optimiser's all_reduce)."""
    users, items = torch.tensor([0, 3, 5, 6, 2]), torch.tensor([1, 6, 0, 4, 6])
    cand = Candidates(torch.tensor([2, 5, 6]), torch.tensor([0.1, -0.2, 0.3]))
    torch.manual_seed(0)
    whole = TwoTower(7, 7, 4, tower_hidden=3)
    torch.nn.init.normal_(whole.item_mlp.fc2.weight)  # a tower that is not the identity
    torch.nn.init.normal_(whole.item_bias.weight)
    sharded = TwoTower(7, 7, 4, tower_hidden=3)
    sharded.load_state_dict(whole.state_dict())
    args = ("sampled_softmax", 0.05, 1.0, 1.0 / users.numel())
    whole(users, items, cand, *args).backward()
    shard_tables(sharded, rank, 2)
    opt = _Optimizer(sharded, 0.0, {}, set(), sum_dense=True)
    sharded(users[rank::2], items[rank::2], cand, *args).backward()
    opt.step()  # sums the tower gradients across processes first (lr 0: nothing moves)
    expected = dict(whole.named_parameters())
    for name, p in sharded.named_parameters():
        ref = expected[name].grad
        module = sharded.get_submodule(name.rpartition(".")[0])
        if isinstance(module, RowShardedEmbedding):
            ref = module.local_rows(ref)
        torch.testing.assert_close(p.grad, ref, msg=name)
    unshard_tables(sharded)
    for name, t in whole.state_dict().items():
        torch.testing.assert_close(sharded.state_dict()[name], t, msg=name)


def _worker(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        for sparse, asks in ((s, a) for s in (False, True) for a in (IDS, EMPTY)):
            emb = RowShardedEmbedding(TABLE.clone().requires_grad_(True), rank, 2, sparse=sparse)
            own = range(0, 3) if rank == 0 else range(3, 5)  # ceil(5 / 2) = 3 rows, then 2
            assert emb.weight.shape == (len(own), DIM)
            torch.testing.assert_close(emb.weight.detach(), TABLE[own.start : own.stop])
            ids = asks[rank]
            out = emb(ids)
            torch.testing.assert_close(out, TABLE[ids])
            (out * _coeff(rank, ids)).sum().backward()
            grad = emb.weight.grad
            assert grad is not None and grad.is_sparse == sparse
            dense = grad.to_dense() if sparse else grad
            torch.testing.assert_close(dense, _expected_grad(asks)[own.start : own.stop])
            if sparse:  # only rows some process looked up, and only the owner's
                touched = {int(i) + own.start for i in grad.coalesce().indices()[0]}
                wanted = {int(i) for ids in asks.values() for i in ids.reshape(-1)}
                assert touched == wanted & set(own)
            torch.testing.assert_close(emb.full(), TABLE)
        _model_step(rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_lookup_and_gradients(tmp_path: Path) -> None:
    """Dense and sparse gradients; a second lookup where one process asks for nothing; a model
    step with towers."""
    mp.spawn(_worker, args=(str(tmp_path / "store"),), nprocs=2, join=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--shard-embeddings=columns"], "shard_embeddings: expected one of auto, rows, off"),
        (["--shard-embeddings=rows"], "shard_embeddings: the full softmax"),
        (["--shard-auto-bytes=0"], "shard_auto_bytes: must be positive"),
    ],
)
def test_shard_settings_are_validated(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_auto_shards_past_the_stated_size_and_never_the_full_softmax() -> None:
    cfg = load_config(None, ["--loss=bpr", "--dim=64", "--shard-auto-bytes=256000000"])
    assert not cfg.shard_rows(999_999)  # 999,999 x 64 x 4 B: just under
    assert cfg.shard_rows(1_000_000)  # 256,000,000 B
    assert not load_config(None, ["--shard-auto-bytes=1"]).shard_rows(10**7)  # full softmax
    assert load_config(None, ["--loss=bpr", "--shard-embeddings=rows"]).shard_rows(1)
    assert not load_config(None, ["--loss=bpr", "--shard-embeddings=off"]).shard_rows(10**8)
