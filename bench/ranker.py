"""Benchmark of the ranking service against the raw ONNX Runtime ceiling (`make bench-ranker`).

Builds a DLRM-sized ranker (64-dim user and item embeddings, an MLP over [u, v, u*v] of
192-256-128-1; or `--repository` to use a trained one), then in one run:

- the ceiling: the same ONNX session, same thread settings, run in this process on batches of
  the request size (1,000 candidates) and of the sizes dynamic batching forms;
- the service (`python -m serving.ranking` as its own process) driven by bench/loadgen.py client
  processes sending 1,000-candidate Rank requests at concurrency 1, 8 and 32, with dynamic
  batching on (the defaults) and off (MAX_QUEUE_DELAY_US=0).

Writes bench/results/ranker.json and ranker.md and prints the table.

    python -m bench.ranker [--duration-s=8] [--repository=model_repository --model=books-ranker]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
from bench.loadgen import LoadResult, UnaryBytesCall, run_load  # noqa: E402

RANK_METHOD = "/recsys.v1.RankingService/Rank"


# -- the model -------------------------------------------------------------------------------------


def dlrm_ranker_graph(n_users: int, n_items: int, dim: int = 64, seed: int = 0) -> Any:
    """score = MLP([u, v, u*v]) with layers 3*dim-256-128-1 (ReLU), u/v gathered from tables."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from recsys.repository.layout import ITEM_INPUT, SCORE_OUTPUT, USER_INPUT

    rng = np.random.default_rng(seed)

    def weight(rows: int, cols: int) -> Any:
        return (rng.normal(size=(rows, cols)) / np.sqrt(rows)).astype(np.float32)

    inits = {
        "U": (0.3 * rng.normal(size=(n_users, dim))).astype(np.float32),
        "V": (0.3 * rng.normal(size=(n_items, dim))).astype(np.float32),
        "W1": weight(3 * dim, 256),
        "b1": np.zeros(256, np.float32),
        "W2": weight(256, 128),
        "b2": np.zeros(128, np.float32),
        "W3": weight(128, 1),
        "axes": np.array([1], dtype=np.int64),
    }
    nodes = [
        helper.make_node("Gather", ["U", USER_INPUT], ["u"], axis=0),
        helper.make_node("Gather", ["V", ITEM_INPUT], ["v"], axis=0),
        helper.make_node("Mul", ["u", "v"], ["uv"]),
        helper.make_node("Concat", ["u", "v", "uv"], ["x"], axis=1),
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h1_pre"]),
        helper.make_node("Relu", ["h1_pre"], ["h1"]),
        helper.make_node("Gemm", ["h1", "W2", "b2"], ["h2_pre"]),
        helper.make_node("Relu", ["h2_pre"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W3"], ["s"]),
        helper.make_node("ReduceSum", ["s", "axes"], [SCORE_OUTPUT], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "dlrm_ranker",
        [
            helper.make_tensor_value_info(USER_INPUT, TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info(ITEM_INPUT, TensorProto.INT64, ["N"]),
        ],
        [helper.make_tensor_value_info(SCORE_OUTPUT, TensorProto.FLOAT, ["N"])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def publish_bench_model(repo: Path, name: str, n_users: int, n_items: int) -> int:
    """Publish the DLRM-sized ranker as a version of `name` in `repo`."""
    import onnx

    from recsys.repository import (
        ITEMS_FILE,
        MODEL_FILE,
        RANKER_SIGNATURE,
        USERS_FILE,
        VersionPublisher,
        write_items,
        write_users,
    )

    with VersionPublisher(repo, [name]) as pub:
        d = pub.describe(
            name,
            kind="ranker",
            signature=RANKER_SIGNATURE,
            metadata={
                "domain": "bench",
                "opset": 17,
                "embedding_dim": 64,
                "strategy": "synthetic DLRM-sized MLP for benchmarks",
            },
        )
        onnx.save(dlrm_ranker_graph(n_users, n_items), d / MODEL_FILE)
        write_users(d / USERS_FILE, [f"user{i}" for i in range(n_users)])
        write_items(d / ITEMS_FILE, [f"item{j}" for j in range(n_items)])
    assert pub.version is not None
    return pub.version


def load_vocabulary(repo: Path, name: str) -> tuple[int, list[str], list[str], Path]:
    from recsys.repository import (
        ITEMS_FILE,
        MODEL_FILE,
        USERS_FILE,
        list_versions,
        read_items,
        read_users,
        version_dir,
    )

    versions = list_versions(repo, name)
    if not versions:
        raise SystemExit(f"no versions of {name} in {repo}")
    d = version_dir(repo, name, versions[-1])
    users = read_users(d / USERS_FILE).ids
    items = read_items(d / ITEMS_FILE).ids
    return versions[-1], users, items, d / MODEL_FILE


# -- the ceiling -----------------------------------------------------------------------------------


def measure_ceiling(
    model_path: Path,
    n_users: int,
    n_items: int,
    batch: int,
    *,
    providers: list[str],
    intra_op_threads: int = 0,
    seconds: float = 3.0,
) -> dict[str, float]:
    """Candidates/s of one session run back to back in this process on batches of `batch`."""
    import numpy as np
    import onnxruntime as ort

    from recsys.repository.layout import ITEM_INPUT, SCORE_OUTPUT, USER_INPUT

    if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
    rng = np.random.default_rng(0)
    feeds = {
        USER_INPUT: rng.integers(0, n_users, batch).astype(np.int64),
        ITEM_INPUT: rng.integers(0, n_items, batch).astype(np.int64),
    }
    for _ in range(3):
        session.run([SCORE_OUTPUT], feeds)
    runs, start = 0, time.perf_counter()
    times = []
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        session.run([SCORE_OUTPUT], feeds)
        times.append(time.perf_counter() - t0)
        runs += 1
    elapsed = time.perf_counter() - start
    return {
        "batch": batch,
        "runs": runs,
        "candidates_per_s": runs * batch / elapsed,
        "run_p50_ms": float(np.percentile(times, 50) * 1000),
        "provider": session.get_providers()[0],
    }


# -- the service -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _flag(key: str, value: Any) -> str:
    """A settings flag: booleans are --name / --no-name, the rest --name=value."""
    name = key.replace("_", "-")
    if str(value).lower() in ("true", "false"):
        return f"--{name}" if str(value).lower() == "true" else f"--no-{name}"
    return f"--{name}={value}"


class Service:
    """`python -m serving.ranking` as a child process, stopped with SIGTERM."""

    def __init__(self, repo: Path, model: str, log: Path, **settings: Any) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        args = [
            sys.executable,
            "-m",
            "serving.ranking",
            "--host=127.0.0.1",
            f"--port={self.port}",
            f"--metrics-port={self.metrics_port}",
            f"--model-repository={repo}",
            f"--models={model}",
            "--poll-interval-s=0",
            "--log-level=WARNING",
            *[_flag(k, v) for k, v in settings.items()],
        ]
        env = dict(os.environ)
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            args, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT
        )
        self.log_path = log

    def wait_ready(self, timeout: float = 180) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"ranker exited: {self.log_path.read_text()[-3000:]}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"ranker not SERVING: {self.log_path.read_text()[-3000:]}")

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return str(urllib.request.urlopen(url, timeout=10).read().decode())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` in a Prometheus text page."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def rank_payloads(
    model: str, users: list[str], items: list[str], candidates: int, pool: int = 64, seed: int = 1
) -> tuple[bytes, ...]:
    import numpy as np

    from recsys.v1 import ranking_pb2

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(pool):
        request = ranking_pb2.RankRequest(
            model_name=model,
            user_id=users[int(rng.integers(0, len(users)))],
            item_ids=[items[int(j)] for j in rng.integers(0, len(items), candidates)],
        )
        out.append(request.SerializeToString())
    return tuple(out)


def drive(
    service: Service,
    payloads: tuple[bytes, ...],
    candidates: int,
    concurrency: int,
    *,
    model: str,
    duration_s: float,
    warmup_s: float,
    processes: int,
) -> dict[str, Any]:
    """One load point, with the batch sizes the server formed meanwhile (from its metrics)."""
    before = service.metrics()
    factory = UnaryBytesCall(service.address, RANK_METHOD, payloads, (candidates,) * len(payloads))
    result: LoadResult = run_load(
        factory,
        concurrency=concurrency,
        duration_s=duration_s,
        warmup_s=warmup_s,
        processes=processes,
    )
    after = service.metrics()

    def delta(name: str) -> float:
        return metric_value(after, name, model=model) - metric_value(before, name, model=model)

    runs = delta("recsys_ranker_batch_requests_count")
    point = result.as_dict()
    point["mean_batch_requests"] = delta("recsys_ranker_batch_requests_sum") / runs if runs else 0.0
    point["mean_batch_candidates"] = (
        delta("recsys_ranker_batch_candidates_sum") / runs if runs else 0.0
    )
    point["session_runs"] = int(runs)
    return point


def _table(rows: list[dict[str, Any]], ceiling: float) -> str:
    lines = [
        "| batching | candidates/request | concurrency | client procs | req/s | candidates/s | % of ceiling | p50 ms | p95 ms | p99 ms | errors | mean batch (req / cand) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batching']} | {r['candidates']:,} | {r['concurrency']} | {r['processes']} | "
            f"{r['requests_per_s']:.1f} | "
            f"{r['items_per_s']:,.0f} | {100 * r['items_per_s'] / ceiling:.0f}% | {r['p50_ms']:.1f} | "
            f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | "
            f"{r['mean_batch_requests']:.1f} / {r['mean_batch_candidates']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, help="benchmark a model of this repository")
    parser.add_argument("--model", default="bench-ranker", help="model name (with --repository)")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument(
        "--cpu-batch-candidates",
        type=int,
        default=2048,
        help="MAX_BATCH_CANDIDATES of the CPU-tuned batching configuration",
    )
    parser.add_argument(
        "--small-candidates",
        type=int,
        default=100,
        help="also measure requests this small at the highest concurrency (0: skip)",
    )
    parser.add_argument("--processes", type=int, default=2, help="client processes (at most)")
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--ceiling-s", type=float, default=4.0)
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=1,
        help="the server's ONNX Runtime threads (default 1: clients share the cores)",
    )
    parser.add_argument(
        "--server-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra ranker setting for both runs, e.g. allow_spinning=false (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ranker")
    args = parser.parse_args()

    load_before = os.getloadavg()
    levels = [int(c) for c in args.concurrency.split(",")]
    extra = dict(item.split("=", 1) for item in args.server_setting)
    with tempfile.TemporaryDirectory(prefix="bench-ranker-") as tmp:
        tmpdir = Path(tmp)
        if args.repository is None:
            repo = tmpdir / "repo"
            publish_bench_model(repo, args.model, args.users, args.items)
            source = f"synthetic DLRM-sized ranker ({args.users} users, {args.items} items, dim 64, MLP 192-256-128-1)"
        else:
            repo = args.repository
            source = f"{args.model} from {repo}"
        version, users, items, model_path = load_vocabulary(repo, args.model)
        print(f"model: {source}, version {version}", flush=True)

        # The ceiling at every thread setting (the server's and ONNX Runtime's default of one
        # thread per core); the comparison uses the best of them at the request size.
        ceilings = []
        for batch in sorted({args.candidates, 8 * args.candidates, 16384}):
            for threads in sorted({args.intra_op_threads, 0}):
                c = measure_ceiling(
                    model_path,
                    len(users),
                    len(items),
                    batch,
                    providers=["CPUExecutionProvider"],
                    intra_op_threads=threads,
                    seconds=args.ceiling_s,
                )
                c["intra_op_threads"] = threads
                ceilings.append(c)
                print(
                    f"ceiling batch {batch}, intra-op threads {threads or 'default'}: "
                    f"{c['candidates_per_s']:,.0f} candidates/s ({c['run_p50_ms']:.2f} ms/run)",
                    flush=True,
                )
        ceiling = max(c["candidates_per_s"] for c in ceilings if c["batch"] == args.candidates)

        payloads = rank_payloads(args.model, users, items, args.candidates)
        small_payloads = rank_payloads(args.model, users, items, args.small_candidates or 1)
        # Every configuration runs at once (idle when not driven) and the points alternate
        # between them, so that the load of other jobs on the machine drifts evenly over all.
        configs = {
            "on": {"max_queue_delay_us": 2000},
            f"on, max {args.cpu_batch_candidates}": {
                "max_queue_delay_us": 2000,
                "max_batch_candidates": args.cpu_batch_candidates,
            },
            "off": {"max_queue_delay_us": 0},
        }
        services = {
            label: Service(
                repo,
                args.model,
                tmpdir / f"ranker-{k}.log",
                provider="cpu",
                intra_op_threads=args.intra_op_threads,
                **{**settings, **extra},
            )
            for k, (label, settings) in enumerate(configs.items())
        }
        rows = []
        try:
            for service in services.values():
                service.wait_ready()
            points = [(args.candidates, c, payloads) for c in levels]
            if args.small_candidates:
                points.append((args.small_candidates, max(levels), small_payloads))
            for candidates, concurrency, pool in points:
                for label, service in services.items():
                    point = drive(
                        service,
                        pool,
                        candidates,
                        concurrency,
                        model=args.model,
                        duration_s=args.duration_s,
                        warmup_s=args.warmup_s,
                        processes=args.processes,
                    )
                    point["batching"] = label
                    point["candidates"] = candidates
                    point["percent_of_ceiling"] = 100 * point["items_per_s"] / ceiling
                    rows.append(point)
                    print(
                        f"batching {label} c={concurrency} x{candidates}: "
                        f"{point['items_per_s']:,.0f} cand/s, p99 {point['p99_ms']:.1f} ms, "
                        f"errors {point['errors']}, mean batch {point['mean_batch_requests']:.1f} req",
                        flush=True,
                    )
        finally:
            for service in services.values():
                service.stop()

    def find(batching: str, c: int, n: int = args.candidates) -> dict[str, Any] | None:
        return next(
            (
                r
                for r in rows
                if r["batching"] == batching and r["concurrency"] == c and r["candidates"] == n
            ),
            None,
        )

    tuned = f"on, max {args.cpu_batch_candidates}"
    c8, on32, off32 = find("on", 8), find("on", 32), find("off", 32)
    tuned8, tuned32 = find(tuned, 8), find(tuned, 32)
    top = max(levels)
    small_on = find("on", top, args.small_candidates)
    small_off = find("off", top, args.small_candidates)
    checks = {
        "c8_percent_of_ceiling": c8["percent_of_ceiling"] if c8 else None,
        "c8_meets_70_percent": bool(c8 and c8["percent_of_ceiling"] >= 70),
        "c8_percent_of_ceiling_cpu_tuned_batch": tuned8["percent_of_ceiling"] if tuned8 else None,
        "c32_batching_gain_cpu_tuned_batch": (tuned32["items_per_s"] / off32["items_per_s"])
        if tuned32 and off32
        else None,
        "c32_batching_gain": (on32["items_per_s"] / off32["items_per_s"])
        if on32 and off32
        else None,
        "small_requests_batching_gain": (small_on["items_per_s"] / small_off["items_per_s"])
        if small_on and small_off
        else None,
        "zero_errors": all(r["errors"] == 0 for r in rows),
    }
    result = {
        "model": source,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "onnxruntime": __import__("onnxruntime").__version__,
            "load_average_1m_before_after": [
                round(load_before[0], 2),
                round(os.getloadavg()[0], 2),
            ],
        },
        "candidates_per_request": args.candidates,
        "duration_s": args.duration_s,
        "client_processes": args.processes,
        "server_settings": {"provider": "cpu", "intra_op_threads": args.intra_op_threads, **extra},
        "ceiling_candidates_per_s": ceiling,
        "ceiling": ceilings,
        "service": rows,
        "checks": checks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    ceiling_rows = "\n".join(
        f"| {c['batch']:,} | {c['intra_op_threads'] or 'default (one per core)'} | "
        f"{c['candidates_per_s']:,.0f} | {c['run_p50_ms']:.2f} |"
        for c in ceilings
    )
    md = f"""# Ranking service benchmark

Model: {source}. Machine: {os.cpu_count()} CPUs ({platform.platform()}), ONNX Runtime
{result["machine"]["onnxruntime"]}, CPU provider. Requests of {args.candidates:,} candidates from
{args.processes} client processes (fewer for concurrency 1) on the same machine as the server;
{args.duration_s:g} s measured per point after {args.warmup_s:g} s of warm-up. Other jobs shared the
machine: 1-minute load average {load_before[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.
Throughputs are totals over the measured window (preemption included), for the ceiling too.

## Ceiling: the same ONNX session in-process

| batch | intra-op threads | candidates/s | ms per run (p50) |
|---|---|---|---|
{ceiling_rows}

## Service (`python -m serving.ranking`), Rank over gRPC

{_table(rows, ceiling)}

The server runs ONNX Runtime with {args.intra_op_threads or "default"} intra-op thread(s), the
rest of its settings at their defaults, except `MAX_QUEUE_DELAY_US=0` for "batching off" and
`MAX_BATCH_CANDIDATES={args.cpu_batch_candidates}` for the CPU-tuned batching (the default 16,384 suits GPUs;
on this CPU larger batches cost more per candidate, see the ceiling table). The three servers run
side by side and the points alternate between them.
% of ceiling is against the best in-process ceiling at batch {args.candidates:,}
({ceiling:,.0f} candidates/s), whatever its thread setting.

## Checks

- concurrency 8, batching on: {checks["c8_percent_of_ceiling"] if checks["c8_percent_of_ceiling"] is None else f"{checks['c8_percent_of_ceiling']:.0f}%"} of the ceiling (target 70%): {"met" if checks["c8_meets_70_percent"] else "MISSED"}
- concurrency 8, batching on with MAX_BATCH_CANDIDATES={args.cpu_batch_candidates}: {checks["c8_percent_of_ceiling_cpu_tuned_batch"] if checks["c8_percent_of_ceiling_cpu_tuned_batch"] is None else f"{checks['c8_percent_of_ceiling_cpu_tuned_batch']:.0f}%"} of the ceiling
- concurrency 32, batching on vs off: {checks["c32_batching_gain"] if checks["c32_batching_gain"] is None else f"{checks['c32_batching_gain']:.2f}x"} (default MAX_BATCH_CANDIDATES), {checks["c32_batching_gain_cpu_tuned_batch"] if checks["c32_batching_gain_cpu_tuned_batch"] is None else f"{checks['c32_batching_gain_cpu_tuned_batch']:.2f}x"} (MAX_BATCH_CANDIDATES={args.cpu_batch_candidates})
- {args.small_candidates}-candidate requests at concurrency {max(levels)}, batching on vs off: {checks["small_requests_batching_gain"] if checks["small_requests_batching_gain"] is None else f"{checks['small_requests_batching_gain']:.2f}x"}
- errors: {"none" if checks["zero_errors"] else "SOME (see the table)"}
"""
    args.out.with_suffix(".md").write_text(md)
    print()
    print(_table(rows, ceiling))
    print(json.dumps(checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
