"""Smoke test of the built CPU images (`make images-smoke`): train, serve hardened, recommend, drain.

Run from the repository root with the project's venv, after scripts/images.sh built the images:
    .venv/bin/python scripts/images_smoke.py [--engine podman] [--tag 0.1.0]
Steps, each checked; the first failure ends the run with exit 1 and the container logs:
  1. what the images hold: the package's version, no torch/matplotlib in the serving image, no
     build mount (wheelhouse, secrets, sources) left in a layer;
  2. the training image trains the synthetic pair as uid 10001 with --network none, and prepares
     a Parquet data set on a local Ray instance there (read-only root, the data mounted read-only)
     into a folder that loads to the same data set as the raw files;
  3. retrieval, ranker and gateway run read-only, as uid 10001, all capabilities dropped,
     no-new-privileges, the repository mounted read-only, on 127.0.0.1 (host network): native gRPC
     health SERVING within 10 s, one Recommend with 10 items, /metrics with the build info;
  4. `stop` drains each server (SIGTERM) with exit code 0;
  5. a ranker as another uid (10002) serves the same published repository (needs the publisher
     to write world-readable modes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.v1 import recommendation_pb2, recommendation_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
TRAIN_UID = 10001
OTHER_UID = 10002
SERVING_WITHIN_S = 10.0
HARDENED = ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
# Paths a build mounts and must leave nowhere in a final image (not even empty).
BUILD_MOUNTS = ["/wheelhouse", "/run/secrets", "/src"]


class SmokeError(Exception):
    """A smoke check failed."""


def log(message: str) -> None:
    print(f"images-smoke: {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Engine:
    """The container engine's CLI (podman or docker), with the containers it started."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.started: list[str] = []

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        proc = subprocess.run(
            [self.binary, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise SmokeError(f"{self.binary} {' '.join(args[:3])}...: {proc.stderr.strip()}")
        return proc.stdout

    def start(self, name: str, image: str, uid: int, run_args: list[str], argv: list[str]) -> None:
        self.run("rm", "--force", name, check=False)
        self.run(
            "run",
            "--detach",
            "--name",
            name,
            "--user",
            f"{uid}:{uid}",
            *HARDENED,
            *run_args,
            image,
            *argv,
        )
        self.started.append(name)

    def exit_code(self, name: str) -> int:
        return int(self.run("inspect", "--format", "{{.State.ExitCode}}", name).strip())

    def running(self, name: str) -> bool:
        return self.run("inspect", "--format", "{{.State.Running}}", name).strip() == "true"

    def logs(self, name: str) -> str:
        proc = subprocess.run(
            [self.binary, "logs", name], capture_output=True, text=True, timeout=30, check=False
        )
        return proc.stdout + proc.stderr

    def cleanup(self) -> None:
        for name in self.started:
            self.run("rm", "--force", name, check=False)


def health(address: str, timeout: float = 1.0) -> int | None:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return None
        return int(reply.status)


def wait_serving(engine: Engine, name: str, address: str, within: float) -> float:
    """Seconds from now until the container's server reports SERVING; fails after `within`."""
    start = time.monotonic()
    status = None
    while time.monotonic() - start < within:
        status = health(address)
        if status == health_pb2.HealthCheckResponse.SERVING:
            return time.monotonic() - start
        if not engine.running(name):
            raise SmokeError(f"{name} exited with {engine.exit_code(name)}")
        time.sleep(0.1)
    raise SmokeError(f"{name} not SERVING within {within:.0f} s (last health status {status})")


def check_images(engine: Engine, serving: str, training: str, version: str) -> None:
    probe = (
        "import importlib.metadata as m, importlib.util as u, json, os, sys;"
        "print(json.dumps({'version': m.version('recsys-transfer'),"
        " 'absent': [p for p in sys.argv[1:] if not os.path.lexists(p)],"
        " 'torch': bool(u.find_spec('torch')), 'matplotlib': bool(u.find_spec('matplotlib'))}))"
    )
    for image, heavy in ((serving, False), (training, True)):
        out = json.loads(
            engine.run(
                "run",
                "--rm",
                "--network",
                "none",
                *HARDENED,
                "--entrypoint",
                "python",
                image,
                "-c",
                probe,
                *BUILD_MOUNTS,
            )
        )
        if out["version"] != version:
            raise SmokeError(f"{image}: package version {out['version']}, expected {version}")
        if out["torch"] != heavy or out["matplotlib"] != heavy:
            raise SmokeError(f"{image}: torch={out['torch']} matplotlib={out['matplotlib']}")
        left = sorted(set(BUILD_MOUNTS) - set(out["absent"]))
        if left:
            raise SmokeError(f"{image}: build mounts left in the image: {left}")
        log(f"{image}: recsys-transfer {out['version']}, torch/matplotlib {heavy}, no build mount")


def offline_job(engine: Engine) -> list[str]:
    """The start of a one-off training-image run: no network, the training uid, hardened."""
    return [
        engine.binary,
        "run",
        "--rm",
        "--network",
        "none",
        "--user",
        f"{TRAIN_UID}:{TRAIN_UID}",
        *HARDENED,
    ]


def train(engine: Engine, image: str, repo: Path) -> float:
    start = time.monotonic()
    proc = subprocess.run(
        [
            *offline_job(engine),
            "--volume",
            f"{repo}:/models:rw",
            image,
            "training",
            "train",
            "--config=/app/training/configs/synthetic.toml",
            "--repository=/models",
            "--run-dir=/tmp/run",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise SmokeError(
            f"training exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    seconds = time.monotonic() - start
    metadata = json.loads((repo / "target-ranker" / "1" / "metadata.json").read_text())
    if metadata.get("code_version") in (None, "", "unknown"):
        raise SmokeError(f"published code_version is {metadata.get('code_version')!r}")
    log(
        f"trained and published target-ranker/retrieval v1 in {seconds:.0f} s "
        f"(code_version {metadata['code_version']})"
    )
    return seconds


PREPARE_DECLARATION = """name = "smoke"
[domains.movies]
file = "movies.parquet"
rating = "stars"
[domains.books]
file = "books.parquet"
"""


def prepare(engine: Engine, image: str, work: Path) -> float:
    """``training prepare`` (Ray Data) in the hardened training image on a small Parquet data set
    with repeated pairs; the prepared folder must load to the raw files' data set."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.data.dataset import load_dataset

    raw, out = work / "raw", work / "prepared"
    raw.mkdir()
    out.mkdir()
    os.chown(out, TRAIN_UID, TRAIN_UID)
    rng = np.random.default_rng(0)
    for domain, rows, items in (("movies", 3000, 200), ("books", 2000, 300)):
        table: dict[str, Any] = {
            "user_id": [f"u{x}" for x in rng.integers(0, 400, rows)],
            "item_id": [f"{domain[0]}{x}" for x in rng.integers(0, items, rows)],
        }
        if domain == "movies":
            table["stars"] = rng.integers(1, 6, rows).astype(np.float64)
        pq.write_table(pa.table(table), raw / f"{domain}.parquet", row_group_size=1000)
    (raw / "dataset.toml").write_text(PREPARE_DECLARATION, encoding="utf-8")
    for path in (raw, *raw.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    start = time.monotonic()
    proc = subprocess.run(
        [
            *offline_job(engine),
            # Ray's object store lives in /dev/shm (the Job mounts a memory-backed emptyDir).
            "--shm-size",
            "256m",
            "--env",
            "RAY_USAGE_STATS_ENABLED=0",
            "--volume",
            f"{raw}:/data/raw:ro",
            "--volume",
            f"{out}:/prepared:rw",
            image,
            "training",
            "prepare",
            "--engine=ray",
            "--dataset=/data/raw",
            "--out=/prepared/smoke",
            "--num-cpus=1",
            "--object-store-mib=128",
            "--partitions=2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise SmokeError(
            f"training prepare exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    expected, got = load_dataset(raw), load_dataset(out / "smoke")
    if got.fingerprint != expected.fingerprint or list(got.domains) != list(expected.domains):
        raise SmokeError(f"the prepared folder is not the raw data set: {got.domains.keys()}")
    for name, d in expected.domains.items():
        g = got.domains[name]
        same = d.user_vocab.equals(g.user_vocab) and d.item_vocab.equals(g.item_vocab)
        if not (
            same
            and np.array_equal(d.user_codes, g.user_codes)
            and np.array_equal(d.item_codes, g.item_codes)
        ):
            raise SmokeError(f"{name}: the prepared interactions differ from the raw ones")
    rows = sum(d.stats["rows"] for d in expected.domains.values())
    log(
        f"prepared {rows:,} Parquet rows on Ray Data in the training image in {seconds:.0f} s "
        f"(2 partitions); they load to the raw files' data set"
    )
    return seconds


def serve_args(repo: Path, grpc_port: int, metrics_port: int) -> tuple[list[str], list[str]]:
    run_args = ["--network", "host", "--volume", f"{repo}:/models:ro"]
    argv = ["--host=127.0.0.1", f"--port={grpc_port}", f"--metrics-port={metrics_port}"]
    return run_args, argv


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def recommend(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = recommendation_pb2_grpc.RecommendationServiceStub(channel).Recommend(
            recommendation_pb2.RecommendRequest(user_id=first_user(), domain="target", k=10),
            timeout=10,
        )
    if reply.degraded:
        raise SmokeError(f"Recommend degraded: {list(reply.degradations)}")
    return len(reply.items)


_REPO: Path | None = None


def first_user() -> str:
    assert _REPO is not None
    users = json.loads((_REPO / "target-retrieval" / "1" / "users.json").read_text())
    return str(users["ids"][0])


def stop(engine: Engine, name: str) -> int:
    engine.run("stop", "--time", "30", name, timeout=60)
    return engine.exit_code(name)


def main() -> int:
    global _REPO
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default=os.environ.get("ENGINE", "podman"))
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    parser.add_argument("--tag", default=version)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    engine = Engine(args.engine)
    serving = f"localhost/recsys-transfer:{args.tag}"
    training = f"localhost/recsys-transfer-training:{args.tag}"
    figures: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="recsys-images-smoke-"))
    repo = work / "models"
    repo.mkdir()
    # The publisher writes as the training uid; the servers only read.
    os.chown(repo, TRAIN_UID, TRAIN_UID)
    _REPO = repo
    names = {m: f"recsys-smoke-{m}" for m in ("retrieval", "ranker", "gateway", "ranker-other")}
    ports = {m: (free_port(), free_port()) for m in names}
    try:
        check_images(engine, serving, training, version)
        figures["train_s"] = train(engine, training, repo)
        figures["prepare_s"] = prepare(engine, training, work)

        for module, service, models in (
            ("retrieval", "serving.retrieval", "target-retrieval"),
            ("ranker", "serving.ranking", "target-ranker"),
        ):
            run_args, argv = serve_args(repo, *ports[module])
            engine.start(
                names[module], serving, TRAIN_UID, run_args, [service, *argv, f"--models={models}"]
            )
            figures[f"{module}_serving_s"] = wait_serving(
                engine, names[module], f"127.0.0.1:{ports[module][0]}", SERVING_WITHIN_S
            )
        run_args, argv = serve_args(repo, *ports["gateway"])
        engine.start(
            names["gateway"],
            serving,
            TRAIN_UID,
            run_args,
            [
                "gateway",
                *argv,
                "--domains=target",
                f"--retrieval-target=127.0.0.1:{ports['retrieval'][0]}",
                f"--ranker-targets=127.0.0.1:{ports['ranker'][0]}",
            ],
        )
        gateway = f"127.0.0.1:{ports['gateway'][0]}"
        figures["gateway_serving_s"] = wait_serving(
            engine, names["gateway"], gateway, SERVING_WITHIN_S
        )
        log(
            "health SERVING: "
            + ", ".join(
                f"{m} {figures[f'{m}_serving_s']:.1f} s" for m in ("retrieval", "ranker", "gateway")
            )
        )

        for module in ("retrieval", "ranker", "gateway"):
            proc_status = engine.run("exec", names[module], "cat", "/proc/1/status")
            uid = re.search(r"^Uid:\s+(\d+)", proc_status, re.M)
            cap = re.search(r"^CapEff:\s+([0-9a-f]+)", proc_status, re.M)
            if not uid or int(uid.group(1)) != TRAIN_UID or not cap or int(cap.group(1), 16):
                raise SmokeError(
                    f"{module}: not uid {TRAIN_UID} with no capabilities: {proc_status[:400]}"
                )
            probe = engine.run(
                "exec", names[module], "sh", "-c", "touch /models/x /opt/venv/x 2>&1 || true"
            )
            if probe.count("Read-only file system") != 2:
                raise SmokeError(
                    f"{module}: the repository or the root file system is writable: {probe}"
                )
        log(f"servers run as uid {TRAIN_UID}, CapEff 0, root file system and repository read-only")

        items = recommend(gateway)
        if items != 10:
            raise SmokeError(f"Recommend returned {items} items, expected 10")
        log("Recommend(k=10) through the gateway: 10 items, not degraded")

        # Each server counted the call it served for that Recommend and reports its build.
        for module in ("retrieval", "ranker", "gateway"):
            text = metrics_text(ports[module][1])
            handled = re.findall(
                r'^recsys_grpc_requests_total\{([^}]*grpc_code="OK"[^}]*)\} (\S+)', text, re.M
            )
            if not any(float(n) >= 1 for _, n in handled):
                raise SmokeError(f"{module}: /metrics counts no successful call: {handled}")
            info = re.search(r'^recsys_build_info\{version="([^"]+)"\}', text, re.M)
            if not info or info.group(1) != version:
                raise SmokeError(f"{module}: /metrics has no recsys_build_info for {version}")
        log(f"/metrics served by all three, each counting its successful call, build {version}")

        for module in ("gateway", "ranker", "retrieval"):
            code = stop(engine, names[module])
            if code != 0:
                raise SmokeError(
                    f"{module}: stop (SIGTERM) exited {code}:\n{engine.logs(names[module])[-2000:]}"
                )
        log("stop drained gateway, ranker and retrieval with exit code 0")

        # Last: depends on the publisher's modes (version directories readable by every uid).
        run_args, argv = serve_args(repo, *ports["ranker-other"])
        engine.start(
            names["ranker-other"],
            serving,
            OTHER_UID,
            run_args,
            ["serving.ranking", *argv, "--models=target-ranker"],
        )
        address = f"127.0.0.1:{ports['ranker-other'][0]}"
        try:
            wait_serving(engine, names["ranker-other"], address, SERVING_WITHIN_S)
        except SmokeError as err:
            raise SmokeError(
                f"a ranker as uid {OTHER_UID} cannot serve the repository published by uid "
                f"{TRAIN_UID}: {err}\n{engine.logs(names['ranker-other'])[-1500:]}"
            ) from None
        if stop(engine, names["ranker-other"]) != 0:
            raise SmokeError("the other-uid ranker did not drain with exit code 0")
        log(f"a ranker as uid {OTHER_UID} serves the repository published by uid {TRAIN_UID}")
    except (SmokeError, subprocess.TimeoutExpired, grpc.RpcError) as err:
        log(f"FAILED: {err}")
        for name in engine.started:
            log(f"--- {name} (last lines)\n{engine.logs(name)[-1500:]}")
        status = 1
    else:
        log("passed")
        status = 0
    finally:
        engine.cleanup()
        shutil.rmtree(work, ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
