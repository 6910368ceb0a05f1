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
from training.served import Served, blend_tables, choose_rank
from training.served import by_history as by_history_tables
from training.trainer import (
    init_distributed,
    pick_device,
    release_workers,
    report_to_rank0,
    serve_fits,
    world,
)
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


def evaluate_published(
    repository: Path, domain: str, version: int, at: tuple[Split, np.ndarray, np.ndarray]
) -> dict[str, Any]:
    """Test metrics of a published retrieval version: user and item embeddings from its ONNX
    graphs under ONNX Runtime, scored by inner product (users it does not hold score zero)."""
    from training.export_onnx import served_tables

    split, warm, cold = at
    ids, users, items = served_tables(repository, domain, version)
    index = {u: i for i, u in enumerate(split.users)}
    table = torch.zeros(split.n_users, users.shape[1])
    table[torch.from_numpy(np.array([index[u] for u in ids], np.int64))] = torch.from_numpy(users)
    rows = segment_rows(table_scorer(table, torch.from_numpy(items)), split, warm, cold)
    rows["kind"] = "served_graph"
    rows["train"] = {"version": version}
    return rows


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
) -> tuple[dict[str, Any], dict[str, Tables], Split, Any, Served | None]:
    """Train and evaluate everything on the split of one cold-start share; also returns the
    tables chosen for export."""
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
    if run_dir is not None:
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
    block_selection, exported = _selection(
        cfg, rows, tables, baselines, validator, split, warm, cold, nodup
    )
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
    return block, tables, split, source_model, exported


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
) -> tuple[dict[str, Any], Served | None]:
    """Validation NDCG@10 of every row in its served form, the blend, which row validation
    chooses and the tables that are exported.

    Every row is validated as the tables it would be published as (training/served.py): the
    two-tower rows as they are, each baseline factorised at the rank its validation chooses, the
    blend concatenated from those. Warm users are chosen for on the validation split; users
    without target history on the cold-start validation users (``Split.cold_valid``), when the
    split has them; the exported tables serve each group with its chosen row. Only validation
    scores are read here; test metrics of the rows are reported, never compared.
    """
    cold_validator = Validator.cold(split)
    has_cold_valid = cold_validator.users.size > 0
    has_target = np.zeros(split.n_users, dtype=bool)
    has_target[split.train[:, 0]] = True
    validators = {"warm": validator} | ({"cold": cold_validator} if has_cold_valid else {})
    ranks = [int(r) for r in cfg.factor_ranks]
    served: dict[str, dict[str, Served]] = {seg: {} for seg in validators}
    factor_info: dict[str, Any] = {}
    t0 = time.perf_counter()
    for n, sel in baselines.items():
        if sel.linear is None:
            continue
        forms = choose_rank(n, sel.linear, validators, ranks)
        for seg, f in forms.items():
            served[seg][n] = f
        factor_info[n] = {
            seg: {
                "rank": f.info["rank"],
                "relative_frobenius_error": f.info["relative_frobenius_error"],
                "valid_ndcg@10": f.info["valid_ndcg@10"],
                "dense_valid_ndcg@10": (
                    float(sel.valid_ndcg) if seg == "warm" else cold_validator(sel.scorer)
                ),
                "grid": f.info["grid"],
            }
            for seg, f in forms.items()
        }
    logger.info("baselines factorised in %.1fs", time.perf_counter() - t0)
    model_row: str | None = None
    if tables:
        name = choose(cfg, {"strategies": rows}, tables)
        model_row = f"{name}+emcdr" if f"{name}+emcdr" in rows else name
    for n, r in rows.items():
        if r.get("kind") == "model":
            tab = tables[n.removesuffix("+emcdr")]
            users = (
                tab.cold_users if n.endswith("+emcdr") and tab.cold_users is not None else tab.users
            )
            form = Served(n, users, tab.items, mapped=tab.mapped_users)
            for seg in served:
                served[seg][n] = form
    valid = {n: validators["warm"](f.scorer()) for n, f in served["warm"].items()}
    valid_cold = (
        {n: cold_validator(f.scorer()) for n, f in served["cold"].items()} if has_cold_valid else {}
    )
    for seg, scores in (("warm", valid), ("cold", valid_cold)):
        for n, f in served.get(seg, {}).items():
            f.info["valid_ndcg@10"] = scores[n]
    dense_valid = {n: float(sel.valid_ndcg) for n, sel in baselines.items()}
    dense_valid_cold = (
        {n: factor_info[n]["cold"]["dense_valid_ndcg@10"] for n in baselines if n in factor_info}
        if has_cold_valid
        else {}
    )
    if cfg.blend and baselines and model_row is not None:
        # warm users: the best served baseline on warm validation; users without target history
        # (when cold-start validation users exist): the best cross-domain one on cold validation
        cross = [n for n in served["warm"] if n in CROSS_DOMAIN] or list(baselines)
        pool = list(baselines) if has_cold_valid else cross
        model_form = served["warm"][model_row]

        def fit(partner: str, seg: str) -> tuple[Served, dict[str, Any]]:
            base = served[seg][partner]
            as_selected = Selected(partner, {}, base.info["valid_ndcg@10"], base.scorer())
            mix = fit_blend(model_form.scorer(), as_selected, validators[seg])
            form = blend_tables(model_form, base, float(mix.params["weight"]))
            return form, mix.summary() | {"rank": base.info["rank"]}

        partner = select_on_validation({n: valid[n] for n in pool})
        form_w, train_info = fit(partner, "warm")
        train_info["model"] = model_row
        served["warm"]["blend"] = form_w
        scorer = form_w.scorer()
        valid["blend"] = validator(scorer)
        if has_cold_valid:
            partner_c = select_on_validation({n: valid_cold[n] for n in cross})
            form_c, train_info["cold"] = fit(partner_c, "cold")
            served["cold"]["blend"] = form_c
            valid_cold["blend"] = cold_validator(form_c.scorer())
            scorer = by_history_tables(has_target, form_w, form_c, "blend").scorer()
        rows["blend"] = segment_rows(scorer, split, warm, cold, nodup)
        rows["blend"]["train"] = train_info
        rows["blend"]["kind"] = "blend"
    out: dict[str, Any] = {
        "valid_ndcg@10": valid,
        "valid_cold_ndcg@10": valid_cold,
        "dense_valid_ndcg@10": dense_valid,
        "dense_valid_cold_ndcg@10": dense_valid_cold,
        "factorised": factor_info,
        "two_tower": model_row,
        "two_tower_valid_ndcg@10": valid[model_row] if model_row else None,
    }
    exported: Served | None = None
    if valid:  # with neural = false the baselines alone compete
        if cfg.export_strategy != "best" and model_row is not None:
            row_w = row_c = model_row
        else:
            row_w = select_on_validation(valid)
            row_c = select_on_validation(valid_cold) if has_cold_valid else row_w
        form_w = served["warm"][row_w]
        form_c = served["cold"][row_c] if has_cold_valid else form_w
        label = row_w if row_w == row_c else f"{row_w} (warm), {row_c} (cold)"
        exported = by_history_tables(has_target, form_w, form_c, label)
        exp_scorer = exported.scorer()
        out["exported"] = label
        out["exported_rows"] = {"warm": row_w, "cold": row_c}
        out["exported_valid_ndcg@10"] = validator(exp_scorer)
        if has_cold_valid:
            out["exported_valid_cold_ndcg@10"] = cold_validator(exp_scorer)
        out["exported_form"] = {
            seg: {
                "row": row,
                "dim": int(f.users.shape[1]),
                **{k: f.info[k] for k in ("rank", "relative_frobenius_error") if k in f.info},
                **(
                    {
                        "factorisation_valid_loss": factor_info[row][seg]["dense_valid_ndcg@10"]
                        - factor_info[row][seg]["valid_ndcg@10"]
                    }
                    if row in factor_info
                    else {}
                ),
                **({"blend": _blend_info(rows["blend"]["train"], seg)} if row == "blend" else {}),
            }
            for seg, row, f in (("warm", row_w, form_w), ("cold", row_c, form_c))
            if seg in validators or seg == "warm"
        }
        out["exported_form"]["dim"] = int(exported.users.shape[1])
        rows["exported"] = segment_rows(exp_scorer, split, warm, cold, nodup)
        rows["exported"]["train"] = {"rows": out["exported_rows"]}
        rows["exported"]["kind"] = "exported"
    for suffix, scores, dense in (
        ("", valid, dense_valid),
        ("_cold", valid_cold, dense_valid_cold),
    ):
        if not scores:
            continue
        out[f"chosen{suffix}"] = select_on_validation(scores)
        # the best baseline as evaluated in memory (its strongest form, before factorisation)
        base = {n: dense[n] for n in baselines if n in dense}
        if not base:
            continue
        best = select_on_validation(base)
        out[f"best_baseline{suffix}"] = best
        if exported is None:
            continue
        got = float(out[f"exported_valid{suffix}_ndcg@10"])
        below = got < base[best]
        out[f"exported_below_best_baseline{suffix}"] = below
        out[f"exported_vs_best_baseline_valid{suffix}"] = (
            got / base[best] - 1.0 if base[best] else 0.0
        )
        if below:
            logger.warning(
                "the exported model %s is below the best baseline %s on %s validation "
                "(%.4f vs %.4f in memory; factorisation loses the difference)",
                out["exported"],
                best,
                "cold-start" if suffix else "warm",
                got,
                base[best],
            )
    return out, exported


def _blend_info(train: dict[str, Any], seg: str) -> dict[str, Any]:
    """The partner, weight and partner rank of the blend that serves ``seg``."""
    part = train.get("cold", train) if seg == "cold" else train
    return {"model": train.get("model"), "rank": part.get("rank"), **part.get("params", {})}


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
        "mapped_table": (
            tab.mapped_users[torch.from_numpy(keep)].clone()
            if tab.mapped_users is not None
            else None
        ),
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
    if rank > 0:  # a training worker: rank 0 holds the data and sends it each fit's steps
        done = serve_fits(device)
        report_to_rank0({"rank": rank, **done, "peak_memory_mb": peak_memory_mb()})
        dist.barrier()
        dist.destroy_process_group()
        return {"rank": rank, "world_size": world_size, **done}
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
    exported_split: tuple[Split, np.ndarray, np.ndarray] | None = None
    for i, share in enumerate(cfg.cold_shares):
        block, tables, split, source_model, exported = run_share(
            cfg, dataset, share, device, source_model, run_dir, duplicate_items
        )
        results["shares"][str(share)] = block
        if i == 0 and exported is not None:
            name = exported.name
            metrics = {seg: block["strategies"]["exported"][seg] for seg in ("warm", "cold", "all")}
            # what validation says of the exported tables against every other row, and what
            # they are (the row of each user group, its rank and what factorising cost)
            sel = block["selection"]
            metrics["validation"] = {
                k: sel[k]
                for k in (
                    "chosen",
                    "chosen_cold",
                    "best_baseline",
                    "best_baseline_cold",
                    "two_tower",
                    "exported_rows",
                    "exported_form",
                    "exported_valid_ndcg@10",
                    "exported_valid_cold_ndcg@10",
                    "exported_below_best_baseline",
                    "exported_below_best_baseline_cold",
                )
                if k in sel
            }
            tab = Tables(users=exported.users, items=exported.items, mapped_users=exported.mapped)
            checkpoint = build_checkpoint(cfg, dataset, split, name, tab, metrics)
            exported_split = (split, *_segments(split))
            if cfg.ranker == "learned":
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
                    recent_share=cfg.ranker_recent_share,
                    folds=cfg.ranker_folds,
                )
                results["ranker"] = checkpoint["learned_ranker"]["info"] | {
                    "seconds": time.perf_counter() - t0
                }
            results["exported_strategy"] = checkpoint["strategy"]
            results["selection"] = block["selection"]
            results["popularity_gate"] = popularity_gate(name, block["selection"])
    results["seconds_total_train"] = time.perf_counter() - t_start
    if world_size > 1:  # every fit is done: the workers' reports, beside rank 0's own
        results["ranks"] = release_workers({"rank": 0, "peak_memory_mb": peak_memory_mb()})
    if checkpoint is None:  # nothing to export
        results["selection"] = results["shares"][str(cfg.cold_shares[0])]["selection"]
        logger.warning("no row to export: no checkpoint, nothing published")
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
        # the published graphs, evaluated as the retrieval service computes them
        assert exported_split is not None
        first = results["shares"][str(cfg.cold_shares[0])]
        first["strategies"]["served_graph"] = evaluate_published(
            repository, cfg.target, version, exported_split
        )
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
