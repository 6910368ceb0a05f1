"""System benchmark (``make bench-system``): the served pipeline, in-process over the exported
ONNX files (offline.local, the gateway's own Pipeline), on the test split of each pair:
NDCG@10 and Recall@10 of (a) retrieval order, (b) retrieval + the dot-product ranker,
(c) retrieval + the learned ranker, for warm and cold-start users, and candidate recall at the
retrieval depth beside the retrieval model's own full-catalogue recall at the same depth.

Each (pair, seed) trains once (``python -m training train``, cold share 0.2, publishing into a
repository of its own), then answers sampled test users three times. The validation items of a
user are left out of every answer (as the quality benchmark's full ranking does); the split is
the one training saved (``--users=0``: every test user of both segments). Results go to bench/results/system.{json,md}; pairs not rerun are kept. With --work, each
(pair, seed) keeps its training run and its measurement (measured-<users>.json), both reused.

    python -m bench.system [--pairs=amazon_movies_to_books,sport_to_cloth] [--seeds=0,1,2]
                           [--users=500] [--work=DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from gateway.pipeline import (
    Pipeline,
    PipelineConfig,
    Ranked,
    RankQuery,
    RecommendQuery,
    UpstreamError,
)
from offline.local import LocalRanker, LocalRetriever
from recsys.repository import list_versions
from training.data.splits import Split

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "training" / "configs"
RESULTS = ROOT / "bench" / "results"
DEFAULT_PAIRS = ("amazon_movies_to_books", "sport_to_cloth")
ORDERS = ("retrieval", "dot", "learned")
K = 10

logger = logging.getLogger(__name__)


class RetrievalOrder:
    """A ranker that never answers: the pipeline keeps retrieval order (what (a) measures)."""

    replicas = 1

    async def rank(self, query: RankQuery, *, replica: int, timeout: float) -> Ranked:
        raise UpstreamError("UNAVAILABLE", "retrieval order measured")


def train(
    pair: str, seed: int, data_dir: Path | None, work: Path, extra: list[str]
) -> tuple[Path, Path, float]:
    run_dir, repo = work / f"{pair}-s{seed}" / "run", work / f"{pair}-s{seed}" / "repo"
    if (run_dir / "results.json").is_file() and repo.is_dir():
        return (
            run_dir,
            repo,
            float(json.loads((run_dir / "results.json").read_text())["seconds_total"]),
        )
    cmd = [
        sys.executable,
        "-m",
        "training",
        "train",
        f"--config={CONFIGS / (pair + '.toml')}",
        f"--run-dir={run_dir}",
        f"--repository={repo}",
        f"--seed={seed}",
        "--cold_shares=0.2",
        "--threads=1",
        "--progress=false",
        "--log-level=WARNING",
        *extra,
    ]
    if data_dir is not None:
        cmd.append(f"--data-dir={data_dir}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training {pair} seed {seed} failed: {proc.stderr[-2000:]}")
    return run_dir, repo, time.perf_counter() - t0


def _group(pairs: np.ndarray) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for u, j in pairs:
        out.setdefault(int(u), []).append(int(j))
    return out


def metrics(answer: list[str], relevant: set[str]) -> tuple[float, float]:
    """NDCG@K and Recall@K of one answer."""
    gains = sum(1.0 / math.log2(i + 2) for i, item in enumerate(answer[:K]) if item in relevant)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(relevant), K)))
    hits = sum(1 for item in answer[:K] if item in relevant)
    return gains / ideal, hits / len(relevant)


async def evaluate(
    repo: Path, split: Split, domain: str, users_per_segment: int, seed: int
) -> dict[str, Any]:
    config = PipelineConfig()
    depth = config.retrieval_candidates + config.popular_candidates
    retriever = LocalRetriever(repo)
    index = retriever.index(domain)
    pipelines = {
        "retrieval": Pipeline(retriever, RetrievalOrder(), config),
        "dot": Pipeline(retriever, LocalRanker(repo, suffix="dot-ranker"), config),
        "learned": Pipeline(retriever, LocalRanker(repo), config),
    }
    items = split.target_items
    test, valid, train = _group(split.test), _group(split.valid), _group(split.train)
    cold_set = {int(u) for u in split.cold_users}
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for segment in ("warm", "cold"):
        users = sorted(u for u in test if (u in cold_set) == (segment == "cold"))
        users = [u for u in users if split.users[u] in index.user_rows]
        if 0 < users_per_segment < len(users):
            users = sorted(rng.choice(users, users_per_segment, replace=False).tolist())
        sums = {f"{o}_{m}": 0.0 for o in ORDERS for m in ("ndcg@10", "recall@10")}
        sums |= {"candidate_recall": 0.0, "ann_recall_at_depth": 0.0}
        ranking_s = {"dot": 0.0, "learned": 0.0}
        for u in users:
            user_id = split.users[u]
            relevant = {items[j] for j in test[u]}
            skip = {items[j] for j in valid.get(u, [])}
            for order, pipeline in pipelines.items():
                k = depth if order == "retrieval" else K + len(skip)
                result = await pipeline.recommend(
                    RecommendQuery(user_id, domain, k, exclude_seen=True), timeout=600.0
                )
                answer = [c.item_id for c in result.items if c.item_id not in skip]
                ndcg, recall = metrics(answer, relevant)
                sums[f"{order}_ndcg@10"] += ndcg
                sums[f"{order}_recall@10"] += recall
                if order == "retrieval":
                    sums["candidate_recall"] += len(relevant & set(answer)) / len(relevant)
                else:
                    ranking_s[order] += result.timings.get("ranking", 0.0)
            # The retrieval model alone over the whole catalogue, at the same depth.
            scores = index.item_embeddings @ index.user_embeddings[index.user_rows[user_id]]
            scores[train.get(u, [])] = -np.inf
            scores[valid.get(u, [])] = -np.inf
            # a catalogue smaller than the depth: every item is within it
            top = (
                np.argpartition(-scores, depth)[:depth]
                if depth < len(scores)
                else np.arange(len(scores))
            )
            sums["ann_recall_at_depth"] += len(relevant & {items[j] for j in top}) / len(relevant)
        n = max(1, len(users))
        out[segment] = {key: value / n for key, value in sums.items()} | {
            "users": len(users),
            "ranking_ms_per_request": {k: 1000 * v / n for k, v in ranking_s.items()},
        }
    out["depth"] = depth
    return out


def graph_cost(repo: Path, domain: str, n: int = 1000, runs: int = 300) -> dict[str, float]:
    """Median and p99 milliseconds of one session run of each ranker graph at n candidates on
    one CPU thread (ONNX Runtime alone, no batching or gRPC)."""
    import onnxruntime as ort

    out: dict[str, float] = {}
    rng = np.random.default_rng(0)
    for name in (f"{domain}-ranker", f"{domain}-dot-ranker"):
        version = list_versions(repo, name)[-1]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(
            str(repo / name / str(version) / "model.onnx"), options, ["CPUExecutionProvider"]
        )
        inputs = session.get_inputs()
        if [i.name for i in inputs] == ["features"]:
            feeds = {"features": rng.standard_normal((n, inputs[0].shape[1])).astype(np.float32)}
        else:
            feeds = {i.name: np.zeros(n, np.int64) for i in inputs}
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - t0)
        out[f"{name.removeprefix(domain + '-')}_ms_p50"] = 1000 * float(np.median(times))
        out[f"{name.removeprefix(domain + '-')}_ms_p99"] = 1000 * float(np.quantile(times, 0.99))
    return out


def quality_best(pair: str, share: str = "0.2") -> dict[str, Any] | None:
    """NDCG@10 of the quality benchmark's chosen row (the best on validation among baselines,
    two-tower strategies and the blend) for the pair and cold share, warm and cold, on the
    same metric protocol as this benchmark: full ranking (under ``loo``, its ``full`` columns,
    every item not seen in training or validation competing)."""
    path = RESULTS / "quality.json"
    if not path.is_file():
        return None
    job = json.loads(path.read_text()).get("jobs", {}).get(pair)
    if not job or share not in job.get("summary", {}):
        return None
    chosen = job["summary"][share]["roles"]["chosen"]
    full = job.get("protocol") == "loo"
    out: dict[str, Any] = {"protocol": job.get("protocol"), "names": chosen.get("names")}
    for segment in ("warm", "cold"):
        mean, sd, n = chosen[f"{'full ' if full else ''}{segment} ndcg@10"]
        out[segment] = {"mean": mean, "sd": sd, "n": n}
    return out


def _mean_sd(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for segment in ("warm", "cold"):
        keys = [k for k, v in runs[0][segment].items() if isinstance(v, float)]
        out[segment] = {k: _mean_sd([r[segment][k] for r in runs]) for k in keys}
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# System benchmark: retrieval order vs. the dot-product ranker vs. the learned ranker",
        "",
        "The served pipeline (gateway.pipeline over offline.local: the ONNX files and FAISS "
        "index the services load), test split, cold share 0.2, full-catalogue metrics at 10 "
        "(every item the system can return competes; validation items left out). "
        f"Depth: {results['depth']} candidates (500 personal/item-to-item + 50 popular). "
        "Mean ± sd over the seeds listed; the users column: test users per segment (every "
        "test user the model serves, or a sample of that many).",
        "",
        "| pair | users | seeds | (a) retrieval NDCG@10 | (b) dot NDCG@10 | (c) learned NDCG@10 "
        "| (c)/max(a,b) | quality best NDCG@10 | (c)/quality best | (a) R@10 | (b) R@10 | (c) R@10 "
        "| candidate recall | ANN recall@depth |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(stats: dict[str, float]) -> str:
        return f"{stats['mean']:.4f} ± {stats['sd']:.4f}"

    for pair, block in results["pairs"].items():
        for segment in ("warm", "cold"):
            s = block["summary"][segment]
            if block.get("train_args"):
                pair = f"{pair.split(' (')[0]} ({block['train_args']})"
            best = max(s["retrieval_ndcg@10"]["mean"], s["dot_ndcg@10"]["mean"])
            ratio = s["learned_ndcg@10"]["mean"] / best if best > 0 else float("nan")
            users = block["runs"][0][segment]["users"]
            q = (block.get("quality_best") or {}).get(segment)
            q_cell, q_ratio = "n/a", "n/a"
            if q and q["n"] and q["mean"] == q["mean"]:
                q_cell = f"{cell(q)} ({block['quality_best']['protocol']})"
                q_ratio = f"{s['learned_ndcg@10']['mean'] / q['mean']:.2f}×"
            lines.append(
                f"| {pair} {segment} | {users} | {','.join(map(str, block['seeds']))} | "
                f"{cell(s['retrieval_ndcg@10'])} | {cell(s['dot_ndcg@10'])} | "
                f"{cell(s['learned_ndcg@10'])} | {ratio:.2f}× | {q_cell} | {q_ratio} | "
                f"{cell(s['retrieval_recall@10'])} | {cell(s['dot_recall@10'])} | "
                f"{cell(s['learned_recall@10'])} | {cell(s['candidate_recall'])} | "
                f"{cell(s['ann_recall_at_depth'])} |"
            )
    lines += [
        "",
        "Validation (out of fold: every warm validation user ordered by the cross-fitted "
        "member that did not train on it; runs trained before cross-fitting, sport/cloth here, "
        "report the selection half; cold: the split's cold-start validation users, where "
        "recorded; seed order as above): NDCG@10 of retrieval order / dot / learned on the "
        "candidates.",
        "",
    ]
    for pair, block in results["pairs"].items():
        for seed, v in zip(block["seeds"], block["validation"], strict=True):
            lines.append(
                f"- {pair} seed {seed}: {v['retrieval']:.4f} / {v['dot']:.4f} / "
                f"{v['learned']:.4f} ({v['users']} users, candidate recall "
                f"{v['candidate_recall']:.3f})"
                + (
                    f"; cold {c['retrieval']:.4f} / {c['dot']:.4f} / {c['learned']:.4f} "
                    f"({c['users']} users)"
                    if (c := v.get("cold")) and c.get("users")
                    else ""
                )
            )
    dups = {p: b["duplicates"] for p, b in results["pairs"].items() if b.get("duplicates")}
    if dups:
        lines += ["", "Cross-domain duplicate products (training/duplicates.py), kept:", ""]
        for pair, d in dups.items():
            lines.append(
                f"- {pair}: {d['duplicated_target_items']} duplicated target items, "
                f"{d['share_of_target_positives']:.3f} of target positives (action {d['action']})"
            )
    lines += ["", "Ranking time per request in the pipeline (ms, in-process, one thread):", ""]
    for pair, block in results["pairs"].items():
        r = block["runs"][0]["warm"]["ranking_ms_per_request"]
        lines.append(f"- {pair}: dot {r['dot']:.2f}, learned {r['learned']:.2f}")
    lines += ["", "ONNX Runtime alone, one session run at 1,000 candidates, one thread (ms):", ""]
    for pair, block in results["pairs"].items():
        cost = block["runs"][0].get("graph_cost_1000", {})
        lines.append(
            f"- {pair}: learned p50 {cost.get('ranker_ms_p50', float('nan')):.3f} / p99 "
            f"{cost.get('ranker_ms_p99', float('nan')):.3f}; dot product p50 "
            f"{cost.get('dot-ranker_ms_p50', float('nan')):.3f} / p99 "
            f"{cost.get('dot-ranker_ms_p99', float('nan')):.3f}"
        )
    lines += ["", f"Training wall time per run (s): {results['train_seconds']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.system", description=__doc__)
    parser.add_argument("--pairs", default=",".join(DEFAULT_PAIRS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument(
        "--users", type=int, default=500, help="test users per segment (0: every one)"
    )
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None, help="keep runs here (reused)")
    parser.add_argument(
        "--train-args",
        default="",
        help="extra training options, space-separated (e.g. --strategies=finetune)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-system-"))
    results: dict[str, Any] = {"pairs": {}, "train_seconds": {}, "depth": None}
    for pair in args.pairs.split(","):
        runs, validation = [], []
        for seed in seeds:
            run_dir, repo, seconds = train(pair, seed, args.data_dir, work, args.train_args.split())
            results["train_seconds"][f"{pair}-s{seed}"] = round(seconds, 1)
            report = json.loads((run_dir / "results.json").read_text())
            domain = report["target"]
            assert list_versions(repo, f"{domain}-ranker"), f"nothing published for {pair}"
            cache = run_dir.parent / f"measured-{args.users}.json"
            if cache.is_file():  # this run was measured before (same run, same users)
                measured = json.loads(cache.read_text())
            else:
                split = Split.load(run_dir / "split-cold0.2")
                t0 = time.perf_counter()
                measured = asyncio.run(evaluate(repo, split, domain, args.users, seed))
                measured["seconds"] = time.perf_counter() - t0
                measured["graph_cost_1000"] = graph_cost(repo, domain)
                cache.write_text(json.dumps(measured) + "\n")
            results["depth"] = measured.pop("depth")
            runs.append(measured)
            validation.append(
                report["ranker"]["validation"] | {"cold": report["ranker"].get("validation_cold")}
            )
            duplicates = report.get("duplicates")
            print(f"{pair} seed {seed}: {json.dumps(measured)}", flush=True)  # noqa: T201
        results["pairs"][pair] = {
            "train_args": args.train_args,
            "seeds": seeds,
            "runs": runs,
            "summary": summarize(runs),
            "validation": validation,
            "quality_best": quality_best(pair),
            "duplicates": duplicates,
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    previous = RESULTS / "system.json"
    if previous.is_file():  # pairs measured before are kept (rerun a subset with --pairs)
        old = json.loads(previous.read_text())
        results["pairs"] = old.get("pairs", {}) | results["pairs"]
        results["train_seconds"] = old.get("train_seconds", {}) | results["train_seconds"]
    (RESULTS / "system.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "system.md").write_text(markdown(results))
    print(markdown(results))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
