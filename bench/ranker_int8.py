"""int8 of the learned ranker beside fp32 (``python -m bench.ranker_int8 --work=DIR``): for each
finished bench-system run under DIR (``<pair>-s<seed>/run``), the learned ranker quantised by
training/quantize.py (static, calibrated on its training examples' features), NDCG@10 of both
graphs on the ranker's warm and cold selection users, how alike they rank, and their sizes.
Results: bench/results/ranker_int8.{json,md}.

    python -m bench.ranker_int8 --work=/tmp/bench-system-runs [--runs=amazon_movies_to_books-s0]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

from training.ranker import int8_report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.ranker_int8", description=__doc__)
    parser.add_argument("--work", type=Path, required=True, help="bench-system's --work folder")
    parser.add_argument("--runs", default="", help="comma-separated <pair>-s<seed> (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS / "ranker_int8")
    return parser


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# The learned ranker in int8 beside fp32",
        "",
        "training/quantize.py's static int8 (QOperator, int8 weights per channel, uint8 "
        "activations, percentile calibration on the ranker's training examples' feature rows); "
        "NDCG@10 on the ranker's selection users' candidates (warm: validation items; cold: the "
        "split's cold-start validation users), the same candidates for both graphs.",
        "",
        "| run | warm fp32 | warm int8 | cold fp32 | cold int8 | Spearman (warm) | top-10 "
        "agreement (warm) | bytes fp32 / int8 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run, r in results["runs"].items():
        w, c = r["warm"], r["cold"]
        lines.append(
            f"| {run} | {w['fp32_ndcg@10']:.4f} | {w['int8_ndcg@10']:.4f} | "
            f"{c['fp32_ndcg@10']:.4f} | {c['int8_ndcg@10']:.4f} | {w['spearman_mean']:.4f} | "
            f"{w['top10_agreement']:.3f} | {r['bytes']['fp32']:,} / {r['bytes']['int8']:,} |"
        )
    for seg in ("warm", "cold"):
        deltas = [r[seg]["int8_ndcg@10"] - r[seg]["fp32_ndcg@10"] for r in results["runs"].values()]
        if deltas:
            lines.append("")
            lines.append(
                f"{seg}: int8 - fp32 NDCG@10 mean {statistics.fmean(deltas):+.4f} over "
                f"{len(deltas)} runs"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    wanted = [r for r in args.runs.split(",") if r]
    folders = sorted(p.parent.parent for p in args.work.glob("*-s*/run/checkpoint.pt"))
    runs = {f.name: f for f in folders if not wanted or f.name in wanted}
    if not runs:
        print(f"{args.work}: no finished runs", file=sys.stderr)  # noqa: T201
        return 2
    results: dict[str, Any] = {"runs": {}}
    for name, folder in runs.items():
        seed = int(name.rsplit("-s", 1)[1])
        results["runs"][name] = int8_report(folder / "run", seed)
        print(name, json.dumps(results["runs"][name]), flush=True)  # noqa: T201
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
