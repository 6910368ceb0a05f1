"""The training loop: mini-batches of (user, item) pairs, Adam, validation with early stopping,
and DistributedDataParallel when started under ``torchrun`` (gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import distributed as dist
from torch import nn
from tqdm import tqdm

from training.model import TwoTower

logger = logging.getLogger(__name__)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when started by torchrun; returns (rank, world size)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
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


@dataclass
class FitResult:
    best_score: float
    best_epoch: int
    epochs_run: int
    history: list[tuple[int, float, float]]  # (epoch, mean loss, validation score)


def fit(
    model: TwoTower,
    train: np.ndarray,
    validate: Callable[[TwoTower], float],
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
) -> FitResult:
    """Train ``model`` in place on the (user, item) pairs ``train``; restore the best validation.

    Under DDP every process draws the same shuffled order, takes its slice of each global batch,
    and scales its loss so that the averaged gradient equals the single-process gradient.
    ``grad_masks`` maps a parameter name to a row mask: rows with mask 0 are not updated.
    ``lr_scales`` maps a parameter name to a factor on its learning rate.
    ``pair_weights`` (softmax loss only) weighs each training pair's loss (default 1).
    """
    rank, world_size = world()
    opt = _optimizer(model, lr, lr_scales or {})
    hooks = _mask_gradients(model, grad_masks or {}, device)
    net: nn.Module = model
    if world_size > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    batches = _Batches(train, loss, batch_size, model.item_emb.num_embeddings, pair_weights)
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
        total, n_steps = 0.0, 0
        for u, it, negs, n_pairs in batches.epoch(gen, rank, world_size, device):
            out = net(u, it, negs, loss, reg, temperature, world_size / n_pairs)
            opt.zero_grad(set_to_none=True)
            out.backward()
            opt.step()
            total += float(out.detach()) / world_size
            n_steps += 1
        mean_loss = total / max(1, n_steps)
        bar.update(1)
        if epoch % eval_every == 0 or epoch == epochs:
            model.eval()
            score = validate(model)
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
    model.load_state_dict(best_state)
    model.eval()
    return FitResult(best_score, best_epoch, epoch, history)


def _optimizer(model: TwoTower, lr: float, scales: dict[str, float]) -> torch.optim.Adam:
    """Adam over the trainable parameters, one group per learning-rate factor."""
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(scales.get(name, 1.0), []).append(p)
    return torch.optim.Adam([{"params": ps, "lr": lr * k} for k, ps in groups.items()], lr=lr)


def _mask_gradients(
    model: TwoTower, masks: dict[str, torch.Tensor], device: torch.device
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that zero the gradient of the rows whose mask is 0 (remove them after training)."""
    hooks = []
    for name, p in model.named_parameters():
        if name in masks and p.requires_grad:
            mask = masks[name].to(device).unsqueeze(1)
            hooks.append(p.register_hook(lambda g, m=mask: g * m))
    return hooks


class _Batches:
    """The training pairs cut into batches of about `batch_size` pairs. Softmax: one unit per
    user, the multi-hot (or weighted) row of its items; BPR: one unit per pair, with a uniformly
    drawn negative item."""

    def __init__(
        self,
        train: np.ndarray,
        loss: str,
        batch_size: int,
        n_items: int,
        pair_weights: np.ndarray | None,
    ) -> None:
        self.loss, self.n_items = loss, n_items
        if loss == "softmax":
            order_u = np.argsort(train[:, 0], kind="stable")
            pairs = train[order_u]
            users, starts = np.unique(pairs[:, 0], return_index=True)
            ends = np.r_[starts[1:], len(pairs)]
            self.indptr = torch.from_numpy(np.r_[starts, len(pairs)].astype(np.int64))
            self.pair_items = torch.from_numpy(pairs[:, 1].copy())
            self.pair_w = (
                None
                if pair_weights is None
                else torch.from_numpy(pair_weights[order_u].astype(np.float32))
            )
            self.units = torch.from_numpy(users)
            self.counts = torch.from_numpy((ends - starts).astype(np.int64))
            # users per batch so that a batch holds about batch_size pairs
            self.step = max(1, int(round(batch_size / max(1.0, float(self.counts.float().mean())))))
        else:
            self.units = torch.from_numpy(train[:, 0])
            self.unit_items = torch.from_numpy(train[:, 1])
            self.step = batch_size

    def epoch(
        self, gen: torch.Generator, rank: int, world_size: int, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]]:
        """(users, items or targets, negatives, pairs in the global batch) for each step of one
        epoch, in an order drawn from `gen`; each process takes its slice of every batch."""
        n = self.units.numel()
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, self.step):
            idx = order[start : start + self.step]
            local = idx[rank::world_size]
            if self.loss == "softmax":
                yield (
                    self.units[local].to(device),
                    self._targets(local).to(device),
                    None,
                    int(self.counts[idx].sum()),
                )
            else:
                negs = torch.randint(0, self.n_items, (idx.numel(),), generator=gen)
                yield (
                    self.units[local].to(device),
                    self.unit_items[local].to(device),
                    negs[rank::world_size].to(device),
                    idx.numel(),
                )

    def _targets(self, local: torch.Tensor) -> torch.Tensor:
        targets = torch.zeros(local.numel(), self.n_items)
        row_of = torch.repeat_interleave(torch.arange(local.numel()), self.counts[local])
        spans = [(int(self.indptr[j]), int(self.indptr[j + 1])) for j in local.tolist()]
        cols = torch.cat([self.pair_items[a:b] for a, b in spans])
        if self.pair_w is None:
            targets[row_of, cols] = 1.0
        else:
            targets[row_of, cols] = torch.cat([self.pair_w[a:b] for a, b in spans])
        return targets
