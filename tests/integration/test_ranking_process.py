"""The ranking service as a real process (`python -m serving.ranking`): health transitions (NOT_SERVING
until a model loads, SERVING after, NOT_SERVING while draining), reload on SIGHUP, the real
tritonclient reading metadata and scoring, and a clear failure when CUDA is demanded but absent."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2

from devtools.processes import REPO_ROOT, ServiceProcess, health_status, project_env
from devtools.tiny_models import (
    make_tiny_model,
    publish_corrupt_version,
    publish_tiny_model,
    ranker_graph,
)
from recsys.v1 import ranking_pb2_grpc
from tests.integration.test_ranking_server import (
    assert_close,
    ort_scores,
    publish_graph,
    rank_request,
    slow_ranker_graph,
)

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _wait_health(address: str, wanted: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health_status(address) == wanted:
            return
        time.sleep(0.1)
    raise AssertionError(f"health of {address} never became {wanted}")


def test_health_follows_loading_reload_on_sighup_and_drain_on_sigterm(tmp_path: Path) -> None:
    publish_corrupt_version(tmp_path, "hp-ranker")
    proc = ServiceProcess(
        "serving.ranking",
        [
            f"--model-repository={tmp_path}",
            "--models=hp-ranker",
            "--poll-interval-s=0",
            "--provider=cpu",
            "--intra-op-threads=1",
            "--max-batch-candidates=4000",
            "--max-candidates-per-request=4000",
            "--grace-period-s=20",
        ],
        log_path=tmp_path / "ranker.log",
    )
    try:
        # Up, but no loadable version: NOT_SERVING, and Rank says UNAVAILABLE.
        _wait_health(proc.address, NOT_SERVING)
        time.sleep(0.5)
        assert health_status(proc.address) == NOT_SERVING
        with grpc.insecure_channel(proc.address) as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Rank(rank_request("hp-ranker", "u1", ["i1"]), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # A good version is published; SIGHUP loads it and the service turns SERVING.
        tiny = make_tiny_model("hp")
        version = publish_graph(
            tmp_path, "hp-ranker", slow_ranker_graph(tiny.user_emb, tiny.item_emb), tiny
        )
        proc.proc.send_signal(signal.SIGHUP)
        proc.wait_serving(30)
        # SIGTERM while a slow call is in flight: NOT_SERVING, the call finishes, exit 0.
        result: dict[str, object] = {}

        def slow_call() -> None:
            with grpc.insecure_channel(proc.address) as channel:
                stub = ranking_pb2_grpc.RankingServiceStub(channel)
                items = [tiny.item_ids[j % 120] for j in range(4000)]
                try:
                    calls = [
                        stub.Rank.future(rank_request("hp-ranker", "u1", items), timeout=30)
                        for _ in range(4)
                    ]
                    result["replies"] = [c.result() for c in calls]
                except grpc.RpcError as exc:
                    result["error"] = exc

        thread = threading.Thread(target=slow_call)
        thread.start()
        time.sleep(0.15)
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        assert health_status(proc.address) in (NOT_SERVING, None)
        thread.join(60)
        assert proc.proc.wait(30) == 0
        assert "error" not in result, result.get("error")
        replies = result["replies"]
        assert [r.model_version for r in replies] == [str(version)] * 4  # type: ignore[attr-defined]
        log = proc.log()
        assert "Failed to load hp-ranker version 1" in log
        assert "Shutdown signal received" in log
    finally:
        proc.kill()


def test_tritonclient_reads_metadata_and_scores(tmp_path: Path) -> None:
    tiny = publish_tiny_model(tmp_path, make_tiny_model("tc"))
    proc = ServiceProcess(
        "serving.ranking",
        [],
        log_path=tmp_path / "ranker.log",
        # Settings from the environment this time (the other tests use flags).
        env={
            "RANKING_MODEL_REPOSITORY": str(tmp_path),
            "RANKING_PROVIDER": "auto",
            "RANKING_POLL_INTERVAL_S": "0",
        },
    )
    try:
        proc.wait_serving(60)
        users, items = [0, 3, 3, 44], [7, 7, 100, 0]
        out = subprocess.run(
            [
                sys.executable,
                str(REPO_ROOT / "tests/utils/triton_probe.py"),
                "--url",
                proc.address,
                "--model",
                "tc-ranker",
                "--infer",
                json.dumps({"user_index": users, "item_index": items}),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=project_env(),
            check=True,
        )
        answer = json.loads(out.stdout)
        assert answer["live"] is True and answer["ready"] is True
        assert answer["server_metadata"]["name"] == "recsys-ranker"
        assert answer["model_ready"] is True
        meta = answer["model_metadata"]
        assert meta["name"] == "tc-ranker" and meta["platform"] == "onnxruntime_onnx"
        assert {i["name"] for i in meta["inputs"]} == {"user_index", "item_index"}
        assert meta["outputs"][0]["name"] == "score"
        assert answer["infer"]["model_version"] == str(tiny.version)
        expected = ort_scores(tmp_path, "tc-ranker", tiny.version, users, items)
        assert_close(answer["infer"]["outputs"]["score"], expected)
        # MODELS unset: every ranker in the repository is served (not the retrieval model).
        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        provider = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
        assert (
            f'recsys_ranker_model_loaded{{model="tc-ranker",provider="{provider}",'
            f'version="{tiny.version}"}} 1.0' in body
        )
        assert "using CPU" in proc.log() or provider == "cuda"
        assert "tc-retrieval" not in body
        # Counters and histograms without their `_created` series.
        assert "recsys_ranker_requests_total{" in body and "_bucket{" in body
        assert "_created" not in body
    finally:
        proc.terminate()


# A Triton configuration with a batch dimension: clients send [N, 1]; Triton would reshape to
# the graph's [N] (reshape: { shape: [] }); the ranking service accepts [N, 1] directly.
BATCHED_CONFIG = """
name: "tb-ranker"
platform: "onnxruntime_onnx"
max_batch_size: 4096
input [
  { name: "user_index" data_type: TYPE_INT64 dims: [ 1 ] reshape: { shape: [ ] } },
  { name: "item_index" data_type: TYPE_INT64 dims: [ 1 ] reshape: { shape: [ ] } }
]
output [ { name: "score" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } } ]
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group [ { kind: KIND_CPU count: 1 } ]
model_warmup { name: "a field this server does not model" }
"""


UNBATCHED_CONFIG = """
name: "tu-ranker"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [
  { name: "user_index" data_type: TYPE_INT64 dims: [ -1 ] },
  { name: "item_index" data_type: TYPE_INT64 dims: [ -1 ] }
]
output [ { name: "score" data_type: TYPE_FP32 dims: [ -1 ] } ]
"""


def _triton_probe(address: str, model: str, *extra: str) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "tests/utils/triton_probe.py"),
            "--url",
            address,
            "--model",
            model,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=project_env(),
        check=True,
    )
    answer: dict[str, Any] = json.loads(out.stdout)
    return answer


def test_tritonclient_model_config_statistics_index_and_a_stock_request(tmp_path: Path) -> None:
    """get_model_config, get_inference_statistics and the repository index answer, and a request
    built from nothing but get_model_config succeeds: for the config the project publishes, for
    one without a batch dimension ([N]) and for another with one ([N, 1])."""
    tiny = publish_tiny_model(tmp_path, make_tiny_model("tc"))
    batched = publish_graph(
        tmp_path,
        "tb-ranker",
        ranker_graph(tiny.user_emb, tiny.item_emb),
        tiny,
        config=BATCHED_CONFIG,
    )
    unbatched = publish_graph(
        tmp_path,
        "tu-ranker",
        ranker_graph(tiny.user_emb, tiny.item_emb),
        tiny,
        config=UNBATCHED_CONFIG,
    )
    proc = ServiceProcess(
        "serving.ranking",
        [f"--model-repository={tmp_path}", "--poll-interval-s=0", "--provider=cpu"],
        log_path=tmp_path / "ranker.log",
    )
    try:
        proc.wait_serving(60)
        n = 12
        for model, version, shape in (
            ("tc-ranker", tiny.version, [n, 1]),
            ("tu-ranker", unbatched, [n]),
            ("tb-ranker", batched, [n, 1]),
        ):
            answer = _triton_probe(proc.address, model, "--stock", str(n))
            assert "stock_error" not in answer, answer["stock_error"]
            config = answer["config"]
            assert config["name"] == model
            assert (
                config.get("backend") == "onnxruntime" or config["platform"] == "onnxruntime_onnx"
            )
            assert {i["name"] for i in config["input"]} == {"user_index", "item_index"}
            stock = answer["stock"]
            assert stock["sent"]["item_index"]["shape"] == shape and stock["shape"] == shape
            users = stock["sent"]["user_index"]["values"]
            items = stock["sent"]["item_index"]["values"]
            expected = ort_scores(tmp_path, model, version, users, items)
            assert_close(stock["scores"], expected)
            # Statistics of that version: the one request, n candidates, at least one run.
            (stats,) = answer["statistics"]["model_stats"]
            assert stats["name"] == model and stats["version"] == str(version)
            assert int(stats["inference_count"]) == n
            assert int(stats["execution_count"]) >= 1
            assert int(stats["inference_stats"]["success"]["count"]) == 1
            assert int(stats["inference_stats"]["compute_infer"]["ns"]) > 0
            assert int(stats["last_inference"]) > 0
            every = {(s["name"], s["version"]) for s in answer["all_statistics"]["model_stats"]}
            assert every == {
                ("tc-ranker", str(tiny.version)),
                ("tu-ranker", str(unbatched)),
                ("tb-ranker", str(batched)),
            }
            index = {(m["name"], m["version"], m["state"]) for m in answer["index"]["models"]}
            assert index == {
                ("tc-ranker", str(tiny.version), "READY"),
                ("tu-ranker", str(unbatched), "READY"),
                ("tb-ranker", str(batched), "READY"),
            }
        assert "tb-ranker" in config["name"]
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == "2000"
    finally:
        proc.terminate()


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is present here"
)
def test_cuda_provider_demanded_but_absent_fails_at_start(tmp_path: Path) -> None:
    publish_tiny_model(tmp_path, make_tiny_model("gpu"))
    proc = ServiceProcess(
        "serving.ranking",
        [f"--model-repository={tmp_path}", "--provider=cuda"],
        log_path=tmp_path / "ranker.log",
    )
    try:
        assert proc.proc.wait(60) == 2
        assert "provider 'cuda' was requested" in proc.log()
    finally:
        proc.kill()


def _start_calls(
    address: str, model: str, user: str, items: list[str], n: int
) -> tuple[grpc.Channel, list[grpc.Future]]:
    channel = grpc.insecure_channel(address)
    stub = ranking_pb2_grpc.RankingServiceStub(channel)
    request = rank_request(model, user, items)
    stub.Rank(request, timeout=30)  # connected and warm
    return channel, [stub.Rank.future(request, timeout=60) for _ in range(n)]


def _outcomes(calls: list[grpc.Future]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for call in calls:
        try:
            call.result()
            name = "OK"
        except grpc.RpcError as exc:
            name = exc.code().name
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_sigterm_lets_every_in_flight_call_finish(tmp_path: Path) -> None:
    """Issue 17: SIGTERM with 40 Rank calls of 10,000 candidates in flight; before, about half
    were CANCELLED and the server exited in ~0.5 s with most of its grace period left."""
    tiny = publish_tiny_model(tmp_path, make_tiny_model("dr"))
    proc = ServiceProcess(
        "serving.ranking",
        [
            f"--model-repository={tmp_path}",
            "--models=dr-ranker",
            "--poll-interval-s=0",
            "--provider=cpu",
            "--grace-period-s=30",
        ],
        log_path=tmp_path / "ranker.log",
    )
    try:
        proc.wait_serving(60)
        items = [tiny.item_ids[j % len(tiny.item_ids)] for j in range(10_000)]
        channel, calls = _start_calls(proc.address, "dr-ranker", tiny.user_ids[1], items, 40)
        time.sleep(0.05)
        proc.proc.send_signal(signal.SIGTERM)
        outcomes = _outcomes(calls)
        channel.close()
        assert proc.proc.wait(60) == 0
        assert outcomes == {"OK": 40}, outcomes
        log = proc.log()
        assert "Draining:" in log and "Drained: no call in flight was cancelled" in log
    finally:
        proc.kill()


def test_calls_still_running_when_the_grace_period_ends_are_cancelled_and_counted(
    tmp_path: Path,
) -> None:
    tiny = make_tiny_model("gr")
    publish_graph(tmp_path, "gr-ranker", slow_ranker_graph(tiny.user_emb, tiny.item_emb), tiny)
    proc = ServiceProcess(
        "serving.ranking",
        [
            f"--model-repository={tmp_path}",
            "--models=gr-ranker",
            "--poll-interval-s=0",
            "--provider=cpu",
            "--intra-op-threads=1",
            "--max-batch-candidates=4000",
            "--max-candidates-per-request=4000",
            "--grace-period-s=0.5",
        ],
        log_path=tmp_path / "ranker.log",
    )
    try:
        proc.wait_serving(60)
        items = [tiny.item_ids[j % len(tiny.item_ids)] for j in range(4000)]
        start = time.monotonic()
        channel, calls = _start_calls(proc.address, "gr-ranker", tiny.user_ids[1], items, 1)
        one_call = time.monotonic() - start
        # Enough queued work to outlast the grace period many times over.
        more = max(8, int(4 / max(one_call, 0.05)))
        calls = _start_calls(proc.address, "gr-ranker", tiny.user_ids[1], items, more)[1]
        time.sleep(0.2)
        proc.proc.send_signal(signal.SIGTERM)
        outcomes = _outcomes(calls)
        channel.close()
        assert proc.proc.wait(60) == 0
        # The calls still running when the grace period ended fail (CANCELLED, or UNAVAILABLE as
        # the connection closes), and the log says how many.
        failed = sum(n for code, n in outcomes.items() if code != "OK")
        assert failed > 0 and set(outcomes) <= {"OK", "CANCELLED", "UNAVAILABLE"}, outcomes
        assert f"Grace period of 0.5 s over: {failed} calls cancelled" in proc.log()
    finally:
        proc.kill()
