"""The end-to-end run: load, split, pretrain the source, train every transfer strategy and the
baselines, evaluate them on the same split, write the report, save the checkpoint, publish."""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import distributed as dist

from training.baselines import (
    CROSS_DOMAIN,
    Selected,
    Validator,
    by_history,
    fit_baselines,
    fit_blend,
)
from training.config import Config
from training.data.dataset import Dataset, load_dataset
from training.data.splits import Split, check_split, make_split
from training.data.synthetic import make_synthetic
from training.duplicates import drop_items, find_duplicates, merge_items
from training.errors import ConfigError
from training.evaluate import Scorer, rank_full, rank_sampled, table_scorer
from training.model import TwoTower
from training.report import write_report
from training.trainer import init_distributed, pick_device, world
from training.transfer import (
    Tables,
    pretrain_source,
    to_tables,
    train_strategy,
    transferred_parts,
    validation_users,
)

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


def evaluate_scorer(scorer: Scorer, split: Split, subset: np.ndarray | None) -> dict[str, float]:
    """The protocol's test metrics of one scorer on a set of users (None: every test user)."""
    if subset is not None and subset.size == 0:
        return {}
    if split.protocol == "loo":
        assert split.negatives is not None
        return rank_sampled(scorer, split.test, split.negatives, users=subset)
    return rank_full(scorer, split.test, [split.train, split.valid], users=subset)


def segment_rows(
    scorer: Scorer,
    split: Split,
    warm: np.ndarray,
    cold: np.ndarray,
    nodup: Split | None = None,
) -> dict[str, Any]:
    """Warm, cold and all users; under ``loo`` also full-ranking metrics (key ``full``); with
    ``nodup`` (the split without test pairs on cross-domain duplicates) also key ``nodup``."""
    rows: dict[str, Any] = {
        "warm": evaluate_scorer(scorer, split, warm),
        "cold": evaluate_scorer(scorer, split, cold),
        "all": evaluate_scorer(scorer, split, None),
    }
    if split.protocol == "loo":
        excl = [split.train, split.valid]
        rows["full"] = {
            seg: (rank_full(scorer, split.test, excl, users=sub) if sub.size else {})
            for seg, sub in (("warm", warm), ("cold", cold))
        }
    if nodup is not None:
        rows["nodup"] = {
            seg: evaluate_scorer(scorer, nodup, sub)
            for seg, sub in (("warm", warm), ("cold", cold))
        }
    return rows


def without_items(split: Split, items: np.ndarray) -> Split | None:
    """The split with the test pairs on ``items`` removed (None when there are none)."""
    drop = np.isin(split.test[:, 1], items)
    if not drop.any():
        return None
    negs = None if split.negatives is None else split.negatives[~drop]
    return dataclasses.replace(split, test=split.test[~drop], negatives=negs)


def select_on_validation(valid: dict[str, float]) -> str:
    """The row with the best validation NDCG@10 (ties: the first listed)."""
    return max(valid, key=lambda n: (valid[n], -list(valid).index(n)))


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
    duplicate_items: list[str] | None = None,
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
    warm, cold = _segments(split)
    index = {it: i for i, it in enumerate(split.target_items)}
    dup_idx = np.array([index[i] for i in duplicate_items or [] if i in index], dtype=np.int64)
    nodup = without_items(split, dup_idx)
    rows: dict[str, Any] = {}
    tables: dict[str, Tables] = {}
    validator = Validator(split, validation_users(split, cfg.seed))
    t0 = time.perf_counter()
    # popularity always runs: publishing is gated on beating it (popularity_gate)
    names = list(dict.fromkeys(["popularity", *cfg.baselines]))
    baselines = fit_baselines(split, validator, names, cfg.ease_max_items)
    timings["baselines_fit"] = time.perf_counter() - t0
    for bname, sel in baselines.items():
        rows[bname] = segment_rows(sel.scorer, split, warm, cold, nodup)
        rows[bname]["train"] = sel.summary()
        rows[bname]["kind"] = "baseline"
    timings["baselines"] = time.perf_counter() - t0
    names = (
        ["target_only"] + [s for s in cfg.strategies if s != "emcdr"]
        if cfg.source
        else ["target_only"]
    )
    if not cfg.neural:
        names = []
    needs_source = any(n != "target_only" for n in names) or "emcdr" in cfg.strategies
    if cfg.source and cfg.neural and needs_source and source_model is None:
        t0 = time.perf_counter()
        source_model = pretrain_source(split, cfg, device)
        timings["pretrain_source"] = time.perf_counter() - t0
    for name in names:
        t0 = time.perf_counter()
        model: TwoTower | None = None
        info: dict[str, object] = {"valid_ndcg@10": -1.0}
        for reg in [float(r) for r in cfg.reg_grid] or [cfg.reg]:  # per-strategy L2, on validation
            cfg_r = dataclasses.replace(cfg, reg=reg)
            m, i = train_strategy(name, split, cfg_r, device, source_model)  # type: ignore[arg-type]
            i["reg"] = reg
            if float(i["valid_ndcg@10"]) > float(info["valid_ndcg@10"]):  # type: ignore[arg-type]
                model, info = m, i
        assert model is not None
        tab = to_tables(
            model,
            split,
            cfg,
            source_model if cfg.source else None,  # type: ignore[arg-type]
            native_cold=name != "target_only",
        )
        timings[name] = time.perf_counter() - t0
        if name != "target_only":
            info["transferred"] = transferred_parts(cfg)
        tab.info = info
        tables[name] = tab
        rows[name] = segment_rows(table_scorer(tab.users, tab.items), split, warm, cold, nodup)
        rows[name]["train"] = info
        rows[name]["kind"] = "model"
        if "emcdr" in cfg.strategies and tab.cold_users is not None:
            rows[f"{name}+emcdr"] = segment_rows(
                table_scorer(tab.cold_users, tab.items), split, warm, cold, nodup
            )
            rows[f"{name}+emcdr"]["train"] = info
            rows[f"{name}+emcdr"]["kind"] = "model"
        logger.info("cold share %s strategy %s done in %.1fs", share, name, timings[name])
    block_selection = _selection(cfg, rows, tables, baselines, validator, split, warm, cold, nodup)
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
            "cold_valid_users": int(np.unique(split.cold_valid[:, 0]).size),
            "test_pairs_on_duplicates": int(
                len(split.test) - (len(nodup.test) if nodup else len(split.test))
            ),
        },
        "seconds": timings,
        "selection": block_selection,
    }
    return block, tables, split, source_model


def _selection(
    cfg: Config,
    rows: dict[str, Any],
    tables: dict[str, Tables],
    baselines: dict[str, Selected],
    validator: Validator,
    split: Split,
    warm: np.ndarray,
    cold: np.ndarray,
    nodup: Split | None,
) -> dict[str, Any]:
    """Validation NDCG@10 of every row, the blend, and which row validation chooses.

    Warm users are chosen for on the validation split; users without target history on the
    cold-start validation users (``Split.cold_valid``), when the split has them. Only validation
    scores are read here; test metrics of the rows are reported, never compared.
    """
    model_row: str | None = None
    if tables:
        name = choose(cfg, {"strategies": rows}, tables)
        model_row = f"{name}+emcdr" if f"{name}+emcdr" in rows else name
    cold_validator = Validator.cold(split)
    has_cold_valid = cold_validator.users.size > 0

    def model_scorer(row: str) -> Scorer:
        tab = tables[row.removesuffix("+emcdr")]
        if row.endswith("+emcdr") and tab.cold_users is not None:
            return table_scorer(tab.cold_users, tab.items)
        return table_scorer(tab.users, tab.items)

    valid = {n: float(sel.valid_ndcg) for n, sel in baselines.items()}
    valid_cold: dict[str, float] = {}
    for n, r in rows.items():
        if r.get("kind") == "model":
            valid[n] = float(r["train"]["valid_ndcg@10"])
    if has_cold_valid:
        for n, sel in baselines.items():
            valid_cold[n] = cold_validator(sel.scorer)
        for n, r in rows.items():
            if r.get("kind") == "model":
                valid_cold[n] = cold_validator(model_scorer(n))
    if cfg.blend and baselines and model_row is not None:
        # warm users: the best baseline on warm validation; users without target history (when
        # cold-start validation users exist): the best cross-domain one on cold validation
        cross = [n for n in baselines if n in CROSS_DOMAIN] or list(baselines)
        pool = list(baselines) if has_cold_valid else cross
        partner = baselines[select_on_validation({n: valid[n] for n in pool})]
        mix = fit_blend(model_scorer(model_row), partner, validator)
        train_info: dict[str, Any] = mix.summary() | {"model": model_row}
        scorer, valid["blend"] = mix.scorer, float(mix.valid_ndcg)
        if has_cold_valid:
            partner_c = baselines[select_on_validation({n: valid_cold[n] for n in cross})]
            mix_c = fit_blend(model_scorer(model_row), partner_c, cold_validator)
            has_target = np.zeros(split.n_users, dtype=bool)
            has_target[split.train[:, 0]] = True
            scorer = by_history(has_target, mix.scorer, mix_c.scorer)
            valid_cold["blend"] = float(mix_c.valid_ndcg)
            train_info["cold"] = mix_c.summary()
        rows["blend"] = segment_rows(scorer, split, warm, cold, nodup)
        rows["blend"]["train"] = train_info
        rows["blend"]["kind"] = "blend"
    out: dict[str, Any] = {
        "valid_ndcg@10": valid,
        "valid_cold_ndcg@10": valid_cold,
        "exported": model_row,
        "exported_valid_ndcg@10": valid[model_row] if model_row else None,
    }
    for suffix, scores in (("", valid), ("_cold", valid_cold)):
        if not scores:
            continue
        out[f"chosen{suffix}"] = select_on_validation(scores)
        base = {n: scores[n] for n in baselines}
        if not base:
            continue
        best = select_on_validation(base)
        out[f"best_baseline{suffix}"] = best
        if model_row is None:
            continue
        below = scores[model_row] < base[best]
        out[f"exported_below_best_baseline{suffix}"] = below
        out[f"exported_vs_best_baseline_valid{suffix}"] = (
            scores[model_row] / base[best] - 1.0 if base[best] else 0.0
        )
        if below:
            logger.warning(
                "the exported model %s is below the best baseline %s on %s validation "
                "(%.4f vs %.4f); the benchmark reports the chosen row, not the exported one",
                model_row,
                best,
                "cold-start" if suffix else "warm",
                scores[model_row],
                base[best],
            )
    return out


def choose(cfg: Config, block: dict[str, Any], tables: dict[str, Tables]) -> str:
    if cfg.export_strategy != "best":
        if cfg.export_strategy not in tables:
            raise ConfigError(f"export_strategy: {cfg.export_strategy!r} was not trained")
        return cfg.export_strategy
    return max(tables, key=lambda n: float(block["strategies"][n]["train"]["valid_ndcg@10"]))


def popularity_gate(name: str, selection: dict[str, Any]) -> dict[str, Any]:
    """Validation NDCG@10 of the exported model beside popularity's, from the selection record
    (the same validation users for both).

    A model below popularity is published only with ``allow_below_popularity``; the report's first
    line says which of the two happened.
    """
    model = float(selection["exported_valid_ndcg@10"])
    pop = float(selection["valid_ndcg@10"]["popularity"])
    scores = {"model": model, "popularity": pop}
    below = not model > pop
    gate = {"strategy": name, "valid_ndcg@10": scores, "below_popularity": below}
    if below:
        gate["message"] = (
            f"exported strategy {name} has validation NDCG@10 {model:.4f}, not above "
            f"popularity's {pop:.4f}"
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
    duplicate_items: list[str] = []
    if cfg.source:
        dups = find_duplicates(
            dataset.domain(cfg.target).positives(cfg.rating_threshold),
            dataset.domain(cfg.source).positives(cfg.rating_threshold),
            jaccard=cfg.duplicate_jaccard,
        )
        results["duplicates"] = dups.summary() | {"action": cfg.duplicates}
        duplicate_items = dups.target_items
        if cfg.duplicates == "drop":
            dataset = drop_items(dataset, cfg.target, dups.target_items)
            duplicate_items = []
        elif cfg.duplicates == "merge":
            dataset = merge_items(dataset, cfg.target, cfg.source, dups)
            duplicate_items = []
    source_model = None
    checkpoint = None
    for i, share in enumerate(cfg.cold_shares):
        block, tables, split, source_model = run_share(
            cfg, dataset, share, device, source_model, run_dir, duplicate_items
        )
        results["shares"][str(share)] = block
        if i == 0 and tables:
            name = choose(cfg, block, tables)
            key = f"{name}+emcdr" if f"{name}+emcdr" in block["strategies"] else name
            metrics = {seg: block["strategies"][key][seg] for seg in ("warm", "cold", "all")}
            # what validation says of the exported model against every other row, so that the
            # published metadata states when a baseline or the blend did better on validation
            sel = block["selection"]
            metrics["validation"] = {
                k: sel[k]
                for k in (
                    "chosen",
                    "chosen_cold",
                    "best_baseline",
                    "best_baseline_cold",
                    "exported_valid_ndcg@10",
                    "exported_below_best_baseline",
                    "exported_below_best_baseline_cold",
                )
                if k in sel
            }
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
            results["selection"] = block["selection"]
            results["popularity_gate"] = popularity_gate(name, block["selection"])
    results["seconds_total_train"] = time.perf_counter() - t_start
    if checkpoint is None:  # neural = false: baselines only, nothing to export
        results["selection"] = results["shares"][str(cfg.cold_shares[0])]["selection"]
        logger.warning("neural = false: baselines evaluated only; no checkpoint, nothing published")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if checkpoint is not None:
            torch.save(checkpoint, run_dir / "checkpoint.pt")
            results["checkpoint"] = str(run_dir / "checkpoint.pt")
        gate = results.get("popularity_gate") or {}
        if (
            repository is not None
            and checkpoint is not None
            and gate.get("below_popularity")
            and not cfg.allow_below_popularity
        ):
            results["not_published"] = (
                f"{gate['message']}: nothing published to {repository} "
                "(--allow-below-popularity publishes it anyway)"
            )
        elif repository is not None and checkpoint is not None:
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
