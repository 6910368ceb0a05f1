"""Micro benchmark of the Rank API's id mapping, in-process (`make bench-vocab`): 1,000 item ids
of a parsed RankRequest to vocabulary indices, by a dict lookup per id, by the sorted-hash binary
search the ranker used before, and by the vectorised hash table (serving/ranking/vocab.py).

Times are CPU seconds of this thread (`time.thread_time`), the best of several repeats over 64
prepared requests, so that other jobs on a shared machine inflate them less than wall time.
Writes bench/results/vocab.json and vocab.md.

    python -m bench.vocab [--items=50000] [--candidates=1000] [--repeats=9]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


class SortedHashes:
    """The previous mapping (for comparison): sorted 64-bit str hashes and a binary search."""

    def __init__(self, ids: list[str]) -> None:
        hashes = np.fromiter(map(hash, ids), np.int64, len(ids))
        self.order = np.argsort(hashes, kind="stable")
        self.sorted = hashes[self.order]

    def lookup(self, ids: list[str]) -> np.ndarray:
        query = np.fromiter(map(hash, ids), np.int64, len(ids))
        pos = np.searchsorted(self.sorted, query)
        np.minimum(pos, len(self.sorted) - 1, out=pos)
        out = self.order[pos]
        out[self.sorted[pos] != query] = -1
        return out


def _dict_lookup(index: dict[str, int], ids: list[str]) -> np.ndarray:
    return np.fromiter(map(index.get, ids, repeat(-1)), np.int64, len(ids))


def vocabularies(n: int, seed: int) -> dict[str, list[str]]:
    """Two id styles: 'item123' (the synthetic models') and 10-character ASIN-like ids."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    asins = {"B" + "".join(row) for row in rng.choice(alphabet, (int(n * 1.01), 9))}
    return {"item<j>": [f"item{j}" for j in range(n)], "ASIN-like": sorted(asins)[:n]}


def measure(
    lookup: Callable[[list[str]], Any], payloads: list[bytes], repeats: int
) -> dict[str, float]:
    """Best and median CPU µs per request over `repeats` passes; every pass parses the requests
    afresh (fresh str objects, whose hashes are not cached yet) outside the timed part."""
    from recsys.v1 import ranking_pb2

    per_pass = []
    for _ in range(repeats):
        lists = [list(ranking_pb2.RankRequest.FromString(p).item_ids) for p in payloads]
        start = time.thread_time()
        for ids in lists:
            lookup(ids)
        per_pass.append((time.thread_time() - start) / len(lists))
    return {
        "best_us": 1e6 * min(per_pass),
        "median_us": 1e6 * float(np.median(per_pass)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vocab")
    args = parser.parse_args()

    from recsys.v1 import ranking_pb2
    from serving.ranking.vocab import HashTableVocabulary

    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(args.seed + 1)
    rows: list[dict[str, Any]] = []
    for style, ids in vocabularies(args.items, args.seed).items():
        index = {item: i for i, item in enumerate(ids)}
        start = time.thread_time()
        table = HashTableVocabulary(ids)
        build_ms = 1e3 * (time.thread_time() - start)
        sorted_hashes = SortedHashes(ids)
        picks = [rng.integers(0, len(ids), args.candidates) for _ in range(args.requests)]
        payloads = [
            ranking_pb2.RankRequest(item_ids=[ids[j] for j in pick]).SerializeToString()
            for pick in picks
        ]
        # Every method must give the same indices before it is timed.
        sample = list(ranking_pb2.RankRequest.FromString(payloads[0]).item_ids)
        want = picks[0]
        methods: dict[str, Callable[[list[str]], Any]] = {
            "str hashes only (the floor of both hash methods)": lambda ids: np.fromiter(
                map(hash, ids), np.int64, len(ids)
            ),
            "dict lookup per id (np.fromiter(map(dict.get)))": functools.partial(
                _dict_lookup, index
            ),
            "sorted hashes + np.searchsorted (before)": sorted_hashes.lookup,
            "hash table, vectorised probes (now)": table.lookup,
        }
        for name, lookup in methods.items():
            got = lookup(sample)
            if "floor" not in name and not np.array_equal(got, want):
                raise SystemExit(f"{name} maps the ids wrongly")
            timed = measure(lookup, payloads, args.repeats)
            rows.append({"ids": style, "method": name, **timed})
            print(f"{style:10} {name:52} {timed['best_us']:8.1f} µs", flush=True)
        rows[-1]["table_build_ms"] = build_ms
        rows[-1]["table_max_probes"] = table.max_probes

    result: dict[str, Any] = {
        "items": args.items,
        "candidates_per_request": args.candidates,
        "repeats": args.repeats,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "load_average_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Rank id mapping, in-process",
        "",
        f"{args.items:,} item ids in the vocabulary, {args.candidates:,} ids per request, CPU "
        f"time of one thread (best and median of {args.repeats} passes over {args.requests} "
        f"requests). Machine: {os.cpu_count()} CPUs shared with other jobs (1-minute load "
        f"average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after).",
        "",
        "| ids | method | best µs / request | median µs / request |",
        "|---|---|---|---|",
        *(
            f"| {r['ids']} | {r['method']} | {r['best_us']:.1f} | {r['median_us']:.1f} |"
            for r in rows
        ),
        "",
        "The Rank API's mapping is the table's lookup. Turning the protobuf field into str "
        "objects comes before every method and is not timed here.",
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
