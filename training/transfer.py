"""Source pretraining, the transfer strategies, the EMCDR mapping and the baselines.

Every model ends as a pair of tables (user vectors, item vectors) so that all of them are
evaluated and exported the same way: score(u, i) = <users[u], items[i]>.

Strategies (the shared user embedding comes from the source model; target item embeddings are
new; the tower MLP weights are transferred when ``tower_hidden > 0``; with the default
``tower_hidden = 0`` the towers are identities and only the user embeddings transfer):

* ``target_only``: the same architecture trained from scratch on the target domain (baseline).
* ``finetune``: start from the source model, train everything.
* ``freeze_unfreeze``: shared user side frozen for ``freeze_epochs``, then everything trained.
* ``shared_private``: every user is a shared vector plus a private target vector, the private
  one starting at zero and pulled towards zero by the L2; the shared vectors of source users stay
  frozen at their source values (users without source history train theirs), the private
  vectors and the new item side train, so warm users are personalised on the target while what
  the source learned stays intact beneath.
* ``anchored``: finetune whose user L2 pulls each user towards ``w_u`` times their source vector
  instead of zero, ``w_u = 1 / (1 + n_u / anchor_tau)`` for a user with ``n_u`` target training
  pairs: users with little target history stay near what the source learned, users with much
  are free (a shared-plus-private user: the private part ``e_u - w_u s_u`` is what is penalised).
* ``joint``: CMF-style joint training: one model over [source items | target items] starting from
  the source model, trained on the target pairs and the source pairs (loss weight
  ``joint_source_weight``) with the user side shared; validated on target items only.
* ``emcdr``: for every strategy above, users with no target history get ``f(source vector)``
  where f is an MLP fitted on overlapping warm users (source vector -> target vector).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from training.config import Config
from training.data.splits import Split
from training.evaluate import full_ranking
from training.model import TwoTower
from training.trainer import FitResult, Sampling, fit

logger = logging.getLogger(__name__)

VALID_USERS_MAX = 3000  # validation ranks at most this many users (sampled once, fixed seed)


@dataclass
class Tables:
    """A trained model as tables: score(u, i) = users[u] . items[i]."""

    users: torch.Tensor
    items: torch.Tensor
    cold_users: torch.Tensor | None = None  # rows for users without target history (mapped)
    mapped_users: torch.Tensor | None = None  # every user's mapped row (simulated cold-start)
    info: dict[str, object] = field(default_factory=dict)


def _validator(
    pairs: np.ndarray, exclude: list[np.ndarray], seed: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    users = np.unique(pairs[:, 0])
    if users.size > VALID_USERS_MAX:
        users = np.sort(np.random.default_rng(seed).choice(users, VALID_USERS_MAX, replace=False))
    return users, exclude


def validation_users(split: Split, seed: int) -> np.ndarray:
    """The target validation users every model and baseline is selected on."""
    return _validator(split.valid, [split.train], seed)[0]


def _make_validate(pairs: np.ndarray, exclude: list[np.ndarray], seed: int):  # type: ignore[no-untyped-def]
    users, excl = _validator(pairs, exclude, seed)

    def validate(model: TwoTower) -> float:
        with torch.no_grad():
            u = model.user_vectors().detach().cpu()
            v = model.item_vectors().detach().cpu()
        return full_ranking(u, v, pairs, excl, users=users, ks=(10,))["ndcg@10"]

    return validate


def _fit(
    model: TwoTower,
    train: np.ndarray,
    valid: np.ndarray,
    cfg: Config,
    desc: str,
    device: torch.device,
    epochs: int,
    lr: float | None = None,
    grad_masks: dict[str, torch.Tensor] | None = None,
    lr_scales: dict[str, float] | None = None,
    pair_weights: np.ndarray | None = None,
    validate: Callable[[TwoTower], float] | None = None,
) -> FitResult:
    validate = validate or _make_validate(valid, [train], cfg.seed)
    result = fit(
        model,
        train,
        validate,
        epochs=epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr if lr is None else lr,
        loss=cfg.loss,
        reg=cfg.reg,
        temperature=cfg.temperature,
        patience=cfg.patience,
        eval_every=cfg.eval_every,
        seed=cfg.seed,
        device=device,
        desc=desc,
        progress=cfg.progress,
        grad_masks=grad_masks,
        lr_scales=lr_scales,
        pair_weights=pair_weights,
        sampling=Sampling(
            cfg.negative_sampler, cfg.sampled_negatives, cfg.sampler_alpha, cfg.mixed_negatives
        ),
        sparse_embeddings=cfg.sparse_embeddings,
        shard_rows=cfg.shard_rows(model.item_emb.num_embeddings),
    )
    logger.info(
        "%s: best valid NDCG@10 %.4f at epoch %d", desc, result.best_score, result.best_epoch
    )
    return result


def _summary(r: FitResult) -> dict[str, object]:
    """A strategy's training summary; with sharded tables, the rows each process held."""
    out: dict[str, object] = {"best_epoch": r.best_epoch, "valid_ndcg@10": r.best_score}
    if r.shard_rows:
        out["shard_rows"] = r.shard_rows
    return out


def new_model(cfg: Config, n_users: int, n_items: int, private_users: bool = False) -> TwoTower:
    return TwoTower(
        n_users, n_items, cfg.dim, cfg.tower_hidden, private_users, cfg.init_std, cfg.item_bias
    )


def pretrain_source(split: Split, cfg: Config, device: torch.device) -> TwoTower:
    torch.manual_seed(cfg.seed)
    model = new_model(cfg, split.n_users, split.n_source_items).to(device)
    _fit(model, split.source_train, split.source_valid, cfg, "source", device, cfg.source_epochs)
    return model


def _from_source(
    source: TwoTower, split: Split, cfg: Config, device: torch.device, private_users: bool = False
) -> TwoTower:
    """Target model: shared user embeddings and tower weights from the source, new items."""
    torch.manual_seed(cfg.seed + 7)
    model = new_model(cfg, split.n_users, split.n_target_items, private_users).to(device)
    model.user_emb.weight.data.copy_(source.user_emb.weight.data)
    if cfg.tower_hidden:  # with tower_hidden = 0 the towers are identities: nothing to copy
        model.user_mlp.load_state_dict(source.user_mlp.state_dict())
        model.item_mlp.load_state_dict(source.item_mlp.state_dict())
    return model


def transferred_parts(cfg: Config) -> list[str]:
    """What a source-initialised strategy takes from the source model."""
    return ["user_embeddings"] + (["user_tower", "item_tower"] if cfg.tower_hidden else [])


def _shared_mask(split: Split, n_users: int) -> torch.Tensor:
    """1 for user rows that may train while the shared user side is frozen (non-source users)."""
    mask = torch.ones(n_users)
    mask[torch.from_numpy(split.source_users)] = 0.0
    return mask


def train_strategy(
    name: str, split: Split, cfg: Config, device: torch.device, source: TwoTower | None
) -> tuple[TwoTower, dict[str, object]]:
    """Train the target model of one strategy; returns it and its training summary."""
    train, valid = split.train, split.valid
    if name == "target_only" or source is None:
        torch.manual_seed(cfg.seed + 7)
        model = new_model(cfg, split.n_users, split.n_target_items).to(device)
        r = _fit(model, train, valid, cfg, name, device, cfg.epochs)
        return model, _summary(r)
    if name == "anchored":
        model = _from_source(source, split, cfg, device)
        n_u = np.bincount(split.train[:, 0], minlength=split.n_users).astype(np.float32)
        w = torch.from_numpy(1.0 / (1.0 + n_u / cfg.anchor_tau))
        model.set_anchor(source.user_emb.weight.detach().cpu() * w[:, None])
        r = _fit(model, train, valid, cfg, name, device, cfg.epochs)
        model.set_anchor(None)
        return model, _summary(r)
    if name == "joint":
        return _joint(split, cfg, device, source)
    if name == "finetune":
        model = _from_source(source, split, cfg, device)
        scales = {"user_emb.weight": cfg.finetune_user_lr_scale}
        r = _fit(model, train, valid, cfg, name, device, cfg.epochs, lr_scales=scales)
        return model, _summary(r)
    mask = {"user_emb.weight": _shared_mask(split, split.n_users)}
    if name == "freeze_unfreeze":
        # phase 1 runs until validation stops improving (cap: freeze_epochs, 0 = epochs); phase 2
        # continues from phase 1's best state; if it does not improve validation, phase 1 is kept
        model = _from_source(source, split, cfg, device)
        for p in model.user_mlp.parameters():
            p.requires_grad_(False)
        cap = cfg.freeze_epochs or cfg.epochs
        r1 = _fit(model, train, valid, cfg, f"{name}/frozen", device, cap, grad_masks=mask)
        frozen_state = copy.deepcopy(model.state_dict())
        for p in model.parameters():
            p.requires_grad_(True)
        r2 = _fit(
            model,
            train,
            valid,
            cfg,
            f"{name}/unfrozen",
            device,
            cfg.epochs,
            lr=cfg.lr * cfg.unfreeze_lr_scale,
        )
        phases: dict[str, object] = {"frozen_epochs_run": r1.epochs_run, "frozen_cap": cap}
        if r2.shard_rows:
            phases["shard_rows"] = r2.shard_rows
        if r1.best_score >= r2.best_score:
            model.load_state_dict(frozen_state)
            return model, {
                "best_epoch": r1.best_epoch,
                "valid_ndcg@10": r1.best_score,
                "unfrozen": False,
                **phases,
            }
        return model, {
            "best_epoch": r1.best_epoch + r2.best_epoch,
            "valid_ndcg@10": r2.best_score,
            "unfrozen": True,
            **phases,
        }
    if name == "shared_private":
        model = _from_source(source, split, cfg, device, private_users=True)
        model.private_reg_scale = cfg.private_reg_scale
        for p in model.user_mlp.parameters():
            p.requires_grad_(False)
        r = _fit(model, train, valid, cfg, name, device, cfg.epochs, grad_masks=mask)
        return model, _summary(r)
    raise ValueError(f"unknown strategy {name!r}")


def _joint(
    split: Split, cfg: Config, device: torch.device, source: TwoTower
) -> tuple[TwoTower, dict[str, object]]:
    ns, nt = split.n_source_items, split.n_target_items
    torch.manual_seed(cfg.seed + 7)
    both = new_model(cfg, split.n_users, ns + nt).to(device)
    with torch.no_grad():
        both.user_emb.weight.copy_(source.user_emb.weight)
        both.item_emb.weight[:ns].copy_(source.item_emb.weight)
        if both.item_bias is not None and source.item_bias is not None:
            both.item_bias.weight[:ns].copy_(source.item_bias.weight)
    pairs = np.concatenate([split.source_train, split.train + np.array([0, ns])])
    weights = np.r_[
        np.full(len(split.source_train), cfg.joint_source_weight), np.ones(len(split.train))
    ]
    users, excl = _validator(split.valid, [split.train], cfg.seed)

    def validate(model: TwoTower) -> float:
        with torch.no_grad():
            u = model.user_vectors().detach().cpu()
            v = model.item_vectors().detach().cpu()[ns:]
        return full_ranking(u, v, split.valid, excl, users=users, ks=(10,))["ndcg@10"]

    r = _fit(
        both,
        pairs,
        split.valid,
        cfg,
        "joint",
        device,
        cfg.epochs,
        pair_weights=weights,
        validate=validate,
    )
    # the target model: the shared users and the target rows of the item side
    model = new_model(cfg, split.n_users, nt).to(device)
    with torch.no_grad():
        model.user_emb.weight.copy_(both.user_emb.weight)
        model.item_emb.weight.copy_(both.item_emb.weight[ns:])
        if model.item_bias is not None and both.item_bias is not None:
            model.item_bias.weight.copy_(both.item_bias.weight[ns:])
    model.user_mlp.load_state_dict(both.user_mlp.state_dict())
    model.item_mlp.load_state_dict(both.item_mlp.state_dict())
    model.eval()
    return model, _summary(r)


class Mapping(nn.Module):
    """EMCDR's mapping: an MLP from a user's source vector to the target space."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))
        self.skip = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x) + self.skip(x)
        return out


def fit_mapping(src: torch.Tensor, tgt: torch.Tensor, cfg: Config) -> Mapping:
    """Fit the mapping on (source vector, target vector) pairs of overlapping warm users.

    A tenth of the users is held out; the epoch with the lowest held-out error is kept.
    """
    torch.manual_seed(cfg.seed + 11)
    mapping = Mapping(src.shape[1], cfg.mapping_hidden)
    n = src.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 13))
    n_hold = max(1, n // 10) if n >= 10 else 0
    hold, fit_idx = perm[:n_hold], perm[n_hold:]
    opt = torch.optim.Adam(mapping.parameters(), lr=0.01, weight_decay=1e-4)
    best, best_state, bad = float("inf"), copy.deepcopy(mapping.state_dict()), 0
    for _ in range(cfg.mapping_epochs):
        opt.zero_grad()
        loss = (mapping(src[fit_idx]) - tgt[fit_idx]).pow(2).sum(1).mean()
        loss.backward()
        opt.step()
        if n_hold:
            with torch.no_grad():
                err = float((mapping(src[hold]) - tgt[hold]).pow(2).sum(1).mean())
            if err < best:
                best, best_state, bad = err, copy.deepcopy(mapping.state_dict()), 0
            else:
                bad += 1
                if bad >= 20:
                    break
    if n_hold:
        mapping.load_state_dict(best_state)
    logger.info("EMCDR mapping fitted on %d users, held-out squared error %.4f", n, best)
    mapping.eval()
    return mapping


def to_tables(
    model: TwoTower, split: Split, cfg: Config, source: TwoTower | None, native_cold: bool
) -> Tables:
    """Bake a trained model into tables and add the EMCDR rows for users without target history.

    Users with no target training history and no source history get the mean warm user vector.
    With ``native_cold`` false (target_only), source users without target history also get it.
    """
    with torch.no_grad():
        users = model.user_vectors().detach().cpu().clone()
        items = model.item_vectors().detach().cpu().clone()
    warm = split.target_train_users()
    has_target = np.zeros(split.n_users, dtype=bool)
    has_target[warm] = True
    has_source = np.zeros(split.n_users, dtype=bool)
    has_source[split.source_users] = True
    mean = users[torch.from_numpy(warm)].mean(0)
    unknown = ~has_target & (~has_source | (not native_cold))
    users[torch.from_numpy(unknown)] = mean
    tables = Tables(users=users, items=items)
    if source is not None:
        with torch.no_grad():
            src_vec = source.user_vectors().detach().cpu()
        fit_users = torch.from_numpy(np.flatnonzero(has_target & has_source))
        mapping = fit_mapping(src_vec[fit_users], users[fit_users], cfg)
        with torch.no_grad():
            mapped = mapping(src_vec)
            if model.item_bias is not None:
                mapped[:, -1] = 1.0  # the constant that carries the item bias
        cold = torch.from_numpy(~has_target & has_source)
        cold_rows = users.clone()
        cold_rows[cold] = mapped[cold]
        tables.cold_users = cold_rows
        tables.mapped_users = mapped.clone()
    return tables
