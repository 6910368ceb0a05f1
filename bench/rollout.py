"""Rollout rehearsal on loopback, as Kubernetes would do it, under constant load:

1. a rolling update of the rankers: two replicas behind the gateway are replaced one at a time
   (start the new one, wait until its health says SERVING, SIGTERM the old one and let it drain);
2. a model version rollout through the repository: a new version is published while under load,
   and retrieval and the rankers pick it up by polling.

Reports failed requests (the target is zero), degraded answers, and latency percentiles per
window, and checks that no answer mixed ranker versions.

    python -m bench.rollout          # results in bench/results/rollout.{json,md}
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402

from devtools.stack import Stack, StackOptions, recommend_load  # noqa: E402
from devtools.tiny_models import make_tiny_model, publish_tiny_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"
REASONS = {
    1: "ranking_unavailable",
    2: "ranking_deadline",
    3: "ranking_partial",
    4: "retrieval_unavailable",
}


def loaded_versions(port: int, metric: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        s.labels["version"]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == metric and s.value == 1.0
    }


def summarise(records: list[Any]) -> dict[str, Any]:
    ok = np.asarray([r[1] for r in records if r[2] == "OK"]) * 1000
    errors: dict[str, int] = {}
    degraded: dict[str, int] = {}
    versions: dict[str, int] = {}
    for _, _, code, reasons, ranker_versions in records:
        if code != "OK":
            errors[code] = errors.get(code, 0) + 1
        for r in set(reasons):
            degraded[REASONS.get(r, str(r))] = degraded.get(REASONS.get(r, str(r)), 0) + 1
        key = ",".join(ranker_versions) or "none"
        versions[key] = versions.get(key, 0) + 1

    def pct(q: float) -> float | None:
        return round(float(np.percentile(ok, q)), 2) if len(ok) else None

    return {
        "requests": len(records),
        "failed": sum(errors.values()),
        "errors": errors,
        "degraded": degraded,
        "ranker_versions": versions,
        "mixed_versions": sum(1 for r in records if len(r[4]) > 1),
        "latency_ms": {
            "p50": pct(50),
            "p95": pct(95),
            "p99": pct(99),
            "max": round(float(ok.max()), 2) if len(ok) else None,
        },
    }


def to_markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        "# Rollout rehearsal",
        "",
        f"Run {result['started_at']} on {result['machine']['cpus']} CPUs; everything on this machine "
        f"(load average {result['machine']['load_average_1_5_15_before']} before, "
        f"{result['machine']['load_average_1_5_15_after']} after). "
        f"Constant load of {cfg['rate']} Recommend/s (k = 10, {cfg['retrieval_candidates']} candidates ranked "
        f"in {cfg['ranker_shards']} shards, client deadline {cfg['timeout_s']} s) from a separate process; "
        f"synthetic catalogue of {cfg['n_items']} items.",
        "",
        "Steps: " + "; ".join(f"{e['t_s']:.1f} s {e['event']}" for e in result["events"]) + ".",
        "",
        "| window | requests | failed | degraded | p50 ms | p95 ms | p99 ms | max ms | ranker versions in answers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, w in result["windows"].items():
        lat = w["latency_ms"]
        lines.append(
            f"| {name} | {w['requests']} | {w['failed']} {w['errors'] or ''} | "
            f"{sum(w['degraded'].values())} {w['degraded'] or ''} | {lat['p50']} | {lat['p95']} | "
            f"{lat['p99']} | {lat['max']} | {w['ranker_versions']} |"
        )
    total = result["windows"]["whole run"]
    lines += [
        "",
        f"- Failed requests over the whole run: **{total['failed']}** (target 0).",
        f"- Answers that mixed ranker versions: **{total['mixed_versions']}**.",
        "",
        "Command: `" + result["command"] + "`",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds between steps")
    parser.add_argument("--n-items", type=int, default=20_000)
    parser.add_argument("--n-users", type=int, default=2_000)
    parser.add_argument("--timeout", type=float, default=1.0, help="client deadline, seconds")
    parser.add_argument("--output", type=Path, default=RESULTS / "rollout")
    args = parser.parse_args()

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = [round(x, 2) for x in os.getloadavg()]
    events: list[tuple[float, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        repo, logs = Path(tmp) / "repo", Path(tmp) / "logs"
        logs.mkdir()

        def model(seed: int) -> Any:
            return make_tiny_model(
                n_users=args.n_users,
                n_cold=args.n_users // 10,
                n_items=args.n_items,
                clusters=16,
                dim=64,
                seed=seed,
            )

        first = publish_tiny_model(repo, model(0))
        options = StackOptions(
            ranker_slots=4,
            initial_rankers=2,
            retrieval_candidates=500,
            popular_candidates=0,
            ranker_shards=2,
            min_shard_size=32,
            poll_interval_s=1.0,
            grace_period_s=10.0,
            gateway_args=["--log-level=WARNING"],
        )
        print("starting retrieval, 2 rankers and the gateway", flush=True)
        stack = Stack(repo, logs, options)
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        stop = ctx.Event()
        load = ctx.Process(
            target=recommend_load,
            args=(
                stack.gateway.address,
                "rate",
                args.rate,
                3600.0,
                list(first.user_ids),
                10,
                args.timeout,
                0,
                1,
                results,
                stop,
            ),
        )
        try:
            load.start()
            t0 = time.time()

            def mark(event: str) -> None:
                events.append((time.time(), event))
                print(f"{time.time() - t0:6.1f} s  {event}", flush=True)

            time.sleep(args.settle)
            mark("rolling update starts: start ranker in slot 2")
            stack.start_ranker(2)
            mark("slot 2 SERVING; SIGTERM slot 0")
            stack.stop_ranker(0)
            mark("slot 0 drained and exited; start ranker in slot 3")
            stack.start_ranker(3)
            mark("slot 3 SERVING; SIGTERM slot 1")
            stack.stop_ranker(1)
            mark("slot 1 drained and exited: rolling update done")
            time.sleep(args.settle)
            newer = publish_tiny_model(repo, model(1))
            version = str(newer.version)
            mark(f"model rollout starts: version {version} published")
            deadline = time.time() + 120
            while time.time() < deadline:
                ports = [p.metrics_port for p in stack.rankers.values()]
                if version in loaded_versions(
                    stack.retrieval.metrics_port, "recsys_retrieval_model_loaded"
                ) and all(
                    loaded_versions(port, "recsys_ranker_model_loaded") == {version}
                    for port in ports
                ):
                    break
                time.sleep(0.2)
            mark(f"retrieval and both rankers serve version {version}: model rollout done")
            time.sleep(args.settle)
            mark("load stops")
            stop.set()
            records = results.get(timeout=60)
            load.join(30)
        finally:
            stop.set()
            if load.is_alive():
                load.terminate()
            stack.stop()

    def window(start: float, end: float) -> list[Any]:
        return [r for r in records if start <= r[0] < end]

    rolling = (events[0][0], events[4][0])
    model_rollout = (events[5][0], events[6][0])
    windows = {
        "before": summarise(window(0, rolling[0])),
        "rolling update of the rankers": summarise(window(*rolling)),
        "between": summarise(window(rolling[1], model_rollout[0])),
        "model version rollout": summarise(window(*model_rollout)),
        "after": summarise(window(model_rollout[1], float("inf"))),
        "whole run": summarise(records),
    }
    result = {
        "benchmark": "rollout",
        "started_at": started,
        "command": "python -m bench.rollout " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1_5_15_before": load_before,
            "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        },
        "config": {
            "rate": args.rate,
            "n_items": args.n_items,
            "n_users": args.n_users,
            "retrieval_candidates": 500,
            "ranker_shards": 2,
            "timeout_s": args.timeout,
            "poll_interval_s": 1.0,
        },
        "events": [{"t_s": round(t - t0, 2), "event": e} for t, e in events],
        "windows": windows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0 if windows["whole run"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
