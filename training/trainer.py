"""The training loop: mini-batches of (user, item) pairs, Adam (SparseAdam on the embedding
tables when they take sparse gradients), validation with early stopping, and under ``torchrun``
(gloo on CPU, NCCL on CUDA) either DistributedDataParallel or row-sharded tables.

Under ``torchrun`` only rank 0 holds the data: it runs the pipeline (loading, split, baselines,
evaluation, export), and each :func:`fit` it calls becomes a job for every rank. Rank 0 sends
the model and the fit's settings, then, step by step, each rank's slice of the global batch
(:class:`_Feed`); the other ranks run :func:`serve_fits` and never read the data set. Validation
runs on rank 0, which sends the score, so every rank stops at the same epoch."""

from __future__ import annotations

import copy
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import distributed as dist
from torch import nn
from tqdm import tqdm

from training.model import Candidates, TwoTower
from training.sharding import (
    RowShardedEmbedding,
    rows_held,
    shard_tables,
    unshard_tables,
    whole_tables,
)

logger = logging.getLogger(__name__)

# how long a collective waits for its peers: the other ranks wait for their next job while rank
# 0 fits baselines, evaluates and exports between two fits (an hour or more at scale)
PROCESS_GROUP_TIMEOUT = timedelta(hours=24)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when started by torchrun; returns (rank, world size)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT
        )
    return dist.get_rank(), dist.get_world_size()


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local)
    return torch.device("cpu")


EMBEDDINGS = ("user_emb", "item_emb", "item_bias")  # the tables that may take sparse gradients


@dataclass(frozen=True)
class Sampling:
    """Negatives of the sampled softmax (ignored by the other losses).

    ``sampler``: ``popularity`` draws ``negatives`` items per batch from (count + 1) ** ``alpha``
    (training counts), ``uniform`` from every item alike, ``in_batch`` uses the batch's positives
    (drawn from the data's own item frequencies). ``mixed``: the batch's positives *and*
    ``negatives`` items from ``sampler`` (popularity or uniform).
    """

    sampler: str = "popularity"
    negatives: int = 1024
    alpha: float = 0.75
    mixed: bool = False

    def __post_init__(self) -> None:
        if self.sampler not in ("popularity", "uniform", "in_batch"):
            raise ValueError(f"unknown negative sampler {self.sampler!r}")
        if self.sampler == "in_batch" and self.mixed:
            raise ValueError("mixed negatives need a popularity or uniform sampler")
        if self.sampler != "in_batch" and self.negatives <= 0:
            raise ValueError("the number of sampled negatives must be positive")


@dataclass
class FitResult:
    best_score: float
    best_epoch: int
    epochs_run: int
    history: list[tuple[int, float, float]]  # (epoch, mean loss, validation score)
    shard_rows: dict[str, list[int]]  # sharded tables: the rows each process held, by rank
    fed: dict[str, int]  # under torchrun: the steps and pairs (or softmax users) this rank trained


def fit(
    model: TwoTower,
    train: np.ndarray | None,
    validate: Callable[[TwoTower], float] | None,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    loss: str,
    reg: float,
    temperature: float,
    patience: int,
    eval_every: int,
    seed: int,
    device: torch.device,
    desc: str,
    progress: bool = True,
    grad_masks: dict[str, torch.Tensor] | None = None,
    lr_scales: dict[str, float] | None = None,
    pair_weights: np.ndarray | None = None,
    sampling: Sampling | None = None,
    sparse_embeddings: bool = False,
    shard_rows: bool = False,
) -> FitResult:
    """Train ``model`` in place on the (user, item) pairs ``train``; restore the best validation.

    Under DDP every process draws the same shuffled order, takes its slice of each global batch,
    and scales its loss so that the averaged gradient equals the single-process gradient.
    ``grad_masks`` maps a parameter name to a row mask: rows with mask 0 are not updated.
    ``lr_scales`` maps a parameter name to a factor on its learning rate.
    ``pair_weights`` (softmax losses) weighs each training pair's loss (default 1).
    ``sampling`` configures the negatives of ``loss="sampled_softmax"``.
    ``sparse_embeddings`` (not with the full softmax): the embedding tables take sparse gradients
    and SparseAdam moves only the rows a batch touches (lazy Adam moments); the other parameters
    keep Adam. The cost of a step then no longer grows with the number of items and users.
    ``shard_rows`` (not with the full softmax; under torchrun): every process holds its slice of
    the rows of each embedding table (:mod:`training.sharding`) instead of DDP's whole copy; the
    towers stay replicated, their gradients summed across processes. Validation and the model
    returned see the whole tables.

    Under torchrun rank 0 calls it with the data (``train``, ``validate``, ``pair_weights``,
    ``sampling``) and sends the other ranks the job; they call it from :func:`serve_fits`
    without any.
    """
    if sparse_embeddings and loss == "softmax":
        raise ValueError("sparse_embeddings needs loss sampled_softmax or bpr")
    if shard_rows and loss == "softmax":
        raise ValueError("shard_rows needs loss sampled_softmax or bpr")
    rank, world_size = world()
    if rank == 0 and (train is None or validate is None):
        raise ValueError("rank 0 fits on data: train and validate are required")
    if world_size > 1 and rank == 0:
        job = {
            "model": model,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "loss": loss,
            "reg": reg,
            "temperature": temperature,
            "patience": patience,
            "eval_every": eval_every,
            "seed": seed,
            "desc": desc,
            "grad_masks": grad_masks,
            "lr_scales": lr_scales,
            "sparse_embeddings": sparse_embeddings,
            "shard_rows": shard_rows,
        }
        dist.broadcast_object_list([job], src=0)
    sharded = shard_rows and world_size > 1
    if sharded:
        shard_tables(model, rank, world_size)
    sparse_tables = _set_sparse(model, sparse_embeddings)
    opt = _Optimizer(model, lr, lr_scales or {}, sparse_tables, sum_dense=sharded)
    hooks = _mask_gradients(model, grad_masks or {}, device)
    net: nn.Module = model
    if world_size > 1 and not sharded:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    n_items = model.item_emb.num_embeddings
    held = None
    if train is not None:
        held = _Batches(train, loss, batch_size, n_items, pair_weights, sampling or Sampling())
    batches = _Feed(held, n_items) if world_size > 1 else held
    assert batches is not None
    best_score, best_epoch = -float("inf"), 0
    best_state = copy.deepcopy(model.state_dict())
    history: list[tuple[int, float, float]] = []
    bad = 0
    epoch = 0
    # one bar per phase, epochs as its unit; none when stderr is not a terminal (disable=None)
    bar = tqdm(
        total=epochs, desc=desc, unit="epoch", disable=True if not progress or rank > 0 else None
    )
    for epoch in range(1, epochs + 1):
        net.train()
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        total, n_steps = train_epoch(
            net, opt, batches, gen, device, loss=loss, reg=reg, temperature=temperature
        )
        mean_loss = total / max(1, n_steps)
        bar.update(1)
        if epoch % eval_every == 0 or epoch == epochs:
            model.eval()
            with whole_tables(model):
                score = validate(model) if validate is not None else 0.0
            if world_size > 1:
                score = _from_rank0(score)
            history.append((epoch, mean_loss, score))
            logger.info("%s epoch %d loss %.4f valid %.4f", desc, epoch, mean_loss, score)
            bar.set_postfix(loss=f"{mean_loss:.4f}", valid=f"{score:.4f}")
            if score > best_score:
                best_score, best_epoch, bad = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
                if bad >= patience:
                    break
    bar.close()
    for h in hooks:
        h.remove()
    rows = rows_held(model) if sharded else {}
    model.load_state_dict(best_state)
    unshard_tables(model)
    _set_sparse(model, False)
    model.eval()
    fed = {"steps": batches.steps, "pairs": batches.pairs} if isinstance(batches, _Feed) else {}
    return FitResult(best_score, best_epoch, epoch, history, rows, fed)


def train_epoch(
    net: nn.Module,
    opt: _Optimizer,
    batches: _Batches | _Feed,
    gen: torch.Generator,
    device: torch.device,
    *,
    loss: str,
    reg: float,
    temperature: float,
    max_seconds: float | None = None,
) -> tuple[float, int]:
    """One pass over ``batches`` in the order drawn from ``gen``: (summed loss, steps). With
    ``max_seconds`` it stops after the first step that ends past that budget in any process
    (benchmarks).

    Under DDP, which averages the gradients of the processes, each process's loss is scaled by
    the world size; with sharded tables the gradients are summed (the lookup's all_reduce, then
    :class:`_Optimizer`'s for the dense ones), so each loss is its share of the batch's mean."""
    rank, world_size = world()
    k = world_size if isinstance(net, nn.parallel.DistributedDataParallel) else 1
    t0 = time.perf_counter()
    total, n_steps = 0.0, 0
    for u, it, negs, n_pairs, w in batches.epoch(gen, rank, world_size, device):
        out = net(u, it, negs, loss, reg, temperature, k / n_pairs, w)
        opt.zero_grad(set_to_none=True)
        out.backward()
        opt.step()
        total += float(out.detach()) / k
        n_steps += 1
        if max_seconds is not None and _past(
            time.perf_counter() - t0 > max_seconds, world_size, device
        ):
            break
    return total, n_steps


def _from_rank0(value: float) -> float:
    """Rank 0's ``value``, in every process."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return float(box[0])


def serve_fits(device: torch.device) -> dict[str, int]:
    """The loop of a rank other than 0 under torchrun: run rank 0's fits (:func:`fit`) on the
    steps it sends, until :func:`release_workers`; returns what it trained (fits, steps, pairs)."""
    done = {"fits": 0, "steps": 0, "pairs": 0}
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        job = box[0]
        if job is None:
            return done
        model = job.pop("model").to(device)
        result = fit(model, None, None, device=device, progress=False, **job)
        done["fits"] += 1
        done["steps"] += result.fed["steps"]
        done["pairs"] += result.fed["pairs"]


def release_workers(mine: dict[str, Any]) -> list[dict[str, Any]]:
    """Rank 0 under torchrun: end the other ranks' :func:`serve_fits` loops; returns every
    rank's report (``mine`` for rank 0, then each worker's :func:`serve_fits` figures with its
    peak memory). Outside torchrun: ``[mine]``."""
    rank, world_size = world()
    if world_size == 1:
        return [mine]
    assert rank == 0
    dist.broadcast_object_list([None], src=0)
    reports: list[Any] = [None] * world_size
    dist.gather_object(mine, reports, dst=0)
    return reports


def report_to_rank0(mine: dict[str, Any]) -> None:
    """A worker's side of :func:`release_workers`."""
    dist.gather_object(mine, None, dst=0)


def _past(late: bool, world_size: int, device: torch.device) -> bool:
    """Whether any process is past its time budget: every process stops after the same step."""
    if world_size == 1:
        return late
    flag = torch.tensor([float(late)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _set_sparse(model: TwoTower, on: bool) -> set[str]:
    """Switch the embedding tables to sparse gradients (or back); the names of their weights."""
    names = set()
    for table in EMBEDDINGS:
        emb = getattr(model, table, None)
        if isinstance(emb, nn.Embedding | RowShardedEmbedding):
            emb.sparse = on
            names.add(f"{table}.weight")
    return names if on else set()


class _Optimizer:
    """Adam (fused) over the trainable parameters, one group per learning-rate factor; the
    parameters named in ``sparse`` (embedding tables with sparse gradients) go to
    :class:`_RowAdam` (SparseAdam's update) instead.
    ``sum_dense`` (sharded tables): before each step the gradients of the parameters outside the
    sharded tables are summed across processes."""

    def __init__(
        self,
        model: TwoTower,
        lr: float,
        scales: dict[str, float],
        sparse: set[str],
        sum_dense: bool = False,
    ) -> None:
        shards = {id(m.weight) for m in model.modules() if isinstance(m, RowShardedEmbedding)}
        self.dense = [
            p for p in model.parameters() if sum_dense and p.requires_grad and id(p) not in shards
        ]
        groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                groups.setdefault((name in sparse, scales.get(name, 1.0)), []).append(p)
        self.opts: list[torch.optim.Optimizer] = []
        for is_sparse in (False, True):
            parts = [
                {"params": ps, "lr": lr * k} for (sp, k), ps in groups.items() if sp == is_sparse
            ]
            if parts:
                if is_sparse:
                    self.opts.append(_RowAdam(parts, lr=lr))
                else:  # the fused kernel: one pass over each tensor (a whole dense table is
                    # several times faster than the per-operation update)
                    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
                    self.opts.append(torch.optim.Adam(parts, lr=lr, fused=fused))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for p in self.dense:
            if p.grad is not None:
                dist.all_reduce(p.grad)
        for o in self.opts:
            o.step()


class _RowAdam(torch.optim.SparseAdam):
    """:class:`torch.optim.SparseAdam`'s update, the same arithmetic in the same order (Adam
    moments of only the rows a gradient holds, bias correction by the parameter's step count),
    with the rows read by ``index_select`` and written by ``index_copy_``/``index_add_``.
    SparseAdam reads them with ``sparse_mask`` and writes with dense += sparse, several times
    slower on tables of many rows (a third of a training step at 1 M items)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            if group.get("maximize", False):
                raise ValueError("maximize is not supported")
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("sparse-gradient Adam needs sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                grad = p.grad.coalesce()  # the update is non-linear: every row once
                rows, values = grad.indices()[0], grad.values()
                if values.numel() == 0:
                    continue
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                # old <- b * old + (1 - b) * new, written as old += (1 - b) * (new - old)
                old_avg = exp_avg.index_select(0, rows)
                avg_update = values.sub(old_avg).mul_(1 - beta1)
                exp_avg.index_add_(0, rows, avg_update)
                old_sq = exp_avg_sq.index_select(0, rows)
                sq_update = values.pow(2).sub_(old_sq).mul_(1 - beta2)
                exp_avg_sq.index_add_(0, rows, sq_update)
                numer = avg_update.add_(old_avg)
                denom = sq_update.add_(old_sq).sqrt_().add_(group["eps"])
                step = state["step"]
                step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                p.index_add_(0, rows, numer.div_(denom).mul_(-step_size))
        return loss


def _mask_gradients(
    model: TwoTower, masks: dict[str, torch.Tensor], device: torch.device
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that zero the gradient of the rows whose mask is 0 (remove them after training)."""
    hooks = []
    for name, p in model.named_parameters():
        if name in masks and p.requires_grad:
            mask = masks[name]
            owner = model.get_submodule(name.rpartition(".")[0])
            if isinstance(owner, RowShardedEmbedding):
                mask = owner.local_rows(mask)
            mask = mask.to(device).unsqueeze(1)
            hooks.append(p.register_hook(lambda g, m=mask: _masked(g, m)))
    return hooks


def _masked(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if not grad.is_sparse:
        return grad * mask
    g = grad.coalesce()
    rows = g.indices()[0]
    return torch.sparse_coo_tensor(
        g.indices(), g.values() * mask[rows], g.shape, is_coalesced=True, check_invariants=False
    )


class SparseTargets(NamedTuple):
    """The softmax's target rows of a step as (row, column, value) entries."""

    n_rows: int
    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor | None  # None: every entry 1

    def dense(self, n_items: int) -> torch.Tensor:
        targets = torch.zeros(self.n_rows, n_items)
        targets[self.rows, self.cols] = 1.0 if self.values is None else self.values
        return targets


# (users, items or targets, negatives, pairs in the global batch, pair weights)
Step = tuple[
    torch.Tensor,
    torch.Tensor | SparseTargets,
    torch.Tensor | Candidates | None,
    int,
    torch.Tensor | None,
]


# steps per message from rank 0 to each rank: a scatter costs about 3 ms on loopback gloo
# whatever its size, and a rank holds at most this many steps' slices
FEED_CHUNK_STEPS = 32


class _Feed:
    """Every rank's slice of each step, cut by rank 0 (which holds the :class:`_Batches`) and
    sent to the others, FEED_CHUNK_STEPS steps at a time: the steps and their order are those
    every rank would draw from the whole data, so training matches one process while only rank
    0 holds the data. ``steps`` and ``pairs`` count what this rank trained on."""

    def __init__(self, batches: _Batches | None, n_items: int) -> None:
        self.batches, self.n_items = batches, n_items
        self.steps = self.pairs = 0

    def epoch(
        self, gen: torch.Generator, rank: int, world_size: int, device: torch.device
    ) -> Iterator[Step]:
        for step in self._mine(gen, rank, world_size):
            users, targets, negs, n_pairs, w = step
            self.steps += 1
            self.pairs += users.numel()
            if isinstance(targets, SparseTargets):
                targets = targets.dense(self.n_items)
            if isinstance(negs, Candidates):
                negs = Candidates(negs.items.to(device), negs.log_expected.to(device))
            elif negs is not None:
                negs = negs.to(device)
            yield (
                users.to(device),
                targets.to(device),
                negs,
                n_pairs,
                None if w is None else w.to(device),
            )

    def _mine(self, gen: torch.Generator, rank: int, world_size: int) -> Iterator[Step]:
        box: list[Any] = [None]
        if rank != 0:
            while True:  # chunks of steps; an empty one ends the epoch
                dist.scatter_object_list(box, None, src=0)
                if not box[0]:
                    return
                yield from box[0]
        assert self.batches is not None
        cpu = torch.device("cpu")
        # each rank's stream draws from its own copy of the epoch's generator, as every rank
        # did when each held the data
        streams = [
            self.batches.epoch(gen if r == 0 else _copy(gen), r, world_size, cpu, dense=False)
            for r in range(world_size)
        ]
        steps = zip(*streams, strict=True)
        while True:
            chunk = list(itertools.islice(steps, FEED_CHUNK_STEPS))
            dist.scatter_object_list(box, [[c[r] for c in chunk] for r in range(world_size)], src=0)
            if not chunk:
                return
            yield from box[0]


def _copy(gen: torch.Generator) -> torch.Generator:
    twin = torch.Generator()
    twin.set_state(gen.get_state())
    return twin


class _Batches:
    """The training pairs cut into batches of about `batch_size` pairs. Softmax: one unit per
    user, the multi-hot (or weighted) row of its items; BPR: one unit per pair, with a uniformly
    drawn negative item; sampled softmax: one unit per pair, with the batch's shared candidates."""

    def __init__(
        self,
        train: np.ndarray,
        loss: str,
        batch_size: int,
        n_items: int,
        pair_weights: np.ndarray | None,
        sampling: Sampling,
    ) -> None:
        self.loss, self.n_items, self.sampling = loss, n_items, sampling
        self.pair_w: torch.Tensor | None = None
        if loss == "softmax":
            order_u = np.argsort(train[:, 0], kind="stable")
            pairs = train[order_u]
            users, starts = np.unique(pairs[:, 0], return_index=True)
            ends = np.r_[starts[1:], len(pairs)]
            self.indptr = torch.from_numpy(np.r_[starts, len(pairs)].astype(np.int64))
            self.pair_items = torch.from_numpy(pairs[:, 1].copy())
            if pair_weights is not None:
                self.pair_w = torch.from_numpy(pair_weights[order_u].astype(np.float32))
            self.units = torch.from_numpy(users)
            self.counts = torch.from_numpy((ends - starts).astype(np.int64))
            # users per batch so that a batch holds about batch_size pairs
            self.step = max(1, int(round(batch_size / max(1.0, float(self.counts.float().mean())))))
        else:
            self.units = torch.from_numpy(np.ascontiguousarray(train[:, 0]))
            self.unit_items = torch.from_numpy(np.ascontiguousarray(train[:, 1]))
            self.step = batch_size
            if loss == "sampled_softmax":
                if pair_weights is not None:
                    self.pair_w = torch.from_numpy(pair_weights.astype(np.float32))
                self._proposals(train[:, 1])

    def _proposals(self, items: np.ndarray) -> None:
        """The data's item frequencies (in-batch draws) and the sampler's proposal with its CDF."""
        counts = np.bincount(items, minlength=self.n_items).astype(np.float64)
        self.p_data = torch.from_numpy(counts / counts.sum())
        s = self.sampling
        if s.sampler == "in_batch":
            self.q = None
            return
        w = np.ones(self.n_items) if s.sampler == "uniform" else (counts + 1.0) ** s.alpha
        q = w / w.sum()
        self.q = torch.from_numpy(q)
        cdf = torch.from_numpy(np.cumsum(q))
        cdf[-1] = 1.0 + 1e-12  # a draw of u in [0, 1) always lands on an item
        self.cdf = cdf

    def candidates(self, idx: torch.Tensor, gen: torch.Generator) -> Candidates:
        """The shared candidates of the global batch ``idx`` and their log expected counts."""
        s, b = self.sampling, idx.numel()
        parts: list[torch.Tensor] = []
        if s.sampler == "in_batch" or s.mixed:
            parts.append(self.unit_items[idx])
        if self.q is not None:
            u = torch.rand(s.negatives, generator=gen, dtype=torch.float64)
            parts.append(torch.searchsorted(self.cdf, u, right=True).clamp_(max=self.n_items - 1))
        items = torch.cat(parts) if len(parts) > 1 else parts[0]
        expected = torch.zeros(items.numel(), dtype=torch.float64)
        if s.sampler == "in_batch" or s.mixed:
            expected += b * self.p_data[items]
        if self.q is not None:
            expected += s.negatives * self.q[items]
        return Candidates(items, expected.log().float())

    def epoch(
        self,
        gen: torch.Generator,
        rank: int,
        world_size: int,
        device: torch.device,
        *,
        dense: bool = True,
    ) -> Iterator[Step]:
        """(users, items or targets, negatives, pairs in the global batch, pair weights) for each
        step of one epoch, in an order drawn from `gen`; each process takes its slice of every
        batch (the negatives of the sampled softmax are the global batch's, in every process).
        ``dense=False``: the softmax's targets as :class:`SparseTargets` (to send them)."""
        n = self.units.numel()
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, self.step):
            idx = order[start : start + self.step]
            local = idx[rank::world_size]
            if self.loss == "softmax":
                targets = self._entries(local)
                yield (
                    self.units[local].to(device),
                    targets.dense(self.n_items).to(device) if dense else targets,
                    None,
                    int(self.counts[idx].sum()),
                    None,
                )
            elif self.loss == "sampled_softmax":
                cand = self.candidates(idx, gen)
                yield (
                    self.units[local].to(device),
                    self.unit_items[local].to(device),
                    Candidates(cand.items.to(device), cand.log_expected.to(device)),
                    idx.numel(),
                    None if self.pair_w is None else self.pair_w[local].to(device),
                )
            else:
                negs = torch.randint(0, self.n_items, (idx.numel(),), generator=gen)
                yield (
                    self.units[local].to(device),
                    self.unit_items[local].to(device),
                    negs[rank::world_size].to(device),
                    idx.numel(),
                    None,
                )

    def _entries(self, local: torch.Tensor) -> SparseTargets:
        """The multi-hot (or weighted) target rows of the users ``local``, gathered without a
        Python loop over users."""
        counts = self.counts[local]
        row_of = torch.repeat_interleave(torch.arange(local.numel()), counts)
        first = torch.repeat_interleave(self.indptr[local], counts)
        offset = torch.arange(row_of.numel()) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts
        )
        pos = first + offset
        values = None if self.pair_w is None else self.pair_w[pos]
        return SparseTargets(local.numel(), row_of, self.pair_items[pos], values)
