"""The ranking service in-process on loopback (port 0): scores equal ONNX Runtime's through both
APIs, batching, deadlines, cancellation, a bounded queue, version swaps under load, corrupt
versions, and every bad-input case."""

from __future__ import annotations

import json
import math
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import REGISTRY

from devtools.tiny_models import (
    OPSET,
    RANKER_INPUTS,
    RANKER_OUTPUTS,
    TinyModel,
    make_tiny_model,
    publish_tiny_model,
)
from recsys.inference import grpc_service_pb2 as pb
from recsys.inference import grpc_service_pb2_grpc as pb_grpc
from recsys.repository import VersionPublisher
from recsys.v1 import ranking_pb2, ranking_pb2_grpc
from serving.ranking.config import RankingSettings
from serving.ranking.manager import ModelManager
from serving.ranking.server import build_server, create_manager
from tests.utils.servers import BackgroundServer

pytestmark = pytest.mark.integration


# -- helpers (also used by test_ranking_process.py) --------------------------------------------


def slow_ranker_graph(
    user_emb: np.ndarray, item_emb: np.ndarray, *, depth: int = 12, width: int = 384
) -> onnx.ModelProto:
    """A ranker whose cost per candidate is a chain of `depth` [width x width] layers, so that a
    few thousand candidates keep a session busy long enough to queue requests behind it."""
    rng = np.random.default_rng(7)
    dim = user_emb.shape[1]
    w_in = (rng.normal(size=(dim, width)) / np.sqrt(dim)).astype(np.float32)
    w_hidden = (rng.normal(size=(width, width)) / np.sqrt(width)).astype(np.float32)
    w_out = (rng.normal(size=(width, 1)) / np.sqrt(width)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["U", "user_index"], ["u"], axis=0),
        helper.make_node("Gather", ["V", "item_index"], ["v"], axis=0),
        helper.make_node("Mul", ["u", "v"], ["uv"]),
        helper.make_node("MatMul", ["uv", "W_in"], ["h0_pre"]),
        helper.make_node("Tanh", ["h0_pre"], ["h0"]),
    ]
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "W_hidden"], [f"h{i + 1}_pre"]))
        nodes.append(helper.make_node("Tanh", [f"h{i + 1}_pre"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"h{depth}", "W_out"], ["s2"]))
    nodes.append(helper.make_node("ReduceSum", ["s2", "axes"], ["score"], keepdims=0))
    graph = helper.make_graph(
        nodes,
        "slow_ranker",
        [
            helper.make_tensor_value_info("user_index", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("item_index", TensorProto.INT64, ["N"]),
        ],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])],
        initializer=[
            numpy_helper.from_array(user_emb.astype(np.float32), "U"),
            numpy_helper.from_array(item_emb.astype(np.float32), "V"),
            numpy_helper.from_array(w_in, "W_in"),
            numpy_helper.from_array(w_hidden, "W_hidden"),
            numpy_helper.from_array(w_out, "W_out"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def publish_graph(
    repo: Path,
    name: str,
    graph: onnx.ModelProto,
    tiny: TinyModel,
    *,
    inputs: list[dict[str, Any]] | None = None,
    config: str | None = None,
) -> int:
    """Publish one ranker version with `graph` and the tiny model's vocabularies (and a
    config.pbtxt, if given)."""
    with VersionPublisher(repo, [name]) as pub:
        d = pub.stage(name)
        onnx.save(graph, d / "model.onnx")
        if config is not None:
            (d / "config.pbtxt").write_text(config)
        (d / "users.json").write_text(json.dumps({"ids": tiny.user_ids, "kinds": tiny.user_kinds}))
        (d / "items.json").write_text(
            json.dumps(
                {
                    "ids": tiny.item_ids,
                    "titles": tiny.titles,
                    "popularity": [0] * len(tiny.item_ids),
                }
            )
        )
        (d / "metadata.json").write_text(
            json.dumps(
                {
                    "kind": "ranker",
                    "inputs": inputs or RANKER_INPUTS,
                    "outputs": RANKER_OUTPUTS,
                    "opset": OPSET,
                }
            )
        )
    assert pub.version is not None
    return pub.version


def ort_scores(
    repo: Path, name: str, version: int, users: list[int], items: list[int]
) -> np.ndarray:
    """The scores ONNX Runtime gives when the version's graph is run directly."""
    session = ort.InferenceSession(
        str(repo / name / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds = {
        "user_index": np.asarray(users, dtype=np.int64),
        "item_index": np.asarray(items, dtype=np.int64),
    }
    return np.asarray(session.run(["score"], feeds)[0], dtype=np.float32)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def assert_close(actual: Any, expected: Any) -> None:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    rel = np.abs(actual - expected) / np.maximum(np.abs(expected), 1e-6)
    assert rel.max() <= 1e-5, f"relative error {rel.max():.2e}"


class Ranker:
    """A ranker server on a background loop, with its manager, stubs and a clean stop."""

    def __init__(self, repo: Path, model: str, **overrides: Any) -> None:
        values: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "metrics_port": 0,
            "model_repository": repo,
            "models": model,
            "poll_interval_s": 0,
            "provider": "cpu",
            "intra_op_threads": 1,
            "max_batch_candidates": 4096,
        }
        values.update(overrides)
        self.settings = RankingSettings(**values)
        self.model = model
        self.manager: ModelManager = create_manager(self.settings)

        async def factory():  # type: ignore[no-untyped-def]
            await self.manager.start()
            return build_server(self.settings, self.manager)

        self.bg = BackgroundServer(factory)
        self.channel = grpc.insecure_channel(self.bg.address)
        self.rank = ranking_pb2_grpc.RankingServiceStub(self.channel)
        self.oip = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def reload(self, retry_failed: bool = False) -> None:
        self.bg.run(self.manager.reload(retry_failed=retry_failed))

    def close(self) -> None:
        self.channel.close()
        self.bg.run(self.bg.server.stop(1.0))
        self.bg.run(self.manager.close())
        self.bg.stop(0)


def rank_request(
    model: str, user: str, items: list[str], version: str = ""
) -> ranking_pb2.RankRequest:
    return ranking_pb2.RankRequest(
        model_name=model, model_version=version, user_id=user, item_ids=items
    )


def infer_request(
    model: str, users: list[int], items: list[int], *, raw: bool = True, version: str = ""
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version, id="req-1")
    for name, values in (("user_index", users), ("item_index", items)):
        tensor = request.inputs.add(name=name, datatype="INT64", shape=[len(values)])
        if raw:
            request.raw_input_contents.append(np.asarray(values, dtype="<i8").tobytes())
        else:
            tensor.contents.int64_contents.extend(values)
    return request


def decode_scores(response: pb.ModelInferResponse) -> np.ndarray:
    assert [o.name for o in response.outputs] == ["score"]
    assert response.outputs[0].datatype == "FP32"
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4")


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TinyModel]:
    repo = tmp_path_factory.mktemp("ranker-repo")
    return repo, publish_tiny_model(repo, make_tiny_model("rk"))


@pytest.fixture(scope="module")
def ranker(tiny_repo: tuple[Path, TinyModel]) -> Iterator[Ranker]:
    server = Ranker(
        tiny_repo[0],
        "rk-ranker",
        batching="delay",
        max_queue_delay_us=20_000,
        max_candidates_per_request=500,
    )
    yield server
    server.close()


# -- scores --------------------------------------------------------------------------------------


def test_rank_scores_equal_onnx_runtime(ranker: Ranker, tiny_repo: tuple[Path, TinyModel]) -> None:
    repo, tiny = tiny_repo
    items = ["i3", "i17", "i3", "i99", "i0"]
    reply = ranker.rank.Rank(rank_request("rk-ranker", "u5", items), timeout=10)
    assert reply.model_name == "rk-ranker" and reply.model_version == str(tiny.version)
    expected = ort_scores(repo, "rk-ranker", tiny.version, [5] * 5, [3, 17, 3, 99, 0])
    assert_close(reply.scores, expected)
    # Pinned to the version explicitly: the same answer.
    pinned = ranker.rank.Rank(rank_request("rk-ranker", "u5", items, str(tiny.version)), timeout=10)
    assert list(pinned.scores) == list(reply.scores)
    # Packed: the same scores as little-endian float32 bytes, and no repeated field.
    request = rank_request("rk-ranker", "u5", items)
    request.packed_scores = True
    packed = ranker.rank.Rank(request, timeout=10)
    assert len(packed.scores) == 0 and len(packed.scores_f32) == 4 * len(items)
    assert np.frombuffer(packed.scores_f32, "<f4").tolist() == list(reply.scores)


@pytest.mark.parametrize("raw", [True, False])
def test_model_infer_scores_equal_onnx_runtime(
    ranker: Ranker, tiny_repo: tuple[Path, TinyModel], raw: bool
) -> None:
    repo, tiny = tiny_repo
    users, items = [0, 7, 45, 3], [119, 5, 0, 5]
    reply = ranker.oip.ModelInfer(infer_request("rk-ranker", users, items, raw=raw), timeout=10)
    assert reply.model_name == "rk-ranker" and reply.model_version == str(tiny.version)
    assert reply.id == "req-1"
    assert list(reply.outputs[0].shape) == [4]
    assert_close(decode_scores(reply), ort_scores(repo, "rk-ranker", tiny.version, users, items))


def test_server_ready_is_false_while_draining(ranker: Ranker) -> None:
    assert ranker.oip.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
    # What shutdown does first (then SHUTDOWN_DELAY_S while calls are still accepted).
    ranker.bg.run(ranker.bg.server.set_serving(False))
    try:
        assert not ranker.oip.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        assert ranker.oip.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    finally:
        ranker.bg.run(ranker.bg.server.set_serving(True))


def test_metadata_and_readiness(ranker: Ranker, tiny_repo: tuple[Path, TinyModel]) -> None:
    _, tiny = tiny_repo
    meta = ranker.oip.ModelMetadata(pb.ModelMetadataRequest(name="rk-ranker"), timeout=5)
    assert meta.platform == "onnxruntime_onnx"
    assert list(meta.versions) == [str(tiny.version)]
    assert {(t.name, t.datatype, tuple(t.shape)) for t in meta.inputs} == {
        ("user_index", "INT64", (-1,)),
        ("item_index", "INT64", (-1,)),
    }
    assert [(t.name, t.datatype) for t in meta.outputs] == [("score", "FP32")]
    assert meta.parameters["execution_provider"].string_param == "CPUExecutionProvider"
    assert ranker.oip.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    assert ranker.oip.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
    assert ranker.oip.ModelReady(pb.ModelReadyRequest(name="rk-ranker"), timeout=5).ready
    assert ranker.oip.ModelReady(
        pb.ModelReadyRequest(name="rk-ranker", version=str(tiny.version)), timeout=5
    ).ready
    assert not ranker.oip.ModelReady(
        pb.ModelReadyRequest(name="rk-ranker", version="99"), timeout=5
    ).ready
    assert not ranker.oip.ModelReady(pb.ModelReadyRequest(name="nope"), timeout=5).ready
    assert ranker.oip.ServerMetadata(pb.ServerMetadataRequest(), timeout=5).name == "recsys-ranker"
    # The metrics port shows the model with its provider.
    body = (
        urllib.request.urlopen(
            f"http://127.0.0.1:{ranker.bg.server.metrics_port}/metrics", timeout=5
        )
        .read()
        .decode()
    )
    assert (
        f'recsys_ranker_model_loaded{{model="rk-ranker",provider="cpu",version="{tiny.version}"}} 1.0'
        in body
    )
    assert "recsys_grpc_requests_total{" in body and "_bucket{" in body
    assert "_created" not in body


# -- batching ------------------------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_each_caller_gets_its_own_scores(
    ranker: Ranker, tiny_repo: tuple[Path, TinyModel]
) -> None:
    repo, tiny = tiny_repo
    direct = ort.InferenceSession(str(repo / "rk-ranker" / str(tiny.version) / "model.onnx"))
    runs_before = sample("recsys_ranker_batch_requests_count", model="rk-ranker")
    requests_before = sample("recsys_ranker_batch_requests_sum", model="rk-ranker")
    errors: list[BaseException] = []
    barrier = threading.Barrier(12)

    def caller(k: int) -> None:
        rng = np.random.default_rng(k)
        user = tiny.user_ids[k]
        try:
            barrier.wait(10)
            for _ in range(6):
                rows = rng.integers(0, len(tiny.item_ids), 20 + k)
                items = [tiny.item_ids[j] for j in rows]
                reply = ranker.rank.Rank(rank_request("rk-ranker", user, items), timeout=20)
                feeds = {"user_index": np.full(len(rows), k, np.int64), "item_index": rows}
                assert_close(reply.scores, direct.run(["score"], feeds)[0])
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    runs = sample("recsys_ranker_batch_requests_count", model="rk-ranker") - runs_before
    requests = sample("recsys_ranker_batch_requests_sum", model="rk-ranker") - requests_before
    assert requests == 72
    # 72 requests from 12 concurrent callers took clearly fewer session runs than requests.
    assert runs < requests * 0.75, (runs, requests)


def test_request_duration_histograms_are_cumulative(ranker: Ranker) -> None:
    ranker.rank.Rank(rank_request("rk-ranker", "u1", ["i1"]), timeout=10)
    count = sample("recsys_ranker_request_duration_seconds_count", model="rk-ranker")
    assert (
        sample("recsys_ranker_request_duration_seconds_bucket", model="rk-ranker", le="+Inf")
        == count
    )
    assert sample("recsys_ranker_queue_duration_seconds_count", model="rk-ranker") > 0
    assert (
        sample("recsys_ranker_compute_duration_seconds_count", model="rk-ranker", version="1") > 0
    )
    assert (
        sample(
            "recsys_ranker_requests_total", model="rk-ranker", version="1", api="rank", status="OK"
        )
        > 0
    )


def test_a_request_alone_in_the_server_scores_on_the_solo_session(tmp_path: Path) -> None:
    """RANKING_SOLO_INTRA_OP_THREADS: one caller at a time runs every request on the wider
    session, with the same scores; a failed request leaves the server counted as idle."""
    tiny = publish_tiny_model(tmp_path, make_tiny_model("solo"))
    server = Ranker(tmp_path, "solo-ranker", solo_intra_op_threads=2)
    try:
        before = sample("recsys_ranker_solo_runs_total", model="solo-ranker")
        items = ["i3", "i17", "i0"]
        reply = server.rank.Rank(rank_request("solo-ranker", "u5", items), timeout=10)
        expected = ort_scores(tmp_path, "solo-ranker", tiny.version, [5] * 3, [3, 17, 0])
        assert_close(reply.scores, expected)
        code, _ = _code(server.rank.Rank, rank_request("solo-ranker", "nobody", items))
        assert code == grpc.StatusCode.NOT_FOUND
        infer = server.oip.ModelInfer(infer_request("solo-ranker", [5] * 3, [3, 17, 0]), timeout=10)
        assert_close(decode_scores(infer), expected)
        assert sample("recsys_ranker_solo_runs_total", model="solo-ranker") - before == 2
    finally:
        server.close()


# -- bad input -----------------------------------------------------------------------------------


def _code(call: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)
    return info.value.code(), info.value.details()


@pytest.mark.parametrize(
    ("request_args", "code", "needle"),
    [
        (("rk-ranker", "u1", []), grpc.StatusCode.INVALID_ARGUMENT, "no candidates"),
        (("rk-ranker", "u1", ["i1"] * 501), grpc.StatusCode.INVALID_ARGUMENT, "limit of 500"),
        (("rk-ranker", "", ["i1"]), grpc.StatusCode.INVALID_ARGUMENT, "user_id is required"),
        (("", "u1", ["i1"]), grpc.StatusCode.INVALID_ARGUMENT, "model_name is required"),
        (("rk-ranker", "u1", ["i1", ""]), grpc.StatusCode.INVALID_ARGUMENT, "empty ids"),
        (("no-such-ranker", "u1", ["i1"]), grpc.StatusCode.NOT_FOUND, "'no-such-ranker'"),
        (("rk-ranker", "nobody", ["i1"]), grpc.StatusCode.NOT_FOUND, "unknown user id: 'nobody'"),
        (
            ("rk-ranker", "u1", ["i1", "x1", "x2", "i2"]),
            grpc.StatusCode.NOT_FOUND,
            "unknown item ids: 'x1', 'x2'",
        ),
    ],
)
def test_rank_bad_input(
    ranker: Ranker, request_args: tuple[str, str, list[str]], code: grpc.StatusCode, needle: str
) -> None:
    got, details = _code(ranker.rank.Rank, rank_request(*request_args))
    assert got == code and needle in details, (got, details)


@pytest.mark.parametrize(
    ("version", "code", "needle"),
    [
        ("99", grpc.StatusCode.NOT_FOUND, "version 99"),
        ("latest", grpc.StatusCode.INVALID_ARGUMENT, "not a positive integer"),
        ("-1", grpc.StatusCode.INVALID_ARGUMENT, "not a positive integer"),
        # Unicode digits: str.isdigit() accepts them, int() does not.
        ("\u00b2", grpc.StatusCode.INVALID_ARGUMENT, "'\\xb2' is not a positive integer"),
        ("\uff13", grpc.StatusCode.INVALID_ARGUMENT, "not a positive integer"),
        ("\u0663", grpc.StatusCode.INVALID_ARGUMENT, "not a positive integer"),
        ("9" * 30, grpc.StatusCode.INVALID_ARGUMENT, "not a positive integer"),
        ("01", grpc.StatusCode.INVALID_ARGUMENT, "not a positive integer"),
    ],
)
def test_unknown_or_malformed_version(
    ranker: Ranker, version: str, code: grpc.StatusCode, needle: str
) -> None:
    got, details = _code(ranker.rank.Rank, rank_request("rk-ranker", "u1", ["i1"], version))
    assert got == code and needle in details, details
    got, details = _code(
        ranker.oip.ModelInfer, infer_request("rk-ranker", [1], [1], version=version)
    )
    assert got == code and needle in details, details
    got, details = _code(
        ranker.oip.ModelMetadata, pb.ModelMetadataRequest(name="rk-ranker", version=version)
    )
    assert got == code and needle in details, details
    # Readiness is an answer, not an error: a version that cannot exist is not ready.
    ready = ranker.oip.ModelReady(
        pb.ModelReadyRequest(name="rk-ranker", version=version), timeout=5
    )
    assert ready.ready is False


@pytest.mark.parametrize("shape", [[2**32, 2**32], [2**62, 4], [2**63 - 1, 2], [4, 2**62]])
def test_model_infer_shape_whose_product_overflows_int64(ranker: Ranker, shape: list[int]) -> None:
    request = infer_request("rk-ranker", [1], [1])
    request.inputs[1].shape[:] = shape
    code, details = _code(ranker.oip.ModelInfer, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert f"{math.prod(shape)} elements is more than this server's limit of 500" in details


LONG = "x" * 20_000 + "\n\x00"


def _short_escaped(details: str) -> None:
    assert len(details) < 400, len(details)
    assert "20002 characters" in details and "\n" not in details and "\x00" not in details


@pytest.mark.parametrize(
    "request_args",
    [
        (LONG, "u1", ["i1"]),
        ("rk-ranker", LONG, ["i1"]),
        ("rk-ranker", "u1", ["i1", LONG]),
    ],
)
def test_rank_long_names_and_ids(ranker: Ranker, request_args: tuple[str, str, list[str]]) -> None:
    code, details = _code(ranker.rank.Rank, rank_request(*request_args))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details[:200])
    assert "limit of 1024 characters" in details
    _short_escaped(details)


def test_long_model_name_on_the_inference_protocol(ranker: Ranker) -> None:
    for call, request in (
        (ranker.oip.ModelInfer, infer_request(LONG, [1], [1])),
        (ranker.oip.ModelMetadata, pb.ModelMetadataRequest(name=LONG)),
        (ranker.oip.ModelReady, pb.ModelReadyRequest(name=LONG)),
    ):
        code, details = _code(call, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details[:200])
        _short_escaped(details)
    # An unknown item id within the limit is quoted escaped, never raw.
    code, details = _code(ranker.rank.Rank, rank_request("rk-ranker", "u1", ["i1", "a\nb"]))
    assert code == grpc.StatusCode.NOT_FOUND and "'a\\nb'" in details, details


def _mutate(change: str) -> pb.ModelInferRequest:
    request = infer_request("rk-ranker", [1, 2], [3, 4])
    if change == "wrong name":
        request.inputs[1].name = "item"
    elif change == "missing input":
        del request.inputs[1]
        del request.raw_input_contents[1]
    elif change == "duplicate input":
        request.inputs[1].name = "user_index"
    elif change == "wrong dtype":
        request.inputs[1].datatype = "INT32"
        request.raw_input_contents[1] = np.asarray([3, 4], dtype="<i4").tobytes()
    elif change == "bad dtype":
        request.inputs[1].datatype = "BYTES"
    elif change == "2-D":
        request.inputs[1].shape[:] = [1, 2]
    elif change == "unequal lengths":
        request.inputs[1].shape[:] = [3]
        request.raw_input_contents[1] = np.asarray([3, 4, 5], dtype="<i8").tobytes()
    elif change == "short raw":
        request.raw_input_contents[1] = request.raw_input_contents[1][:-3]
    elif change == "raw count":
        del request.raw_input_contents[1]
    elif change == "contents and raw":
        request.inputs[1].contents.int64_contents.extend([3, 4])
    elif change == "contents count":
        request = infer_request("rk-ranker", [1, 2], [3, 4], raw=False)
        request.inputs[1].contents.int64_contents.append(5)
    elif change == "out of range":
        request = infer_request("rk-ranker", [1, 2], [3, 120])
    elif change == "negative index":
        request = infer_request("rk-ranker", [-1, 2], [3, 4])
    elif change == "nan":
        request.inputs[1].datatype = "FP32"
        request.raw_input_contents[1] = np.asarray([3.0, np.nan], dtype="<f4").tobytes()
    elif change == "unknown output":
        request.outputs.add(name="logits")
    elif change == "empty":
        request = infer_request("rk-ranker", [], [])
    elif change == "oversized":
        request = infer_request("rk-ranker", [1] * 501, [1] * 501)
    return request


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ("wrong name", "unknown input 'item'"),
        ("missing input", "missing input 'item_index'"),
        ("duplicate input", "twice"),
        ("wrong dtype", "INT32 does not match the model's INT64"),
        ("bad dtype", "datatype 'BYTES' is not supported"),
        ("2-D", "one-dimensional"),
        ("unequal lengths", "same length"),
        ("short raw", "holds 13 bytes"),
        ("raw count", "raw_input_contents has 1 entries for 2 inputs"),
        ("contents and raw", "use one or the other"),
        ("contents count", "holds 3 values"),
        ("out of range", "out of range [0, 120)"),
        ("negative index", "'user_index': 1 values out of range"),
        ("nan", "NaN at element 1"),
        ("unknown output", "unknown output 'logits'"),
        ("empty", "no candidates"),
        ("oversized", "limit of 500"),
    ],
)
def test_model_infer_bad_input(ranker: Ranker, change: str, needle: str) -> None:
    code, details = _code(ranker.oip.ModelInfer, _mutate(change))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details, details
    # The server keeps serving others.
    assert ranker.rank.Rank(rank_request("rk-ranker", "u1", ["i1"]), timeout=10).scores


def test_model_infer_and_metadata_unknown_model(ranker: Ranker) -> None:
    code, details = _code(ranker.oip.ModelInfer, infer_request("nope", [1], [1]))
    assert code == grpc.StatusCode.NOT_FOUND and "'nope'" in details
    code, details = _code(ranker.oip.ModelMetadata, pb.ModelMetadataRequest(name="nope"))
    assert code == grpc.StatusCode.NOT_FOUND and "'nope'" in details
    code, details = _code(
        ranker.oip.ModelMetadata, pb.ModelMetadataRequest(name="rk-ranker", version="7")
    )
    assert code == grpc.StatusCode.NOT_FOUND and "version 7" in details
    # Unknown names never become metric labels.
    assert (
        sample("recsys_ranker_requests_total", model="", version="", api="oip", status="NOT_FOUND")
        > 0
    )


# -- unknown items scored as missing -------------------------------------------------------------


def test_allow_unknown_items_scores_the_known_and_flags_the_rest(
    ranker: Ranker, tiny_repo: tuple[Path, TinyModel]
) -> None:
    repo, tiny = tiny_repo
    items = ["i3", "stale-1", "i17", "stale-2", "i3"]
    request = rank_request("rk-ranker", "u5", items)
    # Without the option one unknown id fails the whole call.
    code, details = _code(ranker.rank.Rank, request)
    assert code == grpc.StatusCode.NOT_FOUND and "'stale-1', 'stale-2'" in details, details
    request.allow_unknown_items = True
    reply = ranker.rank.Rank(request, timeout=10)
    assert list(reply.missing) == [False, True, False, True, False]
    scores = np.asarray(reply.scores)
    assert np.isneginf(scores[[1, 3]]).all()
    expected = ort_scores(repo, "rk-ranker", tiny.version, [5] * 3, [3, 17, 3])
    assert_close(scores[[0, 2, 4]], expected)
    request.packed_scores = True  # the same answer packed, -infinity included
    packed = ranker.rank.Rank(request, timeout=10)
    assert list(packed.missing) == list(reply.missing)
    np.testing.assert_array_equal(np.frombuffer(packed.scores_f32, "<f4"), scores)
    request.packed_scores = False
    # Every id unknown: still an answer, all missing, from the version that was asked.
    request.item_ids[:] = ["gone"]
    reply = ranker.rank.Rank(request, timeout=10)
    assert list(reply.missing) == [True] and reply.model_version == str(tiny.version)
    # All known: flags all false; without the option the reply carries no flags.
    request.item_ids[:] = ["i1", "i2"]
    assert list(ranker.rank.Rank(request, timeout=10).missing) == [False, False]
    assert list(ranker.rank.Rank(rank_request("rk-ranker", "u5", ["i1"]), timeout=10).missing) == []


def test_allow_unknown_items_keeps_unknown_users_and_empty_ids_errors(ranker: Ranker) -> None:
    request = rank_request("rk-ranker", "nobody", ["i1", "stale"])
    request.allow_unknown_items = True
    code, details = _code(ranker.rank.Rank, request)
    assert code == grpc.StatusCode.NOT_FOUND and "unknown user id: 'nobody'" in details
    request = rank_request("rk-ranker", "u1", ["i1", ""])
    request.allow_unknown_items = True
    code, details = _code(ranker.rank.Rank, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "empty ids" in details


# -- Triton: [N, 1] inputs, model configuration, statistics, repository index ---------------------


def test_model_infer_accepts_n_by_1_inputs(
    ranker: Ranker, tiny_repo: tuple[Path, TinyModel]
) -> None:
    repo, tiny = tiny_repo
    users, items = [0, 7, 45], [119, 5, 0]
    request = infer_request("rk-ranker", users, items)
    for tensor in request.inputs:
        tensor.shape[:] = [3, 1]
    reply = ranker.oip.ModelInfer(request, timeout=10)
    assert list(reply.outputs[0].shape) == [3, 1]
    assert_close(decode_scores(reply), ort_scores(repo, "rk-ranker", tiny.version, users, items))
    # [1, N] and [N, 2] are still not the contract.
    for shape in ([1, 3], [3, 2]):
        request.inputs[1].shape[:] = shape
        code, details = _code(ranker.oip.ModelInfer, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details


def test_model_config_statistics_and_index(
    ranker: Ranker, tiny_repo: tuple[Path, TinyModel]
) -> None:
    repo, tiny = tiny_repo
    config = ranker.oip.ModelConfig(pb.ModelConfigRequest(name="rk-ranker"), timeout=5).config
    # The published config.pbtxt: the ONNX Runtime backend, one element per batch row.
    assert config.name == "rk-ranker" and config.backend == "onnxruntime"
    assert config.max_batch_size == 65536
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("user_index", pb.TYPE_INT64, [1]),
        ("item_index", pb.TYPE_INT64, [1]),
    ]
    assert [(o.name, o.data_type) for o in config.output] == [("score", pb.TYPE_FP32)]
    code, _ = _code(ranker.oip.ModelConfig, pb.ModelConfigRequest(name="nope"))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = _code(ranker.oip.ModelConfig, pb.ModelConfigRequest(name="rk-ranker", version="²"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    def stats() -> pb.ModelStatistics:
        reply = ranker.oip.ModelStatistics(pb.ModelStatisticsRequest(name="rk-ranker"), timeout=5)
        (one,) = reply.model_stats
        return one

    before = stats()
    ranker.rank.Rank(rank_request("rk-ranker", "u1", ["i1", "i2", "i3"]), timeout=10)
    _code(ranker.rank.Rank, rank_request("rk-ranker", "u1", ["i1", "unknown"]))
    after = stats()
    assert after.version == str(tiny.version)
    assert after.inference_count - before.inference_count == 3
    assert after.execution_count - before.execution_count == 1
    assert after.inference_stats.success.count - before.inference_stats.success.count == 1
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1
    assert after.inference_stats.queue.count - before.inference_stats.queue.count == 1
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert sum(b.compute_infer.count for b in after.batch_stats) == after.execution_count
    for request, wanted in (
        (pb.ModelStatisticsRequest(name="nope"), grpc.StatusCode.NOT_FOUND),
        (pb.ModelStatisticsRequest(name="rk-ranker", version="99"), grpc.StatusCode.NOT_FOUND),
    ):
        code, _ = _code(ranker.oip.ModelStatistics, request)
        assert code == wanted
    index = ranker.oip.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5)
    assert [(m.name, m.version, m.state) for m in index.models] == [
        ("rk-ranker", str(tiny.version), "READY")
    ]


def test_model_config_falls_back_to_metadata(tmp_path: Path) -> None:
    tiny = make_tiny_model("cf")
    graph = onnx.load(str(publish_tiny_ranker(tmp_path, tiny)))
    version = publish_graph(tmp_path, "cf-ranker", graph, tiny, config="input [ { broken")
    server = Ranker(tmp_path, "cf-ranker")
    try:
        reply = server.oip.ModelConfig(pb.ModelConfigRequest(name="cf-ranker"), timeout=5)
        assert reply.config.name == "cf-ranker" and reply.config.max_batch_size == 0
        assert {i.name for i in reply.config.input} == {"user_index", "item_index"}
        # The version before it (published by the tiny model) is served no longer, but indexed.
        index = server.oip.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5)
        states = {(m.version, m.state) for m in index.models}
        assert states == {(str(version - 1), "UNAVAILABLE"), (str(version), "READY")}
        ready = server.oip.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=5)
        assert [m.version for m in ready.models] == [str(version)]
        # An odd entry in the model directory never makes the index fail.
        (tmp_path / "cf-ranker" / "\u00b2").mkdir()
        index = server.oip.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5)
        assert (str(version), "READY") in {(m.version, m.state) for m in index.models}
    finally:
        server.close()


def publish_tiny_ranker(repo: Path, tiny: TinyModel) -> Path:
    """Publish the tiny model (ranker and retrieval) and return its ranker graph's path."""
    published = publish_tiny_model(repo, tiny)
    return repo / f"{tiny.domain}-ranker" / str(published.version) / "model.onnx"
