"""GPU check of the ranking service, for a machine with an NVIDIA GPU (run by bench/gpu_check.sh).

(a) starts `python -m serving.ranking --provider=cuda` on a DLRM-sized ranker and checks that
    ModelMetadata's parameters["execution_provider"] and recsys_ranker_model_loaded{provider}
    say CUDA;
(b) compares the served CUDA scores with ONNX Runtime's CPU scores on the same pairs
    (|cuda - cpu| <= 1e-4 * max(|cpu|, 1));
(c) measures served candidates/s at 1,000 candidates per request and concurrency 1, 8, 32, 128
    (client processes on this machine's CPU cores), beside the raw in-process CUDA ceiling at
    batch 1,000, 16,384 and 65,536;
(d) writes bench/results/gpu.json and gpu.md with the card's name and prints a short table last.

`--provider=cpu` runs the same path on CPU (to try the script anywhere); its results go to a
temporary directory unless --out is given, never to bench/results/gpu.*.

Needs, beyond the GPU machine's Python 3.12 with torch, grpcio, protobuf, prometheus-client,
onnx and numpy, these wheels (see bench/gpu_check.sh): onnxruntime-gpu (CUDA 12 build; its
CUDA/cuDNN libraries come from torch's nvidia-* wheels through onnxruntime.preload_dlls()),
pydantic, pydantic-core, pydantic-settings, python-dotenv, typing-inspection, annotated-types,
grpcio-health-checking and grpcio-reflection (the grpcio release installed there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.ranker import (
    ROOT,
    Service,
    drive,
    load_vocabulary,
    measure_ceiling,
    metric_value,
    publish_bench_model,
    rank_payloads,
)

PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "no NVIDIA GPU (nvidia-smi unavailable)"


def check_provider(service: Service, model: str, provider: str) -> dict[str, Any]:
    import grpc

    from recsys.inference import grpc_service_pb2 as pb
    from recsys.inference import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(service.address) as channel:
        meta = pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            pb.ModelMetadataRequest(name=model), timeout=30
        )
    in_metadata = meta.parameters["execution_provider"].string_param
    label = "cuda" if provider == "cuda" else "cpu"
    loaded = metric_value(
        service.metrics(), "recsys_ranker_model_loaded", model=model, provider=label
    )
    return {
        "metadata_execution_provider": in_metadata,
        "metric_model_loaded_provider": label if loaded >= 1 else None,
        "ok": in_metadata == PROVIDERS[provider] and loaded >= 1,
    }


def compare_scores(
    service: Service, model: str, model_path: Path, n_users: int, n_items: int, n: int = 20_000
) -> dict[str, Any]:
    import grpc
    import numpy as np
    import onnxruntime as ort

    from recsys.inference import grpc_service_pb2 as pb
    from recsys.inference import grpc_service_pb2_grpc as pb_grpc

    rng = np.random.default_rng(3)
    users = rng.integers(0, n_users, n).astype(np.int64)
    items = rng.integers(0, n_items, n).astype(np.int64)
    served = []
    with grpc.insecure_channel(
        service.address, options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for start in range(0, n, 5000):
            request = pb.ModelInferRequest(model_name=model)
            for name, array in (("user_index", users), ("item_index", items)):
                part = array[start : start + 5000]
                request.inputs.add(name=name, datatype="INT64", shape=[len(part)])
                request.raw_input_contents.append(part.astype("<i8").tobytes())
            reply = stub.ModelInfer(request, timeout=60)
            served.append(np.frombuffer(reply.raw_output_contents[0], dtype="<f4"))
    got = np.concatenate(served).astype(np.float64)
    cpu = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    want = cpu.run(["score"], {"user_index": users, "item_index": items})[0].astype(np.float64)
    err = np.abs(got - want) / np.maximum(np.abs(want), 1.0)
    return {
        "pairs": n,
        "max_abs_error": float(np.abs(got - want).max()),
        "max_rel_error": float(err.max()),
        "ok": bool(err.max() <= 1e-4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--provider", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--concurrency", default="1,8,32,128")
    parser.add_argument("--ceiling-batches", default="1000,16384,65536")
    parser.add_argument("--processes", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 4)))
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--ceiling-s", type=float, default=2.0)
    parser.add_argument("--max-batch-candidates", type=int, default=65536)
    parser.add_argument("--session-concurrency", type=int, default=2)
    parser.add_argument(
        "--io-binding", action="store_true", help="serve through IO binding (RANKING_IO_BINDING)"
    )
    parser.add_argument("--out", type=Path, help="output prefix (default bench/results/gpu)")
    args = parser.parse_args()
    if args.out is None:
        args.out = (
            ROOT / "bench" / "results" / "gpu"
            if args.provider == "cuda"
            else Path(tempfile.mkdtemp(prefix="gpu-check-cpu-")) / "gpu"
        )
    provider = PROVIDERS[args.provider]
    card = gpu_name()
    print(f"card: {card}", flush=True)
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}: {ort.get_available_providers()}", flush=True)
    model = "gpu-ranker"
    result: dict[str, Any] = {
        "card": card,
        "provider": provider,
        "onnxruntime": ort.__version__,
        "io_binding": args.io_binding,
        "max_batch_candidates": args.max_batch_candidates,
        "session_concurrency": args.session_concurrency,
    }
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        tmpdir = Path(tmp)
        repo = tmpdir / "repo"
        publish_bench_model(repo, model, args.users, args.items)
        _, users, items, model_path = load_vocabulary(repo, model)
        result["model"] = (
            f"synthetic DLRM-sized ranker ({args.users} users, {args.items} items, dim 64, "
            "MLP 192-256-128-1)"
        )

        ceilings = []
        for batch in [int(b) for b in args.ceiling_batches.split(",")]:
            c = measure_ceiling(
                model_path,
                len(users),
                len(items),
                batch,
                providers=list(dict.fromkeys([provider, "CPUExecutionProvider"])),
                seconds=args.ceiling_s,
            )
            ceilings.append(c)
            print(
                f"ceiling batch {batch}: {c['candidates_per_s']:,.0f} candidates/s on "
                f"{c['provider']} ({c['run_p50_ms']:.2f} ms/run)",
                flush=True,
            )
        result["ceiling"] = ceilings

        service = Service(
            repo,
            model,
            tmpdir / "ranker.log",
            provider=args.provider,
            max_batch_candidates=args.max_batch_candidates,
            max_candidates_per_request=max(10_000, args.candidates),
            session_concurrency=args.session_concurrency,
            io_binding="true" if args.io_binding else "false",
        )
        rows = []
        try:
            t0 = time.monotonic()
            service.wait_ready(300)
            result["startup_s"] = time.monotonic() - t0
            result["provider_check"] = check_provider(service, model, args.provider)
            print(f"provider check: {result['provider_check']}", flush=True)
            result["score_check"] = compare_scores(
                service, model, model_path, len(users), len(items)
            )
            print(f"score check: {result['score_check']}", flush=True)
            payloads = rank_payloads(model, users, items, args.candidates)
            for concurrency in [int(c) for c in args.concurrency.split(",")]:
                point = drive(
                    service,
                    payloads,
                    args.candidates,
                    concurrency,
                    model=model,
                    duration_s=args.duration_s,
                    warmup_s=args.warmup_s,
                    processes=args.processes,
                )
                rows.append(point)
                print(
                    f"served c={concurrency}: {point['items_per_s']:,.0f} cand/s, "
                    f"p50 {point['p50_ms']:.1f} ms, p99 {point['p99_ms']:.1f} ms, "
                    f"errors {point['errors']}, mean batch {point['mean_batch_candidates']:,.0f}",
                    flush=True,
                )
        finally:
            service.stop()
        result["service"] = rows
        result["client_processes"] = args.processes
        result["cpus"] = os.cpu_count()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = [
        "| what | concurrency / batch | candidates/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for c in ceilings:
        table.append(
            f"| in-process ceiling | batch {c['batch']:,} | {c['candidates_per_s']:,.0f} | "
            f"{c['run_p50_ms']:.2f} | | |"
        )
    for r in rows:
        table.append(
            f"| served, {args.candidates:,}/request | c={r['concurrency']} | "
            f"{r['items_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |"
        )
    checks = (
        f"provider: {result['provider_check']['metadata_execution_provider']} "
        f"({'ok' if result['provider_check']['ok'] else 'FAILED'}); scores vs CPU: max rel error "
        f"{result['score_check']['max_rel_error']:.2e} "
        f"({'ok' if result['score_check']['ok'] else 'FAILED'})"
    )
    md = (
        f"# Ranking service on GPU\n\nCard: {card}. {os.cpu_count()} CPUs; "
        f"{args.processes} client processes on the same machine. ONNX Runtime {ort.__version__}, "
        f"{provider}. Model: {result['model']}.\n\n{checks}\n\n" + "\n".join(table) + "\n"
    )
    args.out.with_suffix(".md").write_text(md)
    print(f"\nresults: {args.out.with_suffix('.json')}")
    print(checks)
    print("\n".join(table))
    ok = result["provider_check"]["ok"] and result["score_check"]["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
