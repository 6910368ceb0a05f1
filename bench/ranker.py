"""Benchmark of the ranking service against the raw ONNX Runtime ceiling (`make bench-ranker`).

Builds a DLRM-sized ranker (64-dim user and item embeddings, an MLP over [u, v, u*v] of
192-256-128-1, and its int8 graph from training/quantize.py; or `--repository` to use a trained
one), then in one run:

- the ceiling: the same ONNX session with the server's thread settings, run in this process on
  batches of the request size (1,000 candidates) and of the sizes dynamic batching forms, fp32
  and int8 (the curve that chooses MAX_BATCH_CANDIDATES on this device);
- the service (`python -m serving.ranking` as its own process, one per configuration: the
  defaults, BATCHING=delay, BATCHING=off, PRECISION=int8) driven by bench/loadgen.py client
  processes sending 1,000-candidate requests over both APIs (Rank with ids, the Open Inference
  Protocol's ModelInfer with indices) at each concurrency; per point the server's CPU time per
  request (psutil) beside ONNX Runtime's own run time per request (its compute histogram).

Writes bench/results/ranker.json and ranker.md and prints the table.

    python -m bench.ranker [--duration-s=8] [--repository=model_repository --model=books-ranker]
                           [--no-feature-ranker | --feature-repository=DIR --feature-model=NAME]

With --feature-ranker (the default) it also measures the learned ranker's graph (features
[N, 13] -> score, training/ranker.py) beside the DLRM-sized one: one session run at 1,000
candidates on one thread in-process, and served at --feature-concurrency over both APIs.
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
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
from bench.loadgen import LoadResult, UnaryBytesCall, run_load  # noqa: E402
from devtools.processes import free_port  # noqa: E402

RANK_METHOD = "/recsys.v1.RankingService/Rank"
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
METHODS = {"rank": RANK_METHOD, "oip": INFER_METHOD}


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


def publish_bench_model(
    repo: Path, name: str, n_users: int, n_items: int, *, int8: bool = True
) -> dict[str, Any]:
    """Publish the DLRM-sized ranker (and its int8 graph, calibrated on random pairs: the model
    has no training data) as a version of `name` in `repo`. Returns the int8 check (or {})."""
    import numpy as np
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
    from recsys.repository.graphs import INT8_MODEL_FILE
    from training.quantize import check_against_fp32, quantise

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
        check: dict[str, Any] = {}
        if int8:
            rng = np.random.default_rng(2)
            pairs = [
                (rng.integers(0, n_users, 1000), rng.integers(0, n_items, 1000)) for _ in range(16)
            ]
            names = RANKER_SIGNATURE.input_names
            method = quantise(d / MODEL_FILE, d / INT8_MODEL_FILE, names, pairs)
            check = check_against_fp32(
                d / MODEL_FILE, d / INT8_MODEL_FILE, names, n_users, n_items, method=method
            ).to_json()
            metadata = json.loads((d / "metadata.json").read_text())
            metadata["graphs"] = {"fp32": MODEL_FILE, "int8": INT8_MODEL_FILE}
            metadata["int8_check"] = check
            (d / "metadata.json").write_text(json.dumps(metadata, indent=2))
        write_users(d / USERS_FILE, [f"user{i}" for i in range(n_users)])
        write_items(d / ITEMS_FILE, [f"item{j}" for j in range(n_items)])
    assert pub.version is not None
    return check


FEATURE_MODEL = "bench-feature-ranker"
FEATURE_RETRIEVAL = ("bench-retrieval", "1")  # the retrieval version its features name


def publish_feature_model(
    repo: Path, name: str = FEATURE_MODEL, n_items: int = 1000, seed: int = 0
) -> Path:
    """Publish a graph of the learned ranker's architecture (training/ranker.py: standardisation,
    then 13-64-32-1 ReLU MLP over the recsys.features columns), seeded random weights (the cost
    does not depend on them), expecting the features of FEATURE_RETRIEVAL. Returns its ONNX
    file."""
    import numpy as np
    import torch

    from recsys.features import FEATURE_NAMES
    from recsys.repository import (
        ITEMS_FILE,
        MODEL_FILE,
        USERS_FILE,
        VersionPublisher,
        feature_ranker_signature,
        version_dir,
        write_items,
        write_users,
    )
    from training.ranker import CrossFitted, FeatureRanker, export_ranker

    torch.manual_seed(seed)
    width = len(FEATURE_NAMES)
    # as training publishes it: the mean of two cross-fitted MLPs
    module = CrossFitted(
        [FeatureRanker(np.zeros(width, np.float32), np.ones(width, np.float32)) for _ in range(2)]
    ).eval()
    with VersionPublisher(repo, [name]) as pub:
        d = pub.describe(
            name,
            kind="ranker",
            signature=feature_ranker_signature(width),
            metadata={
                "domain": "bench",
                "opset": 17,
                "ranker": "learned",
                "strategy": "the learned ranker's architecture, random weights, for benchmarks",
                "features": {
                    "names": list(FEATURE_NAMES),
                    "retrieval_model": FEATURE_RETRIEVAL[0],
                    "retrieval_version": FEATURE_RETRIEVAL[1],
                },
            },
        )
        export_ranker(module, d / MODEL_FILE, seed)
        # the vocabulary every ranker version carries (a feature ranker looks nothing up in it)
        write_users(d / USERS_FILE, ["user0"])
        write_items(d / ITEMS_FILE, [f"item{j}" for j in range(n_items)])
    assert pub.version is not None
    return version_dir(repo, name, pub.version) / MODEL_FILE


def graph_run_ms(
    model_path: Path, feeds: dict[str, Any], *, threads: int = 1, seconds: float = 3.0
) -> dict[str, float]:
    """p50 / p99 milliseconds of one session run on `feeds`, `threads` intra-op threads,
    in this process (no batching, no gRPC)."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(
        str(model_path), sess_options=so, providers=["CPUExecutionProvider"]
    )
    for _ in range(5):
        session.run(None, feeds)
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 100:
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return {
        "runs": len(times),
        "p50_ms": float(np.percentile(times, 50) * 1000),
        "p99_ms": float(np.percentile(times, 99) * 1000),
    }


def feature_rows(candidates: int, seed: int = 0) -> Any:
    """FP32 [candidates, F] rows in the value ranges of recsys.features."""
    import numpy as np

    from recsys.features import FEATURE_NAMES

    rng = np.random.default_rng(seed)
    return np.abs(rng.standard_normal((candidates, len(FEATURE_NAMES)))).astype(np.float32)


def feature_payloads(
    model: str, candidates: int, api: str, pool: int = 64, seed: int = 1
) -> tuple[bytes, ...]:
    """Requests to a feature ranker: Rank with item ids, features_f32 and features_version, or
    ModelInfer with a FP32 [N, F] `features` tensor and the features_version parameter."""
    from recsys.inference import grpc_service_pb2 as pb
    from recsys.repository.layout import FEATURES_INPUT, SCORE_OUTPUT
    from recsys.v1 import ranking_pb2

    out = []
    for i in range(pool):
        rows = feature_rows(candidates, seed + i)
        if api == "rank":
            request = ranking_pb2.RankRequest(
                model_name=model,
                user_id="user0",
                item_ids=[f"item{j}" for j in range(candidates)],
                features_f32=rows.astype("<f4", copy=False).tobytes(),  # as the gateway sends
                features_version=FEATURE_RETRIEVAL[1],
                packed_scores=True,
            )
            out.append(request.SerializeToString())
        else:
            infer = pb.ModelInferRequest(model_name=model)
            infer.inputs.add(name=FEATURES_INPUT, datatype="FP32", shape=list(rows.shape))
            infer.outputs.add(name=SCORE_OUTPUT)
            infer.parameters["features_version"].string_param = FEATURE_RETRIEVAL[1]
            infer.raw_input_contents.append(rows.tobytes())
            out.append(infer.SerializeToString())
    return tuple(out)


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
) -> dict[str, Any]:
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


def _flag(key: str, value: Any) -> str:
    """A settings flag: booleans are --name / --no-name, the rest --name=value."""
    name = key.replace("_", "-")
    if str(value).lower() in ("true", "false"):
        return f"--{name}" if str(value).lower() == "true" else f"--no-{name}"
    return f"--{name}={value}"


class Service:
    """`python -m serving.ranking` as a child process, stopped with SIGTERM."""

    def __init__(
        self, repo: Path, model: str, log: Path, *, source: Path = ROOT, **settings: Any
    ) -> None:
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
            args, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=source
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
            packed_scores=True,  # as the gateway asks
        )
        out.append(request.SerializeToString())
    return tuple(out)


def _cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _session_thread_cpu_seconds(pid: int) -> float:
    """CPU time of the process's session-run threads (the batcher names them ort-<model> for the
    OS), from /proc; 0 where there are none (a server that does not name them)."""
    import psutil

    total = 0.0
    for thread in psutil.Process(pid).threads():
        try:
            name = Path(f"/proc/{pid}/task/{thread.id}/comm").read_text().strip()
        except OSError:
            continue
        if name.startswith("ort-"):
            total += thread.user_time + thread.system_time
    return total


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
    method: str = RANK_METHOD,
) -> dict[str, Any]:
    """One load point, with the batch sizes the server formed meanwhile (from its metrics), the
    server's CPU time per request and ONNX Runtime's run time per request over the same span."""
    before = service.metrics()
    cpu_before = _cpu_seconds(service.proc.pid)
    session_cpu_before = _session_thread_cpu_seconds(service.proc.pid)
    factory = UnaryBytesCall(service.address, method, payloads, (candidates,) * len(payloads))
    result: LoadResult = run_load(
        factory,
        concurrency=concurrency,
        duration_s=duration_s,
        warmup_s=warmup_s,
        processes=processes,
    )
    cpu = _cpu_seconds(service.proc.pid) - cpu_before
    session_cpu = _session_thread_cpu_seconds(service.proc.pid) - session_cpu_before
    after = service.metrics()

    def delta(name: str) -> float:
        return metric_value(after, name, model=model) - metric_value(before, name, model=model)

    runs = delta("recsys_ranker_batch_requests_count")
    served = delta("recsys_ranker_batch_requests_sum")  # every request the server scored
    point = result.as_dict()
    point["server_cpu_ms_per_request"] = 1000 * cpu / served if served else None
    # Everything but the session-run threads: the event loop, gRPC's poller, the checks, the
    # metrics, the batcher's hops (the Python and gRPC work around ONNX Runtime).
    point["server_cpu_outside_session_ms_per_request"] = (
        1000 * (cpu - session_cpu) / served if served else None
    )
    point["ort_ms_per_request"] = (
        1000 * delta("recsys_ranker_compute_duration_seconds_sum") / served if served else None
    )
    point["mean_batch_requests"] = delta("recsys_ranker_batch_requests_sum") / runs if runs else 0.0
    point["mean_batch_candidates"] = (
        delta("recsys_ranker_batch_candidates_sum") / runs if runs else 0.0
    )
    point["session_runs"] = int(runs)
    point["solo_run_share"] = delta("recsys_ranker_solo_runs_total") / runs if runs else 0.0
    return point


def _over(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _table(rows: list[dict[str, Any]], ceiling: float) -> str:
    lines = [
        "| configuration | API | candidates | concurrency | req/s | candidates/s | % of ceiling "
        "| p50 ms | p99 ms | server CPU ms/req | of it outside the session threads | ORT ms/req | errors "
        "| mean batch (req / cand) | solo runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batching']} | {r['api']} | {r['candidates']:,} | {r['concurrency']} | "
            f"{r['requests_per_s']:.1f} | {r['items_per_s']:,.0f} | "
            f"{100 * r['items_per_s'] / ceiling:.0f}% | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{_fmt(r['server_cpu_ms_per_request'])} | "
            f"{_fmt(r.get('server_cpu_outside_session_ms_per_request'))} | "
            f"{_fmt(r['ort_ms_per_request'])} | "
            f"{r['errors']} | {r['mean_batch_requests']:.1f} / {r['mean_batch_candidates']:,.0f} | "
            f"{r.get('solo_run_share', 0.0):.0%} |"
        )
    return "\n".join(lines)


def oip_payloads(
    model: str,
    n_users: int,
    n_items: int,
    candidates: int,
    pool: int = 64,
    seed: int = 1,
    *,
    batch_dim: bool = False,
) -> tuple[bytes, ...]:
    """ModelInfer requests with raw INT64 tensors, as tritonclient sends them: shape [N], or
    [N, 1] with `batch_dim` (what a client sends a batching model)."""
    import numpy as np

    from recsys.inference import grpc_service_pb2 as pb
    from recsys.repository.layout import ITEM_INPUT, SCORE_OUTPUT, USER_INPUT

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(pool):
        request = pb.ModelInferRequest(model_name=model)
        for name in (USER_INPUT, ITEM_INPUT):
            shape = [candidates, 1] if batch_dim else [candidates]
            request.inputs.add(name=name, datatype="INT64", shape=shape)
        request.outputs.add(name=SCORE_OUTPUT)
        users = np.full(candidates, rng.integers(0, n_users), np.int64)
        items = rng.integers(0, n_items, candidates).astype(np.int64)
        request.raw_input_contents.extend([users.tobytes(), items.tobytes()])
        out.append(request.SerializeToString())
    return tuple(out)


BEFORE = "before (the earlier tree, its defaults)"
CONFIGS: dict[str, dict[str, Any]] = {
    "defaults (BATCHING=queued)": {},
    "BATCHING=delay 2000us": {"batching": "delay", "max_queue_delay_us": 2000},
    "BATCHING=off": {"batching": "off"},
    "SESSION_CONCURRENCY=2": {"session_concurrency": 2},
    # The service's own thread default (ONNX Runtime's: one per physical core), not --intra-op-threads.
    "INTRA_OP_THREADS=0 (ORT default)": {"intra_op_threads": 0},
    "PRECISION=int8": {"precision": "int8"},
    "SOLO_INTRA_OP_THREADS=2": {"solo_intra_op_threads": 2},
    "INTRA_OP_THREADS=2, ALLOW_SPINNING=false": {"intra_op_threads": 2, "allow_spinning": False},
}


def measure_feature_ranker(
    args: Any, tmpdir: Path, dlrm_path: Path, n_users: int, n_items: int, apis: list[str]
) -> dict[str, Any]:
    """The learned ranker's graph beside the DLRM-sized one: one session run at
    `args.candidates` on one thread in this process (p50 / p99), then served by
    `python -m serving.ranking` (defaults) at `args.feature_concurrency`, both APIs."""
    import numpy as np

    from recsys.repository import MODEL_FILE, list_versions, version_dir
    from recsys.repository.layout import ITEM_INPUT, USER_INPUT

    if args.feature_repository is not None:
        repo, name = args.feature_repository, args.feature_model
        versions = list_versions(repo, name)
        if not versions:
            raise SystemExit(f"no versions of {name} in {repo}")
        path = version_dir(repo, name, versions[-1]) / MODEL_FILE
        meta = json.loads((path.parent / "metadata.json").read_text())
        features_version = str(meta["features"]["retrieval_version"])
        source = f"{name} version {versions[-1]} from {repo}"
    else:
        repo, name = tmpdir / "feature-repo", FEATURE_MODEL
        path = publish_feature_model(repo, name, n_items=args.candidates)
        features_version = FEATURE_RETRIEVAL[1]
        source = "the learned ranker's architecture (13-64-32-1), random weights"
    n = args.candidates
    rng = np.random.default_rng(0)
    dlrm_feeds = {
        USER_INPUT: np.full(n, rng.integers(0, n_users), np.int64),
        ITEM_INPUT: rng.integers(0, n_items, n).astype(np.int64),
    }
    in_process = {
        "dlrm": graph_run_ms(dlrm_path, dlrm_feeds, seconds=args.ceiling_s),
        "learned": graph_run_ms(path, {"features": feature_rows(n)}, seconds=args.ceiling_s),
    }
    for label, r in in_process.items():
        print(
            f"one thread, {n} candidates, {label}: p50 {r['p50_ms']:.3f} ms, "
            f"p99 {r['p99_ms']:.3f} ms",
            flush=True,
        )
    service = Service(
        repo,
        name,
        tmpdir / "ranker-learned.log",
        provider="cpu",
        intra_op_threads=args.intra_op_threads,
    )
    rows = []
    try:
        service.wait_ready()
        for api in apis:
            payloads = feature_payloads(name, n, api)
            if features_version != FEATURE_RETRIEVAL[1]:
                payloads = tuple(_with_version(p, api, features_version) for p in payloads)
            for c in [int(x) for x in args.feature_concurrency.split(",") if x]:
                point = drive(
                    service,
                    payloads,
                    n,
                    c,
                    model=name,
                    duration_s=args.duration_s,
                    warmup_s=args.warmup_s,
                    processes=args.processes,
                    method=METHODS[api],
                )
                point |= {"batching": "learned ranker, defaults", "api": api, "candidates": n}
                rows.append(point)
                print(
                    f"learned {api} c={c}: {point['requests_per_s']:,.0f} req/s, p50 "
                    f"{point['p50_ms']:.2f} ms, p99 {point['p99_ms']:.1f} ms, errors "
                    f"{point['errors']}",
                    flush=True,
                )
    finally:
        service.stop()
    return {"model": source, "in_process_one_thread": in_process, "service": rows}


def _with_version(payload: bytes, api: str, version: str) -> bytes:
    from recsys.inference import grpc_service_pb2 as pb
    from recsys.v1 import ranking_pb2

    if api == "rank":
        rank = ranking_pb2.RankRequest.FromString(payload)
        rank.features_version = version
        return rank.SerializeToString()
    infer = pb.ModelInferRequest.FromString(payload)
    infer.parameters["features_version"].string_param = version
    return infer.SerializeToString()


def learned_md(learned: dict[str, Any], candidates: int) -> str:
    g = learned["in_process_one_thread"]
    ceiling = candidates * 1000 / g["learned"]["p50_ms"]
    return f"""## The learned ranker's graph beside the DLRM-sized one

Model: {learned["model"]}. One session run at {candidates:,} candidates, one intra-op thread, in
this process (the issue's target: at most 2 ms):

| graph | p50 ms | p99 ms | runs |
|---|---|---|---|
| DLRM-sized (user, item ids) | {g["dlrm"]["p50_ms"]:.3f} | {g["dlrm"]["p99_ms"]:.3f} | {g["dlrm"]["runs"]} |
| learned (features [N, 13]) | {g["learned"]["p50_ms"]:.3f} | {g["learned"]["p99_ms"]:.3f} | {g["learned"]["runs"]} |

Served (`python -m serving.ranking`, defaults); % of ceiling against the learned graph's own
one-thread p50 ({ceiling:,.0f} candidates/s):

{_table(learned["service"], ceiling)}
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, help="benchmark a model of this repository")
    parser.add_argument("--model", default="bench-ranker", help="model name (with --repository)")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--apis", default="rank,oip", help="rank, oip or both")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help="configurations to run (comma-separated)"
    )
    parser.add_argument(
        "--ceiling-batches", default="1000,2000,4000,8000,16384", help="in-process batch sizes"
    )
    parser.add_argument("--processes", type=int, default=2, help="client processes (at most)")
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--ceiling-s", type=float, default=3.0)
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=1,
        help="the server's ONNX Runtime threads, also the ceiling's (default 1: clients share "
        "the cores)",
    )
    parser.add_argument(
        "--server-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra ranker setting for every configuration, e.g. allow_spinning=false",
    )
    parser.add_argument(
        "--before",
        type=Path,
        help="the source tree of an earlier version (e.g. `git archive <commit> | tar -x -C "
        "DIR`): its server, with its defaults, runs beside the others as 'before'",
    )
    parser.add_argument(
        "--feature-ranker",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure a graph of the learned ranker's architecture (training/ranker.py), "
        "in-process on one thread and served, beside the DLRM-sized graph",
    )
    parser.add_argument(
        "--feature-repository",
        type=Path,
        help="measure this repository's learned ranker (--feature-model) instead of a random one",
    )
    parser.add_argument("--feature-model", default=FEATURE_MODEL)
    parser.add_argument(
        "--feature-concurrency", default="1,8", help="load points of the served feature ranker"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ranker")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    load_before = os.getloadavg()
    levels = [int(c) for c in args.concurrency.split(",")]
    apis = [a for a in args.apis.split(",") if a]
    configs = {k: v for k, v in CONFIGS.items() if k in args.configs.split(",")}
    if args.before is not None:
        configs = {BEFORE: {}} | configs
    extra = dict(item.split("=", 1) for item in args.server_setting)
    int8_check: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ranker-") as tmp:
        tmpdir = Path(tmp)
        if args.repository is None:
            repo = tmpdir / "repo"
            int8_check = publish_bench_model(repo, args.model, args.users, args.items)
            source = (
                f"synthetic DLRM-sized ranker ({args.users} users, {args.items} items, dim 64, "
                "MLP 192-256-128-1)"
            )
        else:
            repo = args.repository
            source = f"{args.model} from {repo}"
        version, users, items, model_path = load_vocabulary(repo, args.model)
        int8_path = model_path.with_name("model.int8.onnx")
        print(f"model: {source}, version {version}", flush=True)

        # The ceiling with the server's own thread settings, fp32 (and int8 where present).
        ceilings = []
        graphs = [("fp32", model_path)] + ([("int8", int8_path)] if int8_path.exists() else [])
        for precision, path in graphs:
            for batch in sorted({int(b) for b in args.ceiling_batches.split(",")}):
                c = measure_ceiling(
                    path,
                    len(users),
                    len(items),
                    batch,
                    providers=["CPUExecutionProvider"],
                    intra_op_threads=args.intra_op_threads,
                    seconds=args.ceiling_s,
                )
                c["intra_op_threads"] = args.intra_op_threads
                c["precision"] = precision
                ceilings.append(c)
                print(
                    f"ceiling {precision} batch {batch}: {c['candidates_per_s']:,.0f} "
                    f"candidates/s ({c['run_p50_ms']:.2f} ms/run)",
                    flush=True,
                )

        def ceiling_at(precision: str, batch: int) -> float | None:
            return next(
                (
                    c["candidates_per_s"]
                    for c in ceilings
                    if c["precision"] == precision and c["batch"] == batch
                ),
                None,
            )

        ceiling = ceiling_at("fp32", args.candidates) or max(
            c["candidates_per_s"] for c in ceilings
        )
        pools = {
            "rank": rank_payloads(args.model, users, items, args.candidates),
            "oip": oip_payloads(args.model, len(users), len(items), args.candidates),
        }
        # Every configuration runs at once (idle when not driven) and the points alternate
        # between them, so that the load of other jobs on the machine drifts evenly over all.
        services = {
            label: Service(
                repo,
                args.model,
                tmpdir / f"ranker-{k}.log",
                source=args.before if label == BEFORE else ROOT,
                provider="cpu",
                **{"intra_op_threads": args.intra_op_threads, **settings, **extra},
            )
            for k, (label, settings) in enumerate(configs.items())
        }
        rows = []
        try:
            for service in services.values():
                service.wait_ready()
            for api in apis:
                for concurrency in levels:
                    for label, service in services.items():
                        point = drive(
                            service,
                            pools[api],
                            args.candidates,
                            concurrency,
                            model=args.model,
                            duration_s=args.duration_s,
                            warmup_s=args.warmup_s,
                            processes=args.processes,
                            method=METHODS[api],
                        )
                        point["batching"] = label
                        point["api"] = api
                        point["candidates"] = args.candidates
                        point["percent_of_ceiling"] = 100 * point["items_per_s"] / ceiling
                        rows.append(point)
                        print(
                            f"{label} {api} c={concurrency}: {point['requests_per_s']:,.0f} req/s, "
                            f"p50 {point['p50_ms']:.2f} ms, p99 {point['p99_ms']:.1f} ms, "
                            f"CPU {_fmt(point['server_cpu_ms_per_request'])} ms/req ("
                            f"{_fmt(point['server_cpu_outside_session_ms_per_request'])} outside "
                            "the session threads), ORT "
                            f"{_fmt(point['ort_ms_per_request'])} ms/req, errors "
                            f"{point['errors']}, mean batch {point['mean_batch_requests']:.1f} req, solo runs "
                            f"{point['solo_run_share']:.0%}",
                            flush=True,
                        )
        finally:
            for service in services.values():
                service.stop()
        learned = (
            measure_feature_ranker(args, tmpdir, model_path, len(users), len(items), apis)
            if args.feature_ranker
            else None
        )

    def find(label: str, api: str, c: int) -> dict[str, Any] | None:
        return next(
            (
                r
                for r in rows
                if r["batching"] == label and r["api"] == api and r["concurrency"] == c
            ),
            None,
        )

    default, off, int8 = "defaults (BATCHING=queued)", "BATCHING=off", "PRECISION=int8"

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
        if a is None or b is None or not b["requests_per_s"]:
            return None
        return float(a["requests_per_s"] / b["requests_per_s"])

    def p50(api: str) -> float | None:
        r = find(default, api, 1)
        return None if r is None else float(r["p50_ms"])

    c8 = 8 if 8 in levels else max(levels)
    checks: dict[str, Any] = {
        "defaults_vs_batching_off_req_s": {
            f"{api} c={c}": ratio(find(default, api, c), find(off, api, c))
            for api in apis
            for c in levels
        },
        "c1_p50_ms": {"rank": p50("rank"), "oip": p50("oip")},
        "c1_p50_targets_met": {
            "oip <= 1.5 ms": (p50("oip") or 1e9) <= 1.5,
            "rank <= 2 ms": (p50("rank") or 1e9) <= 2.0,
        },
        f"rank_vs_oip_req_s_c{c8}": ratio(find(default, "rank", c8), find(default, "oip", c8)),
        f"int8_vs_fp32_served_req_s_c{c8}": {
            api: ratio(find(int8, api, c8), find(default, api, c8)) for api in apis
        },
        "int8_in_process_candidates_per_s_batch_1000": ceiling_at("int8", 1000),
        "int8_vs_fp32_in_process_batch_1000": _over(
            ceiling_at("int8", 1000), ceiling_at("fp32", 1000)
        ),
        f"c{c8}_percent_of_ceiling": {
            api: (find(default, api, c8) or {}).get("percent_of_ceiling") for api in apis
        },
        "zero_errors": all(r["errors"] == 0 for r in rows),
    }
    if learned is not None:
        graph = learned["in_process_one_thread"]["learned"]
        checks["learned_graph_1000_one_thread_p50_ms"] = graph["p50_ms"]
        checks["learned_graph_1000_one_thread_p99_ms"] = graph["p99_ms"]
        checks["learned_graph_le_2ms_p50"] = graph["p50_ms"] <= 2.0
        checks["learned_served_zero_errors"] = all(r["errors"] == 0 for r in learned["service"])
    if args.before is not None:
        checks["defaults_vs_before_req_s"] = {
            f"{api} c={c}": ratio(find(default, api, c), find(BEFORE, api, c))
            for api in apis
            for c in levels
        }
        checks["defaults_vs_before_server_cpu_per_request"] = {
            f"{api} c={c}": _over(
                (find(default, api, c) or {}).get("server_cpu_ms_per_request"),
                (find(BEFORE, api, c) or {}).get("server_cpu_ms_per_request"),
            )
            for api in apis
            for c in levels
        }
    if args.before is not None:
        checks["defaults_vs_before_server_cpu_outside_session_per_request"] = {
            f"{api} c={c}": _over(
                (find(default, api, c) or {}).get("server_cpu_outside_session_ms_per_request"),
                (find(BEFORE, api, c) or {}).get("server_cpu_outside_session_ms_per_request"),
            )
            for api in apis
            for c in levels
        }
    result = {
        "model": source,
        "before_tree": str(args.before) if args.before else None,
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
        "warmup_s": args.warmup_s,
        "client_processes": args.processes,
        "server_settings": {"provider": "cpu", "intra_op_threads": args.intra_op_threads, **extra},
        "configurations": configs,
        "int8_check": int8_check,
        "ceiling_candidates_per_s": ceiling,
        "ceiling": ceilings,
        "service": rows,
        "checks": checks,
        "learned_ranker": learned,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    ceiling_rows = "\n".join(
        f"| {c['precision']} | {c['batch']:,} | {c['intra_op_threads'] or 'default'} | "
        f"{c['candidates_per_s']:,.0f} | {c['run_p50_ms']:.2f} |"
        for c in ceilings
    )
    check_lines = "\n".join(f"- `{k}`: {json.dumps(v)}" for k, v in checks.items())
    md = f"""# Ranking service benchmark

Model: {source}. Machine: {os.cpu_count()} CPUs ({platform.platform()}), ONNX Runtime
{result["machine"]["onnxruntime"]}, CPU provider. Requests of {args.candidates:,} candidates from
{args.processes} client processes (fewer for concurrency 1) on the same machine as the server;
{args.duration_s:g} s measured per point after {args.warmup_s:g} s of warm-up. 1-minute load
average {load_before[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other jobs count).
Throughputs are totals over the measured window (preemption included), for the ceiling too.

## Ceiling: the same ONNX session in-process, the server's thread settings

| graph | batch | intra-op threads | candidates/s | ms per run (p50) |
|---|---|---|---|---|
{ceiling_rows}

int8 against fp32 on 64 users × 1,000 candidates: {json.dumps(int8_check) if int8_check else "no int8 graph"}

## Service (`python -m serving.ranking`), both APIs

{_table(rows, ceiling)}

Every configuration runs {args.intra_op_threads or "the default number of"} ONNX Runtime intra-op
thread(s) and the remaining settings at their defaults, except as its name says. Server CPU is the
process's user + system time over the point (warm-up included) per request it scored, and the
part of it outside the session-run threads (per-thread times from /proc; ONNX Runtime's own pool
threads, such as the solo session's, count as outside); ORT is the session runs' wall time per
request (one slot: runs overlap nothing, except with SESSION_CONCURRENCY=2). Solo runs: the share
of session runs on the solo session (SOLO_INTRA_OP_THREADS). The servers run side by side
and the points alternate between them. % of ceiling is against the fp32 ceiling at batch
{args.candidates:,} ({ceiling:,.0f} candidates/s).

{learned_md(learned, args.candidates) if learned else ""}
## Checks

{check_lines}
"""
    args.out.with_suffix(".md").write_text(md)
    print()
    print(_table(rows, ceiling))
    print(json.dumps(checks, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
