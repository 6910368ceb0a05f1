"""Retrieval indexes at scale (`make bench-index`): synthetic catalogues of 1 M and 10 M clustered
64-d items published with the real publisher and index builder (recsys/ann.py), then per index
type: build time, file size, load time, resident memory after load, recall@500 against exact
search, and the latency of one search; for the type each size gets, the time until the real
retrieval service reports SERVING on the published version and the latency of one Retrieve RPC.

Each load is measured in a fresh process (`python -m bench.index_scale measure ...`), so the
memory figures are that process's own. Everything is written under --workdir and removed at the
end. Writes bench/results/index_scale.json and index_scale.md.

    python -m bench.index_scale [--sizes=1000000,10000000] [--queries=500] [--rpcs=1000]

For the IVF kinds the measuring process also sweeps the search parameters on the same loaded
index (--sweep-nprobe x --sweep-rerank): the recall / latency curve the defaults are chosen from.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = "synth-retrieval"
DIM = 64
K = 500
TARGETS = {"serving_s": 60.0, "retrieve_p99_ms": 20.0, "recall_at_500": 0.95}


def rss_mb(pid: int | str = "self") -> dict[str, float]:
    """Resident memory of a process: anonymous (its own) and file-backed (mapped files)."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as status:
        for line in status:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = round(int(line.split()[1]) / 1024, 1)
    return out


def generate(path: Path, n: int, n_users: int, seed: int) -> np.ndarray:
    """Write n clustered item vectors to `path` (.npy, in chunks) and return the users' vectors.

    Items: one of n / 1000 centres plus noise as large as the centres, scaled by a log-normal
    norm (inner-product search favours large norms); users: a centre plus smaller noise."""
    rng = np.random.default_rng(seed)
    n_centres = max(64, n // 1000)
    centres = rng.normal(size=(n_centres, DIM)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, DIM))
    chunk = 1_000_000
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        block = centres[rng.integers(0, n_centres, m)] + rng.normal(size=(m, DIM)).astype(
            np.float32
        )
        block *= rng.lognormal(0.0, 0.2, size=(m, 1)).astype(np.float32)
        out[lo : lo + m] = block
    out.flush()
    del out
    users = centres[rng.integers(0, n_centres, n_users)] + 0.5 * rng.normal(size=(n_users, DIM))
    return users.astype(np.float32)


def publish(
    repo: Path, embeddings: Path, users: np.ndarray, params: Any, kind: str, seed: int
) -> tuple[int, float, float]:
    """Publish one retrieval version over `embeddings` as training does (user tower, vocabularies,
    seen items, the index built by `stage_index`); returns (version, index build+write s, total s)."""
    import onnx

    from devtools.tiny_models import _gather_graph
    from recsys.ann import stage_index
    from recsys.repository import (
        ITEMS_FILE,
        MODEL_FILE,
        USERS_FILE,
        VersionPublisher,
        user_tower_signature,
        write_items,
        write_users,
    )

    start = time.perf_counter()
    n = int(np.load(embeddings, mmap_mode="r").shape[0])
    rng = np.random.default_rng(seed)
    signature = user_tower_signature(DIM)
    with VersionPublisher(repo, [MODEL]) as pub:
        d = pub.describe(
            MODEL,
            kind="retrieval",
            signature=signature,
            metadata={"domain": "synth", "embedding_dim": DIM, "n_items": n, "n_users": len(users)},
        )
        (user_in,), (user_out,) = signature.input_names, signature.output_names
        onnx.save(_gather_graph("user_tower", users, user_in, user_out), d / MODEL_FILE)
        try:
            os.link(embeddings, d / "item_embeddings.npy")
        except OSError:
            shutil.copy(embeddings, d / "item_embeddings.npy")
        built = time.perf_counter()
        stage_index(d, params, kind)
        build_s = time.perf_counter() - built
        seen = rng.integers(0, n, size=(len(users), 20)).astype(np.int64)
        np.savez(
            d / "seen.npz",
            indptr=np.arange(0, seen.size + 1, seen.shape[1], dtype=np.int64),
            indices=np.sort(seen, axis=1).ravel(),
        )
        write_users(d / USERS_FILE, [f"u{i}" for i in range(len(users))])
        popularity = rng.zipf(2.0, size=n).clip(max=1_000_000)
        write_items(d / ITEMS_FILE, [f"i{j}" for j in range(n)], None, popularity.tolist())
    assert pub.version is not None
    return pub.version, build_s, time.perf_counter() - start


def timed_searches(index: Any, queries: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """One search per query (k = K): recall@K against `truth` and the latency percentiles."""
    times, hits = [], 0
    for q, expected in zip(queries, truth, strict=True):
        t = time.perf_counter()
        rows, _ = index.search(q, K)
        times.append(time.perf_counter() - t)
        hits += len(np.intersect1d(rows, expected))
    ms = 1000 * np.asarray(times)
    return {
        "recall_at_500": round(hits / truth.size, 4),
        "search_p50_ms": round(float(np.percentile(ms, 50)), 3),
        "search_p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


def measure(
    directory: Path, queries_path: Path, truth_path: Path, sweep: list[tuple[int, int]]
) -> dict[str, Any]:
    """In this (fresh) process: load the stored index as the service does, then search (and for
    IVF kinds, search again with each (nprobe, rerank_factor) of `sweep`)."""
    from recsys import ann
    from recsys.repository import read_metadata

    faiss.omp_set_num_threads(1)  # the service's search_threads default
    base = rss_mb()
    metadata = read_metadata(directory)
    embeddings = np.load(directory / ann.EMBEDDINGS_FILE, mmap_mode="r")
    start = time.perf_counter()
    index = ann.load(directory, metadata, embeddings)
    load_s = time.perf_counter() - start
    after_load = rss_mb()
    queries, truth = np.load(queries_path), np.load(truth_path)
    out: dict[str, Any] = {
        "kind": index.kind,
        "mmapped": index.mmapped,
        "search_params": {
            k: getattr(index.params, k) for k in ("ivf_nprobe", "rerank_factor", "pq_m")
        }
        | {"nprobe": index.nprobe},
        "load_s": round(load_s, 3),
        "rss_after_load_mb": {k: round(v - base.get(k, 0.0), 1) for k, v in after_load.items()},
    }
    out |= timed_searches(index, queries, truth)
    out["rss_after_search_mb"] = {k: round(v - base.get(k, 0.0), 1) for k, v in rss_mb().items()}
    if index.kind in ann.IVF_KINDS and sweep:
        out["sweep"] = []
        for nprobe, rerank in sweep:
            params = replace(index.params, ivf_nprobe=nprobe, rerank_factor=rerank)
            again = ann.AnnIndex(index.index, index.kind, embeddings, params)
            point = {"nprobe": nprobe, "rerank_factor": rerank}
            out["sweep"].append(point | timed_searches(again, queries, truth))
            print(json.dumps(out["sweep"][-1]), file=sys.stderr, flush=True)
    return out


def measure_in_child(directory: Path, work: Path, sweep: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.index_scale", "measure", str(directory), str(work), sweep]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {directory} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def serve_and_query(repo: Path, work: Path, n_users: int, rpcs: int, seed: int) -> dict[str, Any]:
    """Start the real retrieval service on the repository: seconds until SERVING, its memory,
    and the latency of Retrieve (k=500, as the gateway asks) over loopback."""
    import grpc

    from devtools.processes import ServiceProcess
    from recsys.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc

    start = time.perf_counter()
    service = ServiceProcess(
        "serving.retrieval",
        [f"--model-repository={repo}", f"--models={MODEL}", "--poll-interval-s=0"],
        log_path=work / "retrieval.log",
    )
    try:
        service.wait_serving(timeout=900)
        serving_s = time.perf_counter() - start
        memory = rss_mb(service.proc.pid)
        rng = np.random.default_rng(seed)
        out: dict[str, Any] = {"serving_s": round(serving_s, 2), "service_rss_mb": memory}
        personal = [
            common_pb2.CANDIDATE_SOURCE_ANN,
            common_pb2.CANDIDATE_SOURCE_TRANSFER,
            common_pb2.CANDIDATE_SOURCE_HISTORY,
            common_pb2.CANDIDATE_SOURCE_ITEM2ITEM,
            common_pb2.CANDIDATE_SOURCE_RECENT,
        ]
        with grpc.insecure_channel(service.address) as channel:
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            # Columns are what the gateway asks for; rows (one message per candidate) are the
            # form for clients that do not, measured beside them.
            for label, sources, columnar in (
                ("ann", [common_pb2.CANDIDATE_SOURCE_ANN], True),
                ("personal", personal, True),
                ("ann_rows", [common_pb2.CANDIDATE_SOURCE_ANN], False),
                ("personal_rows", personal, False),
            ):
                times = []
                for i in range(rpcs + 20):
                    request = retrieval_pb2.RetrieveRequest(
                        domain="synth",
                        user_id=f"u{int(rng.integers(0, n_users))}",
                        k=K,
                        exclude_seen=True,
                        sources=sources,
                        columnar=columnar,
                    )
                    t = time.perf_counter()
                    reply = stub.Retrieve(request, timeout=10)
                    if i >= 20:  # after a warm-up
                        times.append(time.perf_counter() - t)
                    got = len(reply.columns.item_ids) if columnar else len(reply.candidates)
                    assert got == K, (label, got)
                ms = 1000 * np.asarray(times)
                out[f"retrieve_{label}_p50_ms"] = round(float(np.percentile(ms, 50)), 2)
                out[f"retrieve_{label}_p99_ms"] = round(float(np.percentile(ms, 99)), 2)
        log = service.log()
        out["stored_index_loaded"] = "(stored)" in log and "read the stored" in log
        return out
    finally:
        service.terminate()


def run_size(n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from recsys.ann import AnnParams, choose_kind

    t = time.perf_counter()
    embeddings = work / "embeddings.npy"
    users = generate(embeddings, n, args.users, args.seed)
    generate_s = time.perf_counter() - t
    queries = users[: args.queries]
    np.save(work / "queries.npy", queries)
    t = time.perf_counter()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    _, truth = faiss.knn(queries, np.load(embeddings, mmap_mode="r"), K, faiss.METRIC_INNER_PRODUCT)
    exact_s = time.perf_counter() - t
    np.save(work / "truth.npy", truth)
    defaults = AnnParams()
    chosen = choose_kind(n, defaults)
    kinds = [k for k in args.kinds.split(",") if k] or [chosen]
    result: dict[str, Any] = {
        "n_items": n,
        "dim": DIM,
        "queries": len(queries),
        "chosen_kind": chosen,
        "generate_s": round(generate_s, 1),
        "exact_truth_s": round(exact_s, 1),
        "kinds": [],
    }
    result["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
    limits = {"hnsw": args.hnsw_limit, "flat": args.flat_limit, "ivfpq": args.ivfpq_limit}
    sweep = ",".join(
        f"{p}x{r}"
        for p in (int(x) for x in args.sweep_nprobe.split(",") if x)
        for r in (int(x) for x in args.sweep_rerank.split(",") if x)
    )
    for kind in kinds:
        if n > limits.get(kind, n):
            continue  # HNSW: minutes per 100 k items to build; exact: the ground truth
        repo = work / f"repo-{kind}"
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        # The parameters as training has them; earlier versions' 8-bit IVF-PQ with theirs
        # (the power of two nearest sqrt(n) lists, 16-byte codes, nprobe 128, 8 k re-scored).
        sqrt_lists = int(2 ** round(math.log2(math.sqrt(n))))
        earlier = replace(defaults, ivf_nlist=sqrt_lists, pq_m=16, ivf_nprobe=128, rerank_factor=8)
        params = earlier if kind == "ivfpq" else defaults
        version, build_s, publish_s = publish(repo, embeddings, users, params, kind, args.seed)
        directory = repo / MODEL / str(version)
        row = {
            "kind": kind,
            "build_s": round(build_s, 1),
            "publish_s": round(publish_s, 1),
            "index_file_mb": round((directory / "items.faiss").stat().st_size / 2**20, 1),
            "embeddings_file_mb": round(
                (directory / "item_embeddings.npy").stat().st_size / 2**20, 1
            ),
            "items_json_mb": round((directory / "items.json").stat().st_size / 2**20, 1),
        }
        row |= measure_in_child(directory, work, sweep if kind == chosen else "")
        row["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(row), file=sys.stderr, flush=True)
        if kind == chosen and not args.no_service:
            row["service"] = serve_and_query(repo, work, args.users, args.rpcs, args.seed)
            print(json.dumps(row["service"]), file=sys.stderr, flush=True)
        result["kinds"].append(row)
        shutil.rmtree(repo)
    embeddings.unlink()
    return result


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Retrieval indexes at scale",
        "",
        f"`make bench-index` on {results['machine']}; {results['queries']} queries, k = {K}, "
        "64-d float32 clustered synthetic items; recall@500 against exact inner-product search; "
        "one search = one query on one thread (the service's default) including the exact "
        "re-scoring; memory is the measuring process's growth after loading and searching "
        "(anonymous / file-backed, i.e. memory-mapped pages: the item embeddings, and the index "
        "where its kind is mapped; fast-scan codes are read into memory).",
        "",
        "| items | index | build s | file MB | load s | RSS anon MB | RSS file MB | recall@500 "
        "| search p50 ms | p99 ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in results["sizes"]:
        for row in size["kinds"]:
            mem = row["rss_after_search_mb"]
            lines.append(
                f"| {size['n_items']:,} | {row['kind']}{' (chosen)' if row['kind'] == size['chosen_kind'] else ''} "
                f"| {row['build_s']} | {row['index_file_mb']} | {row['load_s']} "
                f"| {mem.get('RssAnon')} | {mem.get('RssFile')} | {row['recall_at_500']} "
                f"| {row['search_p50_ms']} | {row['search_p99_ms']} |"
            )
    lines += [
        "",
        "The retrieval service (`python -m serving.retrieval`) on the published version of the "
        "chosen index: seconds from process start to SERVING (the version verified, read and "
        "warmed up; the index loaded, not built), its resident memory then, and one Retrieve "
        "(k = 500, exclude_seen) over loopback, ANN only and with every personal source; the "
        "candidates as columns (`columnar`, what the gateway asks for) and, for reference, as one "
        "message per candidate (rows).",
        "",
        "| items | index | SERVING s | RSS MB (anon / file) | Retrieve ANN p50 / p99 ms "
        "| Retrieve personal p50 / p99 ms | rows: ANN p50 / p99 ms | rows: personal p50 / p99 ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for size in results["sizes"]:
        for row in size["kinds"]:
            s = row.get("service")
            if not s:
                continue
            m = s["service_rss_mb"]
            lines.append(
                f"| {size['n_items']:,} | {row['kind']} | {s['serving_s']} "
                f"| {m.get('RssAnon')} / {m.get('RssFile')} "
                f"| {s['retrieve_ann_p50_ms']} / {s['retrieve_ann_p99_ms']} "
                f"| {s['retrieve_personal_p50_ms']} / {s['retrieve_personal_p99_ms']} "
                f"| {s.get('retrieve_ann_rows_p50_ms', '-')} / {s.get('retrieve_ann_rows_p99_ms', '-')} "
                f"| {s.get('retrieve_personal_rows_p50_ms', '-')} / "
                f"{s.get('retrieve_personal_rows_p99_ms', '-')} |"
            )
    lines += [
        "",
        "The chosen IVF index's search parameters swept on the same loaded index (the service's "
        "`RETRIEVAL_IVF_NPROBE` and `RETRIEVAL_RERANK_FACTOR`; candidates re-scored = "
        "rerank_factor x 500):",
        "",
        "| items | nprobe | rerank_factor | recall@500 | search p50 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for size in results["sizes"]:
        for row in size["kinds"]:
            for point in row.get("sweep", []):
                lines.append(
                    f"| {size['n_items']:,} | {point['nprobe']} | {point['rerank_factor']} "
                    f"| {point['recall_at_500']} | {point['search_p50_ms']} "
                    f"| {point['search_p99_ms']} |"
                )
    lines += ["", "Load average (1, 5, 15 min) of the 2-core machine while each size ran:", ""]
    for size in results["sizes"]:
        after = [row["load_average_after"] for row in size["kinds"] if "load_average_after" in row]
        lines.append(
            f"- {size['n_items']:,} items: before {size.get('load_average_before')}, after each "
            f"index {after}"
        )
    lines += ["", f"Targets at 10 M items: {json.dumps(TARGETS)}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["measure"]:
        directory, work = Path(argv[1]), Path(argv[2])
        points = [tuple(int(x) for x in p.split("x")) for p in argv[3].split(",") if p]
        sweep = [(p[0], p[1]) for p in points]
        print(json.dumps(measure(directory, work / "queries.npy", work / "truth.npy", sweep)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument(
        "--kinds",
        default="flat,ivfpq,ivfpqfs",
        help="index types per size (flat,hnsw,ivfpq,ivfpqfs)",
    )
    parser.add_argument("--hnsw-limit", type=int, default=1_000_000, help="largest HNSW built")
    parser.add_argument("--flat-limit", type=int, default=1_000_000, help="largest exact index")
    parser.add_argument(
        "--ivfpq-limit", type=int, default=1_000_000, help="largest 8-bit IVF-PQ (earlier) built"
    )
    parser.add_argument(
        "--sweep-nprobe", default="128,256,512,1024,2048", help="chosen IVF: nprobe swept"
    )
    parser.add_argument("--sweep-rerank", default="4,8", help="chosen IVF: rerank_factor swept")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--rpcs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-service", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new dir in /tmp")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default="index_scale")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = Path(tempfile.mkdtemp(prefix="index-scale-", dir=args.workdir))
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, faiss {faiss.__version__}",
        "queries": args.queries,
        "k": K,
        "targets": TARGETS,
        "sizes": [],
    }
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            results["sizes"].append(run_size(n, args, work))
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")
            (args.out / f"{args.name}.md").write_text(markdown(results))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
