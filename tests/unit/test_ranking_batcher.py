"""Dynamic batching on a real session, without gRPC: batches form from concurrent requests
within the candidate budget, each caller gets its own scores, the queue is bounded, and expired
requests are never computed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from devtools.tiny_models import make_tiny_model, publish_tiny_model
from recsys.repository import version_dir
from recsys.rpc.errors import DeadlineExceeded, ResourceExhausted
from serving.ranking.batcher import Batcher, BatchingOptions
from serving.ranking.model import CPU, RankerModel, SessionOptions


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> RankerModel:
    repo: Path = tmp_path_factory.mktemp("repo")
    tiny = publish_tiny_model(repo, make_tiny_model("batch"))
    return RankerModel.load(
        "batch-ranker",
        tiny.version,
        version_dir(repo, "batch-ranker", tiny.version),
        SessionOptions(providers=(CPU,), intra_op_threads=1, warmup_candidates=64),
    )


def _runs() -> tuple[float, float]:
    labels = {"model": "batch-ranker"}
    return (
        REGISTRY.get_sample_value("recsys_ranker_batch_requests_count", labels) or 0.0,
        REGISTRY.get_sample_value("recsys_ranker_batch_candidates_sum", labels) or 0.0,
    )


def _requests(model: RankerModel, n: int, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(n)
    return [
        (
            np.full(size, k % model.n_users, np.int64),
            rng.integers(0, model.n_items, size).astype(np.int64),
        )
        for k in range(n)
    ]


async def _score_all(
    model: RankerModel, options: BatchingOptions, requests: list[tuple[np.ndarray, np.ndarray]]
) -> list[np.ndarray | BaseException]:
    batcher = Batcher(model, options)
    batcher.start()
    try:
        return await asyncio.gather(
            *(batcher.score(u, i, timeout=10) for u, i in requests), return_exceptions=True
        )
    finally:
        await batcher.close()


@pytest.mark.parametrize(
    ("options", "expected_runs"),
    [
        # The first request finds the session idle and runs at once; the rest queue meanwhile.
        (BatchingOptions(max_batch_candidates=1000), 2),
        # Delay mode holds the idle session's batch open: all five in one run.
        (BatchingOptions(max_batch_candidates=1000, max_queue_delay_s=0.05, mode="delay"), 1),
        # First alone, then 30 + 30 twice within the budget of 64.
        (BatchingOptions(max_batch_candidates=64), 3),
        (BatchingOptions(max_batch_candidates=1000, mode="off"), 5),
        # Two free slots: the first two run alone at once, then 30 + 30 and 30.
        (BatchingOptions(max_batch_candidates=64, concurrency=2), 4),
    ],
    ids=[
        "first alone, then one batch",
        "one batch, delay",
        "candidate budget",
        "batching off",
        "two runs at once",
    ],
)
def test_concurrent_requests_share_runs_and_get_their_own_scores(
    model: RankerModel, options: BatchingOptions, expected_runs: int
) -> None:
    requests = _requests(model, 5, 30)
    runs, candidates = _runs()
    results = asyncio.run(_score_all(model, options, requests))
    for (users, items), scores in zip(requests, results, strict=True):
        assert isinstance(scores, np.ndarray)
        np.testing.assert_array_equal(scores, model.score(users, items))
    after_runs, after_candidates = _runs()
    assert after_runs - runs == expected_runs
    assert after_candidates - candidates == 150


def test_full_queue_refuses(model: RankerModel) -> None:
    """The first of five runs at once on the idle session (it is never queued), the next two fill
    the queue of two, the last two are refused."""
    options = BatchingOptions(max_batch_candidates=1000, max_queue_requests=2)
    results = asyncio.run(_score_all(model, options, _requests(model, 5, 10)))
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    assert len(refused) == 2 and "queue" in str(refused[0])
    assert [isinstance(r, np.ndarray) for r in results] == [True, True, True, False, False]


def test_expired_requests_are_not_computed(model: RankerModel) -> None:
    async def scenario() -> tuple[BaseException | None, BaseException | None]:
        batcher = Batcher(model, BatchingOptions(max_queue_delay_s=0.2, mode="delay"))
        batcher.start()
        users, items = _requests(model, 1, 10)[0]
        outcomes: list[BaseException | None] = []
        for timeout in (0.0, 0.01):
            try:
                await batcher.score(users, items, timeout=timeout)
                outcomes.append(None)
            except DeadlineExceeded as exc:
                outcomes.append(exc)
        await batcher.close()
        return outcomes[0], outcomes[1]

    runs, _ = _runs()
    before_queue, while_queued = asyncio.run(scenario())
    assert isinstance(before_queue, DeadlineExceeded) and "before" in str(before_queue)
    assert isinstance(while_queued, DeadlineExceeded) and "queued" in str(while_queued)
    assert _runs()[0] == runs


def test_one_caller_at_a_time_stops_paying_the_queue_delay(model: RankerModel) -> None:
    """Waiting for companions that never come is skipped once waits stop gaining requests (with
    an occasional probe): 20 sequential requests do not each wait the 0.25 s delay."""

    async def sequential() -> float:
        batcher = Batcher(model, BatchingOptions(max_queue_delay_s=0.25, mode="delay"))
        batcher.start()
        users, items = _requests(model, 1, 10)[0]
        start = time.perf_counter()
        for _ in range(20):
            await batcher.score(users, items, timeout=10)
        elapsed = time.perf_counter() - start
        await batcher.close()
        return elapsed

    assert asyncio.run(sequential()) < 3.5  # 20 waits would take at least 5 s
