"""The ranker beside its peers on the same model and load (`make bench-peers`): the ranking
service with its defaults, a plain grpc.aio + ONNX Runtime server without batching
(bench/peer_servers/plain.py), KServe's ModelServer (kserve_server.py) and Triton through
PyTriton with dynamic batching (pytriton_server.py), each its own process, KServe and PyTriton
from their own virtualenvs (scripts/setup-peers.sh, .venv-peers/<peer>). A peer whose virtualenv
is missing is reported and skipped.

Every server loads the same ONNX file (the DLRM-sized ranker of bench/ranker.py) with one
intra-op thread, and gets the same serialized Open Inference Protocol ModelInfer requests (raw
INT64 [1000, 1] tensors, as tritonclient sends them for a batching model) from bench/loadgen.py
client processes, closed loop, at each concurrency. The servers take turns point by point.
Writes bench/results/peers.json and peers.md and prints the ratio table.

    python -m bench.peers [--concurrency=1,4,8,16] [--duration-s=5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
from bench.loadgen import UnaryBytesCall, run_load  # noqa: E402
from bench.ranker import (  # noqa: E402
    INFER_METHOD,
    Service,
    free_port,
    load_vocabulary,
    oip_payloads,
    publish_bench_model,
)

PEERS_VENV = ROOT / ".venv-peers"
RANKER = "ranker (defaults)"
PLAIN = "plain grpc.aio + ORT"
KSERVE = "KServe ModelServer"
TRITON = "Triton (PyTriton, dynamic batching)"


class Peer:
    """A peer server as a child process (its own process group), stopped with SIGTERM."""

    def __init__(self, label: str, args: list[str], port: int, log: Path) -> None:
        self.label = label
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self._log = log.open("wb")
        self.log_path = log
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def wait_model_ready(address: str, name: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until the server's Open Inference Protocol ModelReady says the model is ready."""
    import grpc

    from recsys.inference import grpc_service_pb2 as pb
    from recsys.inference import grpc_service_pb2_grpc as pb_grpc

    deadline = time.monotonic() + 240
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{address} exited: {log.read_text(errors='replace')[-3000:]}")
            try:
                if stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=2).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise TimeoutError(f"{address} not ready: {log.read_text(errors='replace')[-3000:]}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its descendants (Triton's server and stubs)."""
    import psutil

    try:
        root = psutil.Process(pid)
        total = 0.0
        for proc in [root, *root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total
    except psutil.NoSuchProcess:
        return 0.0


def start_peers(
    repo: Path, model: str, model_path: Path, logs: Path, threads: int, leave_out: set[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Every server that can start here (but those left out); and, for each that cannot, why."""
    servers: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    if "ranker" not in leave_out:
        servers[RANKER] = Service(
            repo, model, logs / "ranker.log", provider="cpu", intra_op_threads=threads
        )
    common = ["--model", str(model_path), "--name", model, "--threads", str(threads)]
    port = free_port()
    if "plain" not in leave_out:
        servers[PLAIN] = Peer(
            PLAIN,
            [sys.executable, "-m", "bench.peer_servers.plain", "--port", str(port), *common],
            port,
            logs / "plain.log",
        )
    for label, venv, script, ports in (
        (KSERVE, "kserve", "kserve_server.py", ["--port", "--http-port"]),
        (TRITON, "pytriton", "pytriton_server.py", ["--port", "--http-port", "--metrics-port"]),
    ):
        python = PEERS_VENV / venv / "bin" / "python"
        if {"kserve": "kserve", "pytriton": "triton"}[venv] in leave_out:
            continue
        if not (PEERS_VENV / venv / ".installed").exists():
            skipped[label] = f"{PEERS_VENV / venv} is not installed (scripts/setup-peers.sh)"
            continue
        numbers = [free_port() for _ in ports]
        flags = [x for flag, n in zip(ports, numbers, strict=True) for x in (flag, str(n))]
        servers[label] = Peer(
            label,
            [str(python), str(ROOT / "bench" / "peer_servers" / script), *flags, *common],
            numbers[0],
            logs / f"{venv}.log",
        )
    for label in list(servers):
        server = servers[label]
        try:
            if isinstance(server, Service):
                server.wait_ready()
            else:
                wait_model_ready(server.address, model, server.proc, server.log_path)
        except (RuntimeError, TimeoutError) as exc:
            skipped[label] = f"did not start: {str(exc)[-600:]}"
            server.stop()
            del servers[label]
    return servers, skipped


def _over(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--processes", type=int, default=2, help="client processes (at most)")
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of every server")
    parser.add_argument(
        "--skip", default="", help="servers to leave out: ranker, plain, kserve, triton"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "peers")
    args = parser.parse_args()

    model = "bench-ranker"
    levels = [int(c) for c in args.concurrency.split(",")]
    load_before = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        tmpdir = Path(tmp)
        repo, logs = tmpdir / "repo", tmpdir / "logs"
        logs.mkdir()
        publish_bench_model(repo, model, args.users, args.items, int8=False)
        _, users, items, model_path = load_vocabulary(repo, model)
        payloads = oip_payloads(model, len(users), len(items), args.candidates, batch_dim=True)
        leave_out = {k for k in args.skip.split(",") if k}
        servers, skipped = start_peers(repo, model, model_path, logs, args.threads, leave_out)
        for label, why in skipped.items():
            print(f"skipped {label}: {why}", flush=True)
        try:
            for concurrency in levels:
                for label, server in servers.items():
                    pid = server.proc.pid
                    factory = UnaryBytesCall(
                        server.address, INFER_METHOD, payloads, (args.candidates,) * len(payloads)
                    )
                    cpu_before = cpu_seconds(pid)
                    load = run_load(
                        factory,
                        concurrency=concurrency,
                        duration_s=args.duration_s,
                        warmup_s=args.warmup_s,
                        processes=args.processes,
                    )
                    cpu = cpu_seconds(pid) - cpu_before
                    point = load.as_dict() | {"server": label}
                    # The CPU span also holds the warm-up and the clients' first calls: per
                    # request it is estimated over the whole span at the measured rate.
                    span_requests = load.requests_per_s * (args.warmup_s + args.duration_s)
                    point["server_cpu_ms_per_request"] = (
                        1000 * cpu / span_requests if span_requests else None
                    )
                    rows.append(point)
                    print(
                        f"{label} c={concurrency}: {load.requests_per_s:,.1f} req/s, p50 "
                        f"{load.p50_ms:.2f} ms, p99 {load.p99_ms:.1f} ms, errors "
                        f"{load.errors} {load.error_codes or ''}",
                        flush=True,
                    )
        finally:
            for server in servers.values():
                server.stop()

    labels = [RANKER, PLAIN, KSERVE, TRITON]
    present = [label for label in labels if any(r["server"] == label for r in rows)]

    def rate(label: str, c: int) -> float | None:
        return next(
            (r["requests_per_s"] for r in rows if r["server"] == label and r["concurrency"] == c),
            None,
        )

    ratios = {}
    for c in levels:
        ranker = rate(RANKER, c)
        peers = {label: rate(label, c) for label in present if label != RANKER}
        best = max((v for v in peers.values() if v), default=None)
        ratios[c] = {
            "ranker_req_s": ranker,
            "best_peer_req_s": best,
            "ranker_over_best_peer": _over(ranker, best),
            "ranker_over_plain": _over(ranker, peers.get(PLAIN)),
        }
    c8 = 8 if 8 in levels else max(levels)
    checks = {
        "ranker_at_least_plain_at_every_concurrency": all(
            (r["ranker_over_plain"] or 0) >= 1.0 for r in ratios.values()
        ),
        f"ranker_over_best_peer_c{c8}": ratios[c8]["ranker_over_best_peer"],
        f"ranker_at_least_1_2x_best_peer_c{c8}": (ratios[c8]["ranker_over_best_peer"] or 0) >= 1.2,
        "zero_errors": all(r["errors"] == 0 for r in rows),
    }
    result = {
        "model": f"synthetic DLRM-sized ranker ({args.users} users, {args.items} items, dim 64, "
        "MLP 192-256-128-1), fp32",
        "candidates_per_request": args.candidates,
        "duration_s": args.duration_s,
        "warmup_s": args.warmup_s,
        "client_processes": args.processes,
        "intra_op_threads": args.threads,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "skipped": skipped,
        "rows": rows,
        "ratios": {str(c): v for c, v in ratios.items()},
        "checks": checks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    def cell(label: str, c: int) -> str:
        r = next((r for r in rows if r["server"] == label and r["concurrency"] == c), None)
        if r is None:
            return "–"
        cpu = r["server_cpu_ms_per_request"]
        cpu_text = f"{cpu:.2f}" if cpu is not None else "–"
        return f"{r['requests_per_s']:,.0f} (p50 {r['p50_ms']:.1f}, CPU {cpu_text})"

    header = "| server | " + " | ".join(f"c={c}" for c in levels) + " |"
    lines = [header, "|---" * (len(levels) + 1) + "|"]
    lines += [
        "| " + label + " | " + " | ".join(cell(label, c) for c in levels) + " |"
        for label in present
    ]
    ratio_lines = [
        "| concurrency | ranker req/s | best peer req/s | ranker / best peer | ranker / plain |",
        "|---|---|---|---|---|",
    ]
    for c, r in ratios.items():
        ratio_lines.append(
            f"| {c} | {r['ranker_req_s'] or 0:,.0f} | {r['best_peer_req_s'] or 0:,.0f} | "
            + " | ".join(
                f"{v:.2f}" if v is not None else "–"
                for v in (r["ranker_over_best_peer"], r["ranker_over_plain"])
            )
            + " |"
        )
    skipped_lines = "\n".join(f"- {k}: {v}" for k, v in skipped.items()) or "- none"
    md = "\n".join(
        [
            "# The ranker beside its peers",
            "",
            f"{result['model']}; ModelInfer requests of {args.candidates:,} candidates (raw INT64 "
            f"[N, 1]) from {args.processes} client processes, closed loop, {args.duration_s:g} s "
            f"per point after {args.warmup_s:g} s; every server one intra-op thread, all on this "
            f"machine ({os.cpu_count()} CPUs, shared with other jobs: 1-minute load average "
            f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after).",
            "",
            "Requests/s (p50 ms, server CPU ms per request, estimated over the point's span):",
            "",
            *lines,
            "",
            *ratio_lines,
            "",
            "Skipped peers:",
            "",
            skipped_lines,
            "",
            "Checks: " + json.dumps(checks),
            "",
        ]
    )
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
