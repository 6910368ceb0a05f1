"""The end-to-end run: load, split, pretrain the source, train every transfer strategy and the
baselines, evaluate them on the same split, write the report, save the checkpoint, publish."""

from __future__ import annotations

import logging
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import distributed as dist

from training.config import Config
from training.data.dataset import Dataset, load_dataset
from training.data.splits import Split, check_split, make_split
from training.data.synthetic import make_synthetic
from training.errors import ConfigError
from training.evaluate import full_ranking, sampled_ranking
from training.report import write_report
from training.trainer import init_distributed, pick_device, world
from training.transfer import Tables, popularity_tables, pretrain_source, to_tables, train_strategy

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_data_dir() -> Path:
    """``$RECSYS_DATA_DIR``, else ``../shared/data`` next to the repository root."""
    env = os.environ.get("RECSYS_DATA_DIR")
    path = Path(env) if env else (REPO_ROOT / ".." / "shared" / "data").resolve()
    if not path.is_dir():
        raise ConfigError(f"no data directory at {path}; pass --data-dir or set RECSYS_DATA_DIR")
    return path


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def evaluate_tables(
    users: torch.Tensor, items: torch.Tensor, split: Split, subset: np.ndarray | None
) -> dict[str, float]:
    if subset is not None and subset.size == 0:
        return {}
    if split.protocol == "loo":
        assert split.negatives is not None
        return sampled_ranking(users, items, split.test, split.negatives, users=subset)
    return full_ranking(users, items, split.test, [split.train, split.valid], users=subset)


def _segments(split: Split) -> tuple[np.ndarray, np.ndarray]:
    test_users = np.unique(split.test[:, 0])
    cold = np.intersect1d(test_users, split.cold_users)
    warm = np.setdiff1d(test_users, cold)
    return warm, cold


def run_share(
    cfg: Config,
    dataset: Dataset,
    share: float,
    device: torch.device,
    source_model: torch.nn.Module | None,
    run_dir: Path | None,
) -> tuple[dict[str, Any], dict[str, Tables], Split, Any]:
    """Train and evaluate everything on the split of one cold-start share."""
    split = make_split(
        dataset,
        cfg.target,
        cfg.source or None,
        cfg.protocol,
        cfg.rating_threshold,
        cfg.k_core,
        cold_share=share,
        n_negatives=cfg.n_negatives,
        use_given_split=cfg.use_given_split,
        seed=cfg.seed,
    )
    check_split(split, cfg.target, cfg.source or None)
    if run_dir is not None and world()[0] == 0:
        split.save(run_dir / f"split-cold{share}")
    timings: dict[str, float] = {}
    if cfg.source and source_model is None:
        t0 = time.perf_counter()
        source_model = pretrain_source(split, cfg, device)
        timings["pretrain_source"] = time.perf_counter() - t0
    warm, cold = _segments(split)
    rows: dict[str, Any] = {}
    tables: dict[str, Tables] = {}
    pop = popularity_tables(split)
    rows["popularity"] = {
        "warm": evaluate_tables(pop.users, pop.items, split, warm),
        "cold": evaluate_tables(pop.users, pop.items, split, cold),
        "all": evaluate_tables(pop.users, pop.items, split, None),
    }
    names = (
        ["target_only"] + [s for s in cfg.strategies if s != "emcdr"]
        if cfg.source
        else ["target_only"]
    )
    for name in names:
        t0 = time.perf_counter()
        model, info = train_strategy(name, split, cfg, device, source_model)  # type: ignore[arg-type]
        tab = to_tables(
            model,
            split,
            cfg,
            source_model if cfg.source else None,  # type: ignore[arg-type]
            native_cold=name != "target_only",
        )
        timings[name] = time.perf_counter() - t0
        tab.info = info
        tables[name] = tab
        rows[name] = {
            "warm": evaluate_tables(tab.users, tab.items, split, warm),
            "cold": evaluate_tables(tab.users, tab.items, split, cold),
            "all": evaluate_tables(tab.users, tab.items, split, None),
            "train": info,
        }
        if "emcdr" in cfg.strategies and tab.cold_users is not None:
            rows[f"{name}+emcdr"] = {
                "warm": rows[name]["warm"],
                "cold": evaluate_tables(tab.cold_users, tab.items, split, cold),
                "all": evaluate_tables(tab.cold_users, tab.items, split, None),
                "train": info,
            }
        logger.info("cold share %s strategy %s done in %.1fs", share, name, timings[name])
    block = {
        "strategies": rows,
        "split": {
            "users": split.n_users,
            "target_items": split.n_target_items,
            "source_items": split.n_source_items,
            "train": len(split.train),
            "valid": len(split.valid),
            "test": len(split.test),
            "warm_test_users": int(warm.size),
            "cold_test_users": int(cold.size),
        },
        "seconds": timings,
    }
    return block, tables, split, source_model


def choose(cfg: Config, block: dict[str, Any], tables: dict[str, Tables]) -> str:
    if cfg.export_strategy != "best":
        if cfg.export_strategy not in tables:
            raise ConfigError(f"export_strategy: {cfg.export_strategy!r} was not trained")
        return cfg.export_strategy
    return max(tables, key=lambda n: float(block["strategies"][n]["train"]["valid_ndcg@10"]))


def popularity_gate(cfg: Config, split: Split, name: str, tab: Tables) -> dict[str, Any]:
    """Validation NDCG@10 of the exported model beside popularity's, on the same users.

    A model below popularity is published only with ``allow_below_popularity``; the report's first
    line says which of the two happened.
    """
    users = np.unique(split.valid[:, 0])
    if users.size > 3000:
        users = np.sort(np.random.default_rng(cfg.seed).choice(users, 3000, replace=False))
    pop = popularity_tables(split)
    scores = {
        key: full_ranking(u, v, split.valid, [split.train], users=users, ks=(10,))["ndcg@10"]
        for key, (u, v) in {
            "model": (tab.users, tab.items),
            "popularity": (pop.users, pop.items),
        }.items()
    }
    below = not scores["model"] > scores["popularity"]
    gate = {"strategy": name, "valid_ndcg@10": scores, "below_popularity": below}
    if below:
        gate["message"] = (
            f"exported strategy {name} has validation NDCG@10 {scores['model']:.4f}, not above "
            f"popularity's {scores['popularity']:.4f}"
        )
        logger.warning("%s", gate["message"])
    return gate


def build_checkpoint(
    cfg: Config, dataset: Dataset, split: Split, name: str, tab: Tables, metrics: dict[str, Any]
) -> dict[str, Any]:
    """Everything export needs: the tables, vocabularies and the config."""
    has_target = np.zeros(split.n_users, dtype=bool)
    has_target[split.train[:, 0]] = True
    has_source = np.zeros(split.n_users, dtype=bool)
    has_source[split.source_users] = True
    keep = np.flatnonzero(has_target | has_source)
    users_full = tab.cold_users if tab.cold_users is not None else tab.users
    order = np.argsort(split.train[:, 0], kind="stable")
    tr = split.train[order]
    counts = np.bincount(tr[:, 0], minlength=split.n_users)
    starts = np.r_[0, np.cumsum(counts)]
    indptr = np.r_[0, np.cumsum(counts[keep])].astype(np.int64)
    indices = np.concatenate([tr[starts[u] : starts[u + 1], 1] for u in keep] or [np.zeros(0)])
    return {
        "format": 1,
        "config": cfg.to_dict(),
        "dataset": dataset.name,
        "fingerprint": dataset.fingerprint,
        "source": cfg.source,
        "target": cfg.target,
        "strategy": f"{name}+emcdr" if tab.cold_users is not None else name,
        "metrics": metrics,
        "users": [split.users[u] for u in keep],
        "user_kinds": ["target" if has_target[u] else "mapped" for u in keep],
        "items": split.target_items,
        "titles": split.target_titles,
        "popularity": np.bincount(split.train[:, 1], minlength=split.n_target_items).tolist(),
        "seen": (indptr, indices.astype(np.int64)),
        "user_table": users_full[torch.from_numpy(keep)].clone(),
        "item_table": tab.items.clone(),
    }


def run(
    cfg: Config, data_dir: Path | None, run_dir: Path, repository: Path | None
) -> dict[str, Any]:
    """The whole pipeline; returns the results (also written to ``run_dir``)."""
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    init_distributed(device)
    rank, world_size = world()
    torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg.dataset == "synthetic":
        dataset = make_synthetic(seed=cfg.seed)
    else:
        dataset = load_dataset((data_dir or default_data_dir()) / cfg.dataset)
    if cfg.source and cfg.source == cfg.target:
        raise ConfigError("source and target must be different domains")
    results: dict[str, Any] = {
        "dataset": dataset.name,
        "fingerprint": dataset.fingerprint,
        "source": cfg.source,
        "target": cfg.target,
        "protocol": cfg.protocol,
        "config": cfg.to_dict(),
        "data_stats": {name: d.stats for name, d in dataset.domains.items()},
        "device": str(device),
        "world_size": world_size,
        "shares": {},
    }
    source_model = None
    checkpoint = None
    for i, share in enumerate(cfg.cold_shares):
        block, tables, split, source_model = run_share(
            cfg, dataset, share, device, source_model, run_dir
        )
        results["shares"][str(share)] = block
        if i == 0:
            name = choose(cfg, block, tables)
            key = f"{name}+emcdr" if f"{name}+emcdr" in block["strategies"] else name
            metrics = {seg: block["strategies"][key][seg] for seg in ("warm", "cold", "all")}
            checkpoint = build_checkpoint(cfg, dataset, split, name, tables[name], metrics)
            if cfg.ranker == "learned" and rank == 0:
                from training.ranker import fit_second_stage

                t0 = time.perf_counter()
                checkpoint |= fit_second_stage(
                    split,
                    checkpoint,
                    depth=cfg.ranker_depth,
                    popular=cfg.ranker_popular,
                    max_users=cfg.ranker_users,
                    n_neighbours=cfg.neighbours,
                    seed=cfg.seed,
                    cold_share=cfg.ranker_cold_share,
                )
                results["ranker"] = checkpoint["learned_ranker"]["info"] | {
                    "seconds": time.perf_counter() - t0
                }
            results["exported_strategy"] = checkpoint["strategy"]
            results["popularity_gate"] = popularity_gate(cfg, split, name, tables[name])
    results["seconds_total_train"] = time.perf_counter() - t_start
    assert checkpoint is not None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, run_dir / "checkpoint.pt")
        results["checkpoint"] = str(run_dir / "checkpoint.pt")
        gate = results["popularity_gate"]
        if repository is not None and gate["below_popularity"] and not cfg.allow_below_popularity:
            results["not_published"] = (
                f"{gate['message']}: nothing published to {repository} "
                "(--allow-below-popularity publishes it anyway)"
            )
        elif repository is not None:
            from training.export_onnx import publish

            t0 = time.perf_counter()
            version = publish(checkpoint, repository, cfg.seed)
            results["published"] = {
                "repository": str(repository),
                "version": version,
                "models": [f"{cfg.target}-ranker", f"{cfg.target}-retrieval"]
                + ([f"{cfg.target}-dot-ranker"] if "learned_ranker" in checkpoint else []),
                "seconds": time.perf_counter() - t0,
            }
        results["seconds_total"] = time.perf_counter() - t_start
        results["peak_memory_mb"] = peak_memory_mb()
        write_report(results, run_dir)
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return results
