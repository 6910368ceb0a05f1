"""Gateway benchmark: the whole stack (retrieval, two rankers, gateway) as processes on this
machine, driven by a load generator in separate processes at concurrency 1, 8 and 32 and at
request rates that rise (by --rate-step, from --start-rate) until p99 passes 100 ms or calls fail:
the breaking point is the highest rate that held. Every request retrieves 500 candidates and ranks
all of them.

Reports throughput, p50/p95/p99 latency, errors and degradations per phase, where the time goes
(retrieval, ranking, merging, response building and transport, from the services' own
histograms), and the recall of the approximate (HNSW) index against exact search.

    python -m bench.gateway                    # results in bench/results/gateway.{json,md}
    python -m bench.gateway --quick            # a short smoke run
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

from devtools.stack import recommend_load  # noqa: E402
from gateway.pipeline import split_shards  # noqa: E402

RESULTS = ROOT / "bench" / "results"


# --- the model --------------------------------------------------------------------------------


def build_repository(path: Path, n_users: int, n_items: int, dim: int, seed: int) -> Any:
    """A synthetic model with planted tastes, published in the training layout."""
    from devtools.tiny_models import make_tiny_model, publish_tiny_model

    model = make_tiny_model(
        n_users=n_users,
        n_cold=n_users // 10,
        n_items=n_items,
        clusters=16,
        dim=dim,
        seed=seed,
    )
    return publish_tiny_model(path, model)


# --- metrics scraping -------------------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def _sum(
    snapshot: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    total = 0.0
    for (metric, metric_labels), value in snapshot.items():
        if metric != name:
            continue
        present = dict(metric_labels)
        if all(present.get(k) == v for k, v in labels.items()):
            total += value
    return total


def mean_ms(before: dict, after: dict, histogram: str, **labels: str) -> float | None:
    count = _sum(after, f"{histogram}_count", **labels) - _sum(
        before, f"{histogram}_count", **labels
    )
    total = _sum(after, f"{histogram}_sum", **labels) - _sum(before, f"{histogram}_sum", **labels)
    return round(1000 * total / count, 3) if count > 0 else None


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return _sum(after, name, **labels) - _sum(before, name, **labels)


def _cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def run_phase(
    stack: Any,
    mode: str,
    value: float,
    duration_s: float,
    users: list[str],
    processes: int,
    timeout_s: float,
) -> dict[str, Any]:
    ports = {
        "gateway": stack.gateway.metrics_port,
        "retrieval": stack.retrieval.metrics_port,
        **{f"ranker{s}": p.metrics_port for s, p in stack.rankers.items()},
    }
    before = {name: scrape(port) for name, port in ports.items()}
    pids = {
        "gateway": stack.gateway.proc.pid,
        "retrieval": stack.retrieval.proc.pid,
        **{f"ranker{s}": p.proc.pid for s, p in stack.rankers.items()},
    }
    cpu_before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    workers = max(1, min(processes, int(value))) if mode == "concurrency" else processes
    procs = [
        ctx.Process(
            target=recommend_load,
            args=(
                stack.gateway.address,
                mode,
                value,
                duration_s,
                users,
                10,
                timeout_s,
                w,
                workers,
                queue,
            ),
        )
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    records: list[tuple[float, float, str, list[int], list[str]]] = []
    for _ in procs:
        records += queue.get(timeout=duration_s + 120)
    for p in procs:
        p.join(30)
    after = {name: scrape(port) for name, port in ports.items()}
    cpu_after = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    cpu_ms = {
        name: round(1000 * (cpu_after[name] - cpu_before[name]) / max(1, len(records)), 3)
        for name in pids
    }

    latencies = np.asarray([r[1] for r in records if r[2] == "OK"]) * 1000
    errors: dict[str, int] = {}
    degraded: dict[str, int] = {}
    reason_names = {
        1: "ranking_unavailable",
        2: "ranking_deadline",
        3: "ranking_partial",
        4: "retrieval_unavailable",
    }
    for _, _, code, reasons, _ in records:
        if code != "OK":
            errors[code] = errors.get(code, 0) + 1
        for r in set(reasons):
            degraded[reason_names.get(r, str(r))] = degraded.get(reason_names.get(r, str(r)), 0) + 1
    span = (max(r[0] + r[1] for r in records) - min(r[0] for r in records)) if records else 0.0
    g_before, g_after = before["gateway"], after["gateway"]
    ranker_names = [n for n in ports if n.startswith("ranker")]

    def ranker_mean(histogram: str) -> float | None:
        count = sum(delta(before[n], after[n], f"{histogram}_count") for n in ranker_names)
        total = sum(delta(before[n], after[n], f"{histogram}_sum") for n in ranker_names)
        return round(1000 * total / count, 3) if count > 0 else None

    breakdown = {
        "gateway_total": mean_ms(
            g_before, g_after, "recsys_gateway_stage_duration_seconds", stage="total"
        ),
        "retrieval_stage": mean_ms(
            g_before, g_after, "recsys_gateway_stage_duration_seconds", stage="retrieval"
        ),
        "retrieve_call_client": mean_ms(
            g_before, g_after, "recsys_gateway_upstream_duration_seconds", upstream="retrieval"
        ),
        "retrieve_call_server": mean_ms(
            before["retrieval"],
            after["retrieval"],
            "recsys_grpc_request_duration_seconds",
            grpc_method="Retrieve",
        ),
        "retrieval_search": mean_ms(
            before["retrieval"], after["retrieval"], "recsys_retrieval_search_duration_seconds"
        ),
        "ranking_stage": mean_ms(
            g_before, g_after, "recsys_gateway_stage_duration_seconds", stage="ranking"
        ),
        "rank_call_client": mean_ms(
            g_before, g_after, "recsys_gateway_upstream_duration_seconds", upstream="ranker"
        ),
        "rank_call_server": ranker_mean("recsys_grpc_request_duration_seconds"),
        "ranker_queue": ranker_mean("recsys_ranker_queue_duration_seconds"),
        "ranker_compute": ranker_mean("recsys_ranker_compute_duration_seconds"),
        "merge": mean_ms(g_before, g_after, "recsys_gateway_stage_duration_seconds", stage="merge"),
        "response_build": mean_ms(
            g_before, g_after, "recsys_gateway_stage_duration_seconds", stage="response"
        ),
        "recommend_server": mean_ms(
            g_before, g_after, "recsys_grpc_request_duration_seconds", grpc_method="Recommend"
        ),
        "client_observed": round(float(latencies.mean()), 3) if len(latencies) else None,
    }
    rank_calls = sum(
        delta(before[n], after[n], "recsys_grpc_requests_total", grpc_method="Rank")
        for n in ranker_names
    )
    ok = len(latencies)
    return {
        "mode": mode,
        "target": value,
        "duration_s": round(span, 2),
        "requests": len(records),
        "ok": ok,
        "throughput_rps": round(len(records) / span, 1) if span else 0.0,
        "latency_ms": {
            "p50": round(float(np.percentile(latencies, 50)), 2) if ok else None,
            "p95": round(float(np.percentile(latencies, 95)), 2) if ok else None,
            "p99": round(float(np.percentile(latencies, 99)), 2) if ok else None,
            "max": round(float(latencies.max()), 2) if ok else None,
        },
        "errors": errors,
        "degraded": degraded,
        "rank_calls_per_request": round(rank_calls / max(1, len(records)), 2),
        "time_breakdown_ms": breakdown,
        "cpu_ms_per_request": cpu_ms,
    }


# --- approximate search recall ----------------------------------------------------------------


def recall_benchmark(n_items: int, dim: int, queries: int, seed: int) -> dict[str, Any]:
    """Recall@k against exact inner-product search on a clustered synthetic catalogue, of the
    service's approximate index (HNSW over the inner product reduced to Euclidean distance) and,
    for comparison, of HNSW built on raw inner products."""
    import faiss

    from serving.retrieval.index import IndexOptions, build_faiss_index

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(64, dim)).astype(np.float32)
    items = (centers[rng.integers(0, 64, n_items)] + 0.5 * rng.normal(size=(n_items, dim))).astype(
        np.float32
    )
    users = (centers[rng.integers(0, 64, queries)] + 0.2 * rng.normal(size=(queries, dim))).astype(
        np.float32
    )
    options = IndexOptions(exact_search_max_items=0)
    exact, _ = build_faiss_index(items, IndexOptions(exact_search_max_items=n_items))
    out: dict[str, Any] = {"n_items": n_items, "dim": dim, "queries": queries, "configs": []}
    start = time.perf_counter()
    hnsw, kind = build_faiss_index(items, options)
    assert kind == "hnsw"
    out["hnsw_build_s"] = round(time.perf_counter() - start, 2)
    raw = faiss.IndexHNSWFlat(dim, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    raw.hnsw.efConstruction = options.hnsw_ef_construction
    raw.add(items)
    augmented = np.hstack([users, np.zeros((queries, 1), dtype=np.float32)])
    for k in (10, 100, 500):
        t = time.perf_counter()
        _, truth = exact.search(users, k)
        exact_ms = 1000 * (time.perf_counter() - t) / queries
        for ef in sorted({max(128, k), 2 * max(128, k), 4 * max(128, k)}):
            params = faiss.SearchParametersHNSW(efSearch=ef)  # type: ignore[attr-defined]
            t = time.perf_counter()
            _, got = hnsw.search(augmented, k, params=params)
            hnsw_ms = 1000 * (time.perf_counter() - t) / queries
            _, got_raw = raw.search(users, k, params=params)
            hits = sum(len(set(truth[i]) & set(got[i])) for i in range(queries))
            hits_raw = sum(len(set(truth[i]) & set(got_raw[i])) for i in range(queries))
            out["configs"].append(
                {
                    "k": k,
                    "ef_search": ef,
                    "recall": round(hits / (k * queries), 4),
                    "recall_raw_inner_product_hnsw": round(hits_raw / (k * queries), 4),
                    "hnsw_ms_per_query": round(hnsw_ms, 3),
                    "exact_ms_per_query": round(exact_ms, 3),
                }
            )
    return out


# --- report -----------------------------------------------------------------------------------


def _rates(fixed: str, start: float, step: float, most: float) -> list[float]:
    """The fixed rates, or the rising ones start, start * step, ... up to `most`."""
    if fixed:
        return [float(x) for x in fixed.split(",") if x]
    rates, rate = [], start
    while rate <= most:
        rates.append(round(rate, 1))
        rate *= step
    return rates


def _holds(phase: dict[str, Any]) -> bool:
    """p99 under 100 ms, no errors, and the rate was delivered (90 %)."""
    p99 = phase["latency_ms"]["p99"]
    return (
        p99 is not None
        and p99 < 100
        and not phase["errors"]
        and phase["throughput_rps"] >= 0.9 * phase["target"]
    )


def to_markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        "# Gateway benchmark",
        "",
        f"Run {result['started_at']} on {result['machine']['cpus']} CPUs ({result['machine']['platform']}); "
        f"everything (load generator, gateway, retrieval, {cfg['rankers']} rankers) on this machine, "
        f"shared with other work (load average {result['machine']['load_average_1_5_15_before']} "
        f"before, {result['machine']['load_average_1_5_15_after']} after: 1, 5, 15 min).",
        (
            f"Models: the trained repository {cfg['repository']} (books-retrieval and its "
            "books-ranker, fed the features retrieval returns); "
            if cfg.get("repository")
            else f"Catalogue: {cfg['n_items']} items, {cfg['n_users']} users, dim {cfg['dim']} "
            "(synthetic, planted tastes); "
        )
        + f"retrieval {cfg['retrieval_candidates']} candidates and "
        f"{cfg.get('popular_candidates', 0)} popular ones, all ranked in "
        f"{cfg.get('shards_per_request', cfg['ranker_shards'])} shard(s) per request (at most "
        f"{cfg['ranker_shards']}, each of at least {cfg.get('min_shard_size', 32)} candidates); "
        f"k = 10, exclude_seen; client deadline {cfg['timeout_s']} s.",
        "",
        "| phase | requests | throughput (req/s) | p50 ms | p95 ms | p99 ms | errors | degraded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in result["phases"]:
        name = f"{p['mode']} {p['target']:g}"
        lat = p["latency_ms"]
        lines.append(
            f"| {name} | {p['requests']} | {p['throughput_rps']} | {lat['p50']} | {lat['p95']} | "
            f"{lat['p99']} | {sum(p['errors'].values())} {p['errors'] or ''} | "
            f"{sum(p['degraded'].values())} {p['degraded'] or ''} |"
        )
    s = result["summary"]
    lines += [
        "",
        f"- Target (p99 <= 50 ms at 50 req/s, no errors): **{'met' if s['target_met'] else 'missed'}** "
        f"(p99 {s['p99_at_50_rps_ms']} ms, {s['errors_at_50_rps']} errors).",
        f"- Breaking point (highest rate with p99 < 100 ms, no errors, 90 % of the rate "
        f"delivered): **{s['breaking_point_rps']} req/s**; "
        + (
            f"the next rate, {s['first_failing_rate']} req/s, did not hold."
            if s["first_failing_rate"] is not None
            else "no rate tried failed (raise --max-rate)."
        ),
        f"- CPU per Recommend at the breaking point, summed over the service processes: "
        f"**{s['cpu_ms_per_recommend_total_at_breaking_point']} ms** "
        f"({s['cpu_ms_per_recommend_at_breaking_point']}).",
        "",
        "## Where the time goes (mean ms per request or call, per phase)",
        "",
        "Gateway stages from `recsys_gateway_stage_duration_seconds`; calls as the gateway sees them "
        "(`recsys_gateway_upstream_duration_seconds`) and as the servers see them "
        "(`recsys_grpc_request_duration_seconds`); the difference is transport, (de)serialization "
        "and event-loop wait.",
        "",
    ]
    keys = list(result["phases"][0]["time_breakdown_ms"]) if result["phases"] else []
    lines.append("| phase | " + " | ".join(keys) + " |")
    lines.append("|---" * (len(keys) + 1) + "|")
    for p in result["phases"]:
        row = [str(p["time_breakdown_ms"][k]) for k in keys]
        lines.append(f"| {p['mode']} {p['target']:g} | " + " | ".join(row) + " |")
    lines += [
        "",
        "## CPU per request (ms of CPU time per Recommend, by process)",
        "",
        "User plus system CPU time of each service process over the phase, divided by the requests "
        "of the phase; the machine has 2 cores for all of them and the load generator.",
        "",
    ]
    names = list(result["phases"][0]["cpu_ms_per_request"]) if result["phases"] else []
    lines.append("| phase | " + " | ".join(names) + " | total |")
    lines.append("|---" * (len(names) + 2) + "|")
    for p in result["phases"]:
        cpu = p["cpu_ms_per_request"]
        lines.append(
            f"| {p['mode']} {p['target']:g} | "
            + " | ".join(str(cpu[n]) for n in names)
            + f" | {round(sum(cpu.values()), 3)} |"
        )
    r = result.get("recall")
    if r:
        lines += [
            "",
            "## Approximate index recall (HNSW against exact inner product)",
            "",
            f"{r['n_items']} items, dim {r['dim']}, {r['queries']} queries, clustered synthetic data; "
            f"HNSW M=32, efConstruction=80, built in {r['hnsw_build_s']} s (1 thread).",
            "",
            "The service's HNSW searches the inner product reduced to Euclidean distance (items "
            "[x, sqrt(M - |x|^2)], query [q, 0]); HNSW built on raw inner products is shown for "
            "comparison.",
            "",
            "| k | efSearch | recall@k | recall@k, raw inner-product HNSW | HNSW ms/query | exact ms/query |",
            "|---|---|---|---|---|---|",
        ]
        for c in r["configs"]:
            lines.append(
                f"| {c['k']} | {c['ef_search']} | {c['recall']} | {c['recall_raw_inner_product_hnsw']} | "
                f"{c['hnsw_ms_per_query']} | {c['exact_ms_per_query']} |"
            )
    lines += ["", "Command: `" + result["command"] + "`", ""]
    return "\n".join(lines)


def gateway_defaults() -> dict[str, int]:
    """The gateway's default sharding and popular candidates: what the benchmark runs with
    unless told otherwise."""
    from gateway.config import GatewaySettings

    fields = GatewaySettings.model_fields
    names = ("ranker_shards", "min_shard_size", "popular_candidates")
    return {name: int(fields[name].default) for name in names}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument(
        "--rates", default="", help="fixed rates instead of the rising ones, e.g. 25,50,100"
    )
    parser.add_argument("--start-rate", type=float, default=50.0)
    parser.add_argument("--rate-step", type=float, default=1.25, help="factor between rates")
    parser.add_argument("--max-rate", type=float, default=5000.0)
    parser.add_argument("--n-items", type=int, default=20_000)
    parser.add_argument("--n-users", type=int, default=2_000)
    parser.add_argument("--dim", type=int, default=64)
    defaults = gateway_defaults()
    parser.add_argument(
        "--shards",
        type=int,
        default=defaults["ranker_shards"],
        help="the gateway's RANKER_SHARDS (default: the gateway's)",
    )
    parser.add_argument(
        "--min-shard-size",
        type=int,
        default=defaults["min_shard_size"],
        help="the gateway's MIN_SHARD_SIZE (default: the gateway's)",
    )
    parser.add_argument(
        "--popular",
        type=int,
        default=defaults["popular_candidates"],
        help="the gateway's POPULAR_CANDIDATES (default: the gateway's)",
    )
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--loadgen-processes", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1.0, help="client deadline, seconds")
    parser.add_argument("--recall-items", type=int, default=100_000)
    parser.add_argument("--output", type=Path, default=RESULTS / "gateway")
    parser.add_argument("--quick", action="store_true", help="short phases, small recall run")
    parser.add_argument(
        "--repository",
        type=Path,
        help="serve this trained repository's books models (e.g. a bench-system run of "
        "amazon_movies_to_books: books-ranker is then the learned ranker, fed the features "
        "retrieval returns) instead of the synthetic model",
    )
    return parser


def repository_users(repo: Path) -> list[str]:
    """The users of the latest books-retrieval version of a trained repository."""
    from recsys.repository import USERS_FILE, list_versions, read_users, version_dir

    versions = list_versions(repo, "books-retrieval")
    if not versions:
        raise SystemExit(f"{repo}: no books-retrieval version")
    return list(read_users(version_dir(repo, "books-retrieval", versions[-1]) / USERS_FILE).ids)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.duration, args.concurrency, args.recall_items = 3.0, "8", 20_000
        args.rates = args.rates or "50"

    from devtools.stack import Stack, StackOptions

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        tmp_path = Path(tmp)
        repo = tmp_path / "repo"
        logs = tmp_path / "logs"
        logs.mkdir()
        if args.repository is not None:
            repo = args.repository
            users = repository_users(repo)
            print(f"serving {repo}: {len(users)} users", flush=True)
        else:
            print(
                f"publishing a synthetic model: {args.n_items} items, {args.n_users} users",
                flush=True,
            )
            users = list(
                build_repository(repo, args.n_users, args.n_items, args.dim, seed=0).user_ids
            )
        options = StackOptions(
            ranker_slots=2,
            initial_rankers=2,
            retrieval_candidates=args.candidates,
            popular_candidates=args.popular,
            ranker_shards=args.shards,
            min_shard_size=args.min_shard_size,
            poll_interval_s=5.0,
            ranker_args=[],
            gateway_args=["--log-level=WARNING"],
            retrieval_args=["--log-level=WARNING"],
            warm_up_user=users[0],
        )
        print("starting retrieval, 2 rankers and the gateway", flush=True)
        stack = Stack(repo, logs, options)
        phases = []
        try:
            # Warm-up, not reported.
            run_phase(stack, "concurrency", 4, 2.0, users, 1, args.timeout)
            for c in [int(x) for x in args.concurrency.split(",") if x]:
                print(f"phase: concurrency {c}", flush=True)
                phases.append(
                    run_phase(
                        stack,
                        "concurrency",
                        c,
                        args.duration,
                        users,
                        args.loadgen_processes,
                        args.timeout,
                    )
                )
                print(
                    json.dumps(phases[-1]["latency_ms"]), phases[-1]["throughput_rps"], flush=True
                )
            for r in _rates(args.rates, args.start_rate, args.rate_step, args.max_rate):
                print(f"phase: rate {r:g}/s", flush=True)
                phases.append(
                    run_phase(
                        stack, "rate", r, args.duration, users, args.loadgen_processes, args.timeout
                    )
                )
                print(
                    json.dumps(phases[-1]["latency_ms"]), phases[-1]["throughput_rps"], flush=True
                )
                if not args.rates and not _holds(phases[-1]):
                    break  # the breaking point: higher rates only queue up
                p99 = phases[-1]["latency_ms"]["p99"]
                if p99 is None or p99 > 1000:
                    break  # saturated: higher rates only queue up
        finally:
            stack.stop()

    print("measuring HNSW recall", flush=True)
    recall = (
        recall_benchmark(args.recall_items, args.dim, 200, seed=1) if args.recall_items else None
    )
    rate_phases = [p for p in phases if p["mode"] == "rate"]
    at_50 = next((p for p in rate_phases if p["target"] == 50), None)
    holding = [p["target"] for p in rate_phases if _holds(p)]
    breaking = (
        next((p for p in rate_phases if p["target"] == max(holding)), None) if holding else None
    )
    summary = {
        "p99_at_50_rps_ms": at_50["latency_ms"]["p99"] if at_50 else None,
        "errors_at_50_rps": sum(at_50["errors"].values()) if at_50 else None,
        "target_met": bool(
            at_50
            and at_50["latency_ms"]["p99"] is not None
            and at_50["latency_ms"]["p99"] <= 50
            and not at_50["errors"]
        ),
        "max_rate_p99_under_100ms": max(holding) if holding else None,
        "breaking_point_rps": max(holding) if holding else None,
        "first_failing_rate": next((p["target"] for p in rate_phases if not _holds(p)), None),
        "cpu_ms_per_recommend_at_breaking_point": breaking["cpu_ms_per_request"]
        if breaking
        else None,
        "cpu_ms_per_recommend_total_at_breaking_point": round(
            sum(breaking["cpu_ms_per_request"].values()), 3
        )
        if breaking
        else None,
    }
    result = {
        "benchmark": "gateway",
        "started_at": started,
        "command": "python -m bench.gateway " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_1_5_15_before": load_before,
            "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        },
        "config": {
            "repository": str(args.repository) if args.repository else None,
            "n_items": args.n_items,
            "n_users": args.n_users,
            "dim": args.dim,
            "rankers": 2,
            "ranker_shards": args.shards,
            "min_shard_size": args.min_shard_size,
            "shards_per_request": len(
                split_shards(args.candidates + args.popular, args.shards, args.min_shard_size)
            ),
            "retrieval_candidates": args.candidates,
            "popular_candidates": args.popular,
            "timeout_s": args.timeout,
            "phase_duration_s": args.duration,
            "loadgen_processes": args.loadgen_processes,
        },
        "phases": phases,
        "summary": summary,
        "recall": recall,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
