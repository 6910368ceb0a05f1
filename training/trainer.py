"""The training loop: mini-batches of (user, item) pairs, Adam, validation with early stopping,
and DistributedDataParallel when started under ``torchrun`` (gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
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
) -> FitResult:
    """Train ``model`` in place on the (user, item) pairs ``train``; restore the best validation.

    Under DDP every process draws the same shuffled order, takes its slice of each global batch,
    and scales its loss so that the averaged gradient equals the single-process gradient.
    ``grad_masks`` maps a parameter name to a row mask: rows with mask 0 are not updated.
    """
    rank, world_size = world()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    hooks = []
    for name, p in model.named_parameters():
        if grad_masks and name in grad_masks and p.requires_grad:
            mask = grad_masks[name].to(device).unsqueeze(1)
            hooks.append(p.register_hook(lambda g, m=mask: g * m))
    net: nn.Module = model
    if world_size > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    users = torch.from_numpy(train[:, 0]).to(device)
    items = torch.from_numpy(train[:, 1]).to(device)
    n = train.shape[0]
    n_items = model.item_emb.num_embeddings
    best_score, best_epoch = -float("inf"), 0
    best_state = copy.deepcopy(model.state_dict())
    history: list[tuple[int, float, float]] = []
    bad = 0
    epoch = 0
    for epoch in range(1, epochs + 1):
        net.train()
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen).to(device)
        total = 0.0
        steps = range(0, n, batch_size)
        bar = tqdm(steps, desc=f"{desc} epoch {epoch}", leave=False, disable=not progress or rank > 0)
        for start in bar:
            idx = order[start : start + batch_size]
            negs_all = None
            if loss == "bpr":
                negs_all = torch.randint(0, n_items, (idx.numel(),), generator=gen).to(device)
            local = idx[rank::world_size]
            negs = None if negs_all is None else negs_all[rank::world_size]
            scale = world_size / idx.numel()
            out = net(users[local], items[local], negs, loss, reg, temperature, scale)
            opt.zero_grad(set_to_none=True)
            out.backward()
            opt.step()
            total += float(out.detach()) / world_size
        mean_loss = total / max(1, len(steps))
        if epoch % eval_every == 0 or epoch == epochs:
            model.eval()
            score = validate(model)
            history.append((epoch, mean_loss, score))
            logger.info("%s epoch %d loss %.4f valid %.4f", desc, epoch, mean_loss, score)
            if score > best_score:
                best_score, best_epoch, bad = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
                if bad >= patience:
                    break
    for h in hooks:
        h.remove()
    model.load_state_dict(best_state)
    model.eval()
    return FitResult(best_score, best_epoch, epoch, history)
