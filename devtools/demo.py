"""The end-to-end demo: train with transfer, publish, start retrieval, ranking and the gateway as
processes, recommend for a warm and a cold-start user, show a few metrics, stop everything.

    python -m devtools.demo [--config=training/configs/amazon_movies_to_books.toml]
                           [--data-dir=../shared/data] [--workdir=runs/demo] [--k=10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]

from devtools.processes import ServiceProcess, project_env  # noqa: E402
from recsys.repository import list_versions, read_metadata, version_dir  # noqa: E402
from recsys.v1 import common_pb2, recommendation_pb2, recommendation_pb2_grpc  # noqa: E402

DEFAULT_CONFIG = "training/configs/amazon_movies_to_books.toml"
SYNTHETIC_CONFIG = "training/configs/synthetic.toml"
MOVIELENS_CONFIG = "training/configs/ml100k_comedy_to_drama.toml"
SHOWN_METRICS = (
    "recsys_grpc_requests_total",
    "recsys_ranker_batch_candidates_count",
    "recsys_ranker_model_loaded",
    "recsys_retrieval_model_loaded",
    "recsys_gateway_degraded_total",
)


def step(n: int, text: str) -> None:
    print(f"\n==> [{n}/6] {text}", flush=True)


def choose_data(args: argparse.Namespace, workdir: Path) -> tuple[str, list[str]]:
    """The training config and data flags: the Amazon pair where it is; else MovieLens-100K's
    comedy -> drama genre pair, from the data folder or downloaded from GroupLens; else the
    synthetic generator."""
    data_dir = Path(args.data_dir) if args.data_dir else ROOT.parent / "shared" / "data"
    if args.config:
        return args.config, [f"--data-dir={data_dir}"] if data_dir.is_dir() else []
    if (data_dir / "amazon-books-movies").is_dir():
        print(f"Data: Amazon movies -> books from {data_dir / 'amazon-books-movies'}")
        return DEFAULT_CONFIG, [f"--data-dir={data_dir}"]
    if (data_dir / "movielens-100k").is_dir():
        print(f"Data: MovieLens-100K comedy -> drama from {data_dir / 'movielens-100k'}")
        return MOVIELENS_CONFIG, [f"--data-dir={data_dir}"]
    downloads = workdir / "data"
    print(f"No data at {data_dir}: downloading MovieLens-100K from GroupLens into {downloads}")
    fetched = subprocess.run(
        [sys.executable, "-m", "training", "download", "ml-100k", f"--dest={downloads}"],
        cwd=ROOT,
        env=project_env(),
    )
    if fetched.returncode == 0:
        (downloads / "ml-100k").replace(downloads / "movielens-100k")
        return MOVIELENS_CONFIG, [f"--data-dir={downloads}"]
    print(
        f"NOTICE: no data at {data_dir} (pass --data-dir) and no download. The demo trains on "
        "the synthetic cross-domain generator instead; its figures say nothing about real data."
    )
    return SYNTHETIC_CONFIG, []


def train(config: str, data_flags: list[str], workdir: Path) -> Path:
    repo = workdir / "model_repository"
    cmd = [
        sys.executable,
        "-m",
        "training",
        "train",
        f"--config={config}",
        f"--repository={repo}",
        f"--run-dir={workdir / 'run'}",
        *data_flags,
    ]
    print("$ python " + " ".join(cmd[1:]), flush=True)
    result = subprocess.run(cmd, cwd=ROOT, env=project_env())
    if result.returncode != 0:
        raise SystemExit(f"training failed with exit code {result.returncode}")
    return repo


def published(repo: Path) -> tuple[str, int]:
    domains = sorted(
        p.name[: -len("-ranker")]
        for p in repo.iterdir()
        if p.name.endswith("-ranker") and not p.name.endswith("-dot-ranker")
    )
    if not domains:
        raise SystemExit(f"training published no ranker into {repo}")
    domain = domains[0]
    return domain, list_versions(repo, f"{domain}-ranker")[-1]


def pick_users(repo: Path, domain: str, version: int) -> tuple[str, str | None]:
    users = json.loads(
        (version_dir(repo, f"{domain}-retrieval", version) / "users.json").read_text()
    )
    warm = next(u for u, k in zip(users["ids"], users["kinds"], strict=True) if k == "target")
    cold = next(
        (u for u, k in zip(users["ids"], users["kinds"], strict=True) if k == "mapped"), None
    )
    return warm, cold


def start_services(repo: Path, domain: str, logs: Path) -> list[ServiceProcess]:
    logs.mkdir(parents=True, exist_ok=True)
    common = {"LOG_LEVEL": "WARNING"}
    retrieval = ServiceProcess(
        "serving.retrieval",
        [f"--model-repository={repo}", f"--models={domain}-retrieval"],
        log_path=logs / "retrieval.log",
        env={f"RETRIEVAL_{k}": v for k, v in common.items()},
    )
    ranker = ServiceProcess(
        "serving.ranking",
        [f"--model-repository={repo}", f"--models={domain}-ranker"],
        log_path=logs / "ranker.log",
        env={f"RANKING_{k}": v for k, v in common.items()},
    )
    for proc in (retrieval, ranker):
        proc.wait_serving(120)
        print(f"  {proc.module:18s} SERVING on {proc.address} (metrics :{proc.metrics_port})")
    gateway = ServiceProcess(
        "gateway",
        [
            f"--retrieval-target={retrieval.address}",
            f"--ranker-targets={ranker.address}",
            f"--domains={domain}",
        ],
        log_path=logs / "gateway.log",
        env={f"GATEWAY_{k}": v for k, v in common.items()},
    )
    gateway.wait_serving(60)
    print(f"  {gateway.module:18s} SERVING on {gateway.address} (metrics :{gateway.metrics_port})")
    return [retrieval, ranker, gateway]


def recommend(gateway: ServiceProcess, user: str, domain: str, k: int, label: str) -> None:
    source_name = common_pb2.CandidateSource.Name
    with grpc.insecure_channel(gateway.address) as channel:
        stub = recommendation_pb2_grpc.RecommendationServiceStub(channel)
        start = time.perf_counter()
        reply = stub.Recommend(
            recommendation_pb2.RecommendRequest(
                user_id=user, domain=domain, k=k, exclude_seen=True
            ),
            timeout=5,
        )
        ms = (time.perf_counter() - start) * 1000
    versions = ", ".join(f"{m.model_name} v{m.model_version}" for m in reply.model_versions)
    print(f"\n{label}: user {user} — {len(reply.items)} items in {ms:.1f} ms ({versions})")
    if reply.degraded:
        reasons = "; ".join(
            f"{recommendation_pb2.DegradationReason.Name(d.reason)}: {d.detail}"
            for d in reply.degradations
        )
        print(f"  DEGRADED: {reasons}")
    # `was`: the item's place in the merged retrieval order before the ranker reordered it;
    # `sources`: every candidate source that proposed it (the first is the one it came from).
    print(f"  {'#':>2}  {'was':>4}  {'score':>8}  {'sources':<26}  item")
    for rank, item in enumerate(reply.items, 1):
        sources = "+".join(
            source_name(s).removeprefix("CANDIDATE_SOURCE_").lower()
            for s in (item.sources or [item.source])
        )
        title = f"{item.item_id}  {item.title}" if item.title else item.item_id
        was = str(item.retrieval_position) if item.retrieval_position else "-"
        print(f"  {rank:>2}  {was:>4}  {item.score:8.3f}  {sources:<26}  {title[:80]}")
    moved = sum(1 for item in reply.items if item.retrieval_position > len(reply.items))
    if any(item.retrieval_position for item in reply.items):
        print(
            f"  the ranker moved {moved} of these {len(reply.items)} items up from below "
            f"retrieval's top {len(reply.items)}"
        )


def show_metrics(procs: list[ServiceProcess]) -> None:
    for proc in procs:
        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        lines = [
            line
            for line in body.splitlines()
            if line.startswith(SHOWN_METRICS) and not line.startswith("#")
        ]
        print(f"  {proc.module}:")
        for line in lines[:6]:
            print(f"    {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="training config (default: the Amazon pair)")
    parser.add_argument("--data-dir", help="data sets folder (default: ../shared/data)")
    parser.add_argument("--workdir", default="runs/demo", help="where the run and repository go")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    workdir = (ROOT / args.workdir).resolve()
    os.makedirs(workdir, exist_ok=True)
    started = time.monotonic()

    step(1, "Training: pretrain on the source domain, transfer, evaluate against baselines")
    config, data_flags = choose_data(args, workdir)
    repo = train(config, data_flags, workdir)

    step(2, "Published model versions")
    domain, version = published(repo)
    for kind in ("ranker", "dot-ranker", "retrieval"):
        if not version_dir(repo, f"{domain}-{kind}", version).is_dir():
            continue
        meta = read_metadata(version_dir(repo, f"{domain}-{kind}", version))
        what = meta.get("strategy", "?")
        if "features" in meta:
            v = meta.get("training", {}).get("validation", {})
            what = (
                f"learned ranker over {len(meta['features']['names'])} features of "
                f"{meta['features']['retrieval_model']} v{meta['features']['retrieval_version']}; "
                f"validation NDCG@10 retrieval order {v.get('retrieval', 0):.4f}, dot product "
                f"{v.get('dot', 0):.4f}, learned {v.get('learned', 0):.4f}"
            )
        print(f"  {repo / meta['name'] / str(version)}  ({what})")

    step(3, "Starting retrieval, ranking and the gateway as processes")
    procs = start_services(repo, domain, workdir / "logs")
    try:
        step(4, "Recommend over gRPC")
        warm, cold = pick_users(repo, domain, version)
        recommend(procs[2], warm, domain, args.k, "Warm user (has target-domain history)")
        if cold is not None:
            recommend(procs[2], cold, domain, args.k, "Cold-start user (source domain only)")
        else:
            print("  (this model has no cold-start users)")

        step(5, "A few Prometheus metrics")
        show_metrics(procs)
    finally:
        step(6, "Stopping every service (SIGTERM, drain)")
        for proc in reversed(procs):
            code = proc.terminate()
            print(f"  {proc.module:18s} exited with {code}")
    print(f"\nDemo finished in {time.monotonic() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
