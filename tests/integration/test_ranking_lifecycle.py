"""The ranking service under load and change: expired and cancelled requests are never computed,
a full queue answers RESOURCE_EXHAUSTED, new versions swap in under load without a failed call,
retired versions finish their requests, and versions that fail to load leave the old one serving."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from devtools.tiny_models import (
    TinyModel,
    make_tiny_model,
    publish_corrupt_version,
    publish_tiny_model,
    ranker_graph,
)
from tests.integration.test_ranking_server import (
    Ranker,
    assert_close,
    ort_scores,
    publish_graph,
    rank_request,
    sample,
    slow_ranker_graph,
)

pytestmark = pytest.mark.integration

BIG = 4000  # candidates in one slow request: a session run of roughly 0.1-0.5 s on one thread
BLOCKERS = 5  # slow requests queued ahead of the one under test


@pytest.fixture()
def slow(tmp_path: Path) -> Iterator[tuple[Ranker, TinyModel]]:
    tiny = make_tiny_model("slow")
    tiny.version = publish_graph(
        tmp_path, "slow-ranker", slow_ranker_graph(tiny.user_emb, tiny.item_emb), tiny
    )
    server = Ranker(
        tmp_path,
        "slow-ranker",
        max_batch_candidates=BIG,
        max_queue_requests=8,
        max_candidates_per_request=BIG,
    )
    yield server, tiny
    server.close()


def _big_request(tiny: TinyModel, user: str = "u1"):  # type: ignore[no-untyped-def]
    return rank_request(
        "slow-ranker", user, [tiny.item_ids[j % len(tiny.item_ids)] for j in range(BIG)]
    )


def _computed_candidates() -> float:
    return sample("recsys_ranker_batch_candidates_sum", model="slow-ranker")


def test_expired_requests_are_dropped_before_compute(slow: tuple[Ranker, TinyModel]) -> None:
    server, tiny = slow
    before, expired_before = (
        _computed_candidates(),
        sample("recsys_ranker_dropped_total", model="slow-ranker", reason="expired"),
    )
    blockers = [server.rank.Rank.future(_big_request(tiny), timeout=60) for _ in range(BLOCKERS)]
    time.sleep(0.02)
    short = server.rank.Rank.future(rank_request("slow-ranker", "u2", ["i1"] * 10), timeout=0.1)
    with pytest.raises(grpc.RpcError) as info:
        short.result()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for call in blockers:
        assert len(call.result().scores) == BIG
    # Only the blockers were computed; the expired request never reached the session.
    assert _computed_candidates() - before == BLOCKERS * BIG
    expired = sample("recsys_ranker_dropped_total", model="slow-ranker", reason="expired")
    assert expired - expired_before == 1


def test_cancelled_requests_are_dropped_before_compute(slow: tuple[Ranker, TinyModel]) -> None:
    server, tiny = slow
    before = _computed_candidates()
    cancelled_before = sample(
        "recsys_ranker_dropped_total", model="slow-ranker", reason="cancelled"
    )
    blockers = [server.rank.Rank.future(_big_request(tiny), timeout=60) for _ in range(BLOCKERS)]
    time.sleep(0.02)
    doomed = server.rank.Rank.future(rank_request("slow-ranker", "u2", ["i1"] * 10), timeout=60)
    time.sleep(0.05)
    assert doomed.cancel()
    for call in blockers:
        assert len(call.result().scores) == BIG
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        dropped = sample("recsys_ranker_dropped_total", model="slow-ranker", reason="cancelled")
        if dropped - cancelled_before == 1:
            break
        time.sleep(0.05)
    assert dropped - cancelled_before == 1
    assert _computed_candidates() - before == BLOCKERS * BIG


def test_full_queue_answers_resource_exhausted(slow: tuple[Ranker, TinyModel]) -> None:
    server, tiny = slow
    full_before = sample("recsys_ranker_dropped_total", model="slow-ranker", reason="queue_full")
    calls = [server.rank.Rank.future(_big_request(tiny), timeout=60) for _ in range(16)]
    codes = []
    for call in calls:
        try:
            assert len(call.result().scores) == BIG
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
            assert "queue" in exc.details() and "full" in exc.details()
    refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert refused >= 1 and codes.count(grpc.StatusCode.OK) == 16 - refused, codes
    full = sample("recsys_ranker_dropped_total", model="slow-ranker", reason="queue_full")
    assert full - full_before == refused
    # The queue drained: the service answers again.
    assert len(server.rank.Rank(_big_request(tiny), timeout=60).scores) == BIG


def test_retired_version_finishes_its_requests(
    slow: tuple[Ranker, TinyModel], tmp_path: Path
) -> None:
    server, tiny = slow
    old = str(tiny.version)
    in_flight = [server.rank.Rank.future(_big_request(tiny), timeout=60) for _ in range(3)]
    time.sleep(0.05)
    new = publish_graph(tmp_path, "slow-ranker", ranker_graph(tiny.user_emb, tiny.item_emb), tiny)
    server.reload()
    assert server.manager.versions("slow-ranker") == [new]
    assert (
        sample("recsys_ranker_model_loaded", model="slow-ranker", version=old, provider="cpu") == 0
    )
    for call in in_flight:
        reply = call.result()
        assert reply.model_version == old and len(reply.scores) == BIG
    # Unloaded after its last request: its per-version series leave /metrics.
    labels = {"model": "slow-ranker", "version": old, "provider": "cpu"}
    deadline = time.monotonic() + 10
    while REGISTRY.get_sample_value("recsys_ranker_model_loaded", labels) is not None:
        assert time.monotonic() < deadline, "the retired version's series stayed"
        time.sleep(0.02)
    assert (
        sample("recsys_ranker_model_loaded", model="slow-ranker", version=str(new), provider="cpu")
        == 1
    )
    reply = server.rank.Rank(rank_request("slow-ranker", "u3", ["i1", "i2"]), timeout=10)
    assert reply.model_version == str(new)
    # A request pinned to the retired version is refused with the versions that are served.
    with pytest.raises(grpc.RpcError) as info:
        server.rank.Rank(rank_request("slow-ranker", "u3", ["i1"], old), timeout=10)
    assert (
        info.value.code() == grpc.StatusCode.NOT_FOUND
        and f"served: [{new}]" in info.value.details()
    )


def test_new_versions_swap_in_under_load_without_failed_calls(tmp_path: Path) -> None:
    models = {1: publish_tiny_model(tmp_path, make_tiny_model("swap", seed=1))}
    server = Ranker(tmp_path, "swap-ranker", batching="delay", max_queue_delay_us=500)
    stop = threading.Event()
    errors: list[BaseException] = []
    answers: list[tuple[str, list[str], str, list[float]]] = []

    def load(k: int) -> None:
        rng = np.random.default_rng(k)
        while not stop.is_set():
            user = f"u{int(rng.integers(0, 40))}"
            items = [f"i{int(j)}" for j in rng.integers(0, 120, 50)]
            try:
                reply = server.rank.Rank(rank_request("swap-ranker", user, items), timeout=20)
                answers.append((user, items, reply.model_version, list(reply.scores)))
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=load, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.3)
        for seed in (2, 3):
            tiny = publish_tiny_model(tmp_path, make_tiny_model("swap", seed=seed))
            models[tiny.version] = tiny
            server.reload()
            time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(30)
        assert not errors, errors[:3]
        seen = {version for _, _, version, _ in answers}
        assert seen == {"1", "2", "3"}, seen
        assert answers[-1][2] == "3"
        # Every answer holds the scores of the version it names.
        for user, items, version, scores in answers[:: max(1, len(answers) // 60)]:
            tiny = models[int(version)]
            expected = ort_scores(
                tmp_path,
                "swap-ranker",
                tiny.version,
                [tiny.user_ids.index(user)] * len(items),
                [tiny.item_ids.index(i) for i in items],
            )
            assert_close(scores, expected)
        assert server.manager.versions("swap-ranker") == [3]
    finally:
        stop.set()
        server.close()


def test_versions_that_fail_to_load_leave_the_old_one_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tiny = publish_tiny_model(tmp_path, make_tiny_model("bad"))
    server = Ranker(tmp_path, "bad-ranker")
    try:
        failures = sample("recsys_ranker_model_load_failures_total", model="bad-ranker")
        corrupt = publish_corrupt_version(tmp_path, "bad-ranker")
        wrong_signature = publish_graph(
            tmp_path,
            "bad-ranker",
            ranker_graph(tiny.user_emb, tiny.item_emb),
            tiny,
            inputs=[
                {"name": "user", "datatype": "INT64", "shape": [-1]},
                {"name": "item_index", "datatype": "INT64", "shape": [-1]},
            ],
        )
        with caplog.at_level(logging.ERROR, logger="serving.ranking.manager"):
            server.reload()
        assert sample("recsys_ranker_model_load_failures_total", model="bad-ranker") - failures == 2
        messages = "\n".join(r.getMessage() for r in caplog.records)
        assert f"bad-ranker version {corrupt}" in messages and "cannot load" in messages
        assert f"bad-ranker version {wrong_signature}" in messages and "inputs" in messages
        reply = server.rank.Rank(rank_request("bad-ranker", "u1", ["i1"]), timeout=10)
        assert reply.model_version == str(tiny.version)
        assert server.manager.versions("bad-ranker") == [tiny.version]
        # Polling again does not retry (or recount) versions known to be broken.
        server.reload()
        assert sample("recsys_ranker_model_load_failures_total", model="bad-ranker") - failures == 2
    finally:
        server.close()


def test_polling_notices_new_versions(tmp_path: Path) -> None:
    publish_tiny_model(tmp_path, make_tiny_model("poll", seed=1))
    server = Ranker(tmp_path, "poll-ranker", poll_interval_s=0.2)
    try:
        newer = publish_tiny_model(tmp_path, make_tiny_model("poll", seed=2))
        deadline = time.monotonic() + 20
        while server.manager.versions("poll-ranker") != [newer.version]:
            assert time.monotonic() < deadline, server.manager.versions("poll-ranker")
            time.sleep(0.05)
        reply = server.rank.Rank(rank_request("poll-ranker", "u1", ["i1"]), timeout=10)
        assert reply.model_version == str(newer.version)
    finally:
        server.close()


@pytest.mark.parametrize(("policy", "served"), [("all", [1, 2, 3]), ("specific:1,3,9", [1, 3])])
def test_version_policies_serve_several_versions(
    tmp_path: Path, policy: str, served: list[int]
) -> None:
    models = [publish_tiny_model(tmp_path, make_tiny_model("pol", seed=s)) for s in (1, 2, 3)]
    server = Ranker(tmp_path, "pol-ranker", version_policy=policy)
    try:
        assert server.manager.versions("pol-ranker") == served
        for version in served:
            tiny = models[version - 1]
            reply = server.rank.Rank(
                rank_request("pol-ranker", "u4", ["i9", "i2"], str(version)), timeout=10
            )
            assert reply.model_version == str(version)
            assert_close(reply.scores, ort_scores(tmp_path, "pol-ranker", version, [4, 4], [9, 2]))
            assert tiny.version == version
        latest = server.rank.Rank(rank_request("pol-ranker", "u4", ["i9"]), timeout=10)
        assert latest.model_version == str(max(served))
    finally:
        server.close()
