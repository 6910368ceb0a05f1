"""The batcher's scheduling, step by step with a fake session whose runs end only when the test
says so: the session is never left idle while requests are queued (an idle session takes the
first request at once, requests queued during a run go out together the moment it ends, within
the candidate budget, on every free slot), and only delay mode holds a batch open, only while
no run is in flight. Every wait is on an event, so a batcher that idled would hang (caught by
a generous guard), not pass slowly."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

import numpy as np
import pytest

from serving.ranking.batcher import Batcher, BatchingOptions

# A guard against hangs only; no assertion depends on how long anything takes.
GUARD_S = 20.0
# A queue delay no test could sit out within the guard: a batcher that waited it would fail.
FOREVER_S = 3600.0

T = TypeVar("T")


class FakeSession:
    """A scorer whose runs block on the worker thread until `finish()`; it records the
    candidates of every run and the batcher's queue depth when each run began."""

    name = "fake-ranker"
    version = 1

    def __init__(self) -> None:
        self.runs: list[list[int]] = []  # the item indices of each run
        self.started = threading.Semaphore(0)
        self._release = threading.Semaphore(0)
        self._lock = threading.Lock()

    def score(self, user_index: np.ndarray, item_index: np.ndarray) -> np.ndarray:
        with self._lock:
            self.runs.append(item_index.tolist())
        self.started.release()
        if not self._release.acquire(timeout=GUARD_S):
            raise RuntimeError("the test never finished this run")
        return item_index.astype(np.float32) * 10

    def finish(self, runs: int = 1) -> None:
        for _ in range(runs):
            self._release.release()

    async def wait_started(self, count: int) -> None:
        """Until `count` runs have started in all."""
        loop = asyncio.get_running_loop()
        while len(self.runs) < count:
            ok = await loop.run_in_executor(None, self.started.acquire, True, GUARD_S)
            if not ok:
                raise AssertionError(f"run {count} never started; runs so far: {self.runs}")


async def _guard(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, GUARD_S)


def _waiting_forever(mode: str) -> BatchingOptions:
    """Room for 100 candidates and a queue delay no test could sit out."""
    return BatchingOptions(
        max_batch_candidates=100,
        max_queue_delay_s=FOREVER_S,
        mode=mode,  # type: ignore[arg-type]
    )


@asynccontextmanager
async def batcher_over(session: FakeSession, options: BatchingOptions) -> AsyncIterator[Batcher]:
    batcher = Batcher(session, options)
    batcher.start()
    try:
        yield batcher
    finally:
        session.finish(64)  # nothing left blocked
        await batcher.close()


def _request(batcher: Batcher, *items: int) -> asyncio.Task[np.ndarray]:
    array = np.array(items, np.int64)
    return asyncio.get_running_loop().create_task(
        batcher.score(np.zeros(len(array), np.int64), array, timeout=None)
    )


async def _queued(batcher: Batcher, depth: int) -> None:
    while batcher.depth < depth:
        await asyncio.sleep(0)


@pytest.mark.parametrize("mode", ["queued", "delay"])
def test_requests_queued_during_a_run_go_out_together_the_moment_it_ends(mode: str) -> None:
    session = FakeSession()

    async def scenario() -> None:
        async with batcher_over(session, _waiting_forever(mode)) as batcher:
            if mode == "delay":  # an idle session in delay mode waits; let waits gain nothing
                batcher._wait_gain = 0.0
            first = _request(batcher, 1)
            await session.wait_started(1)
            assert session.runs == [[1]]
            later = [_request(batcher, 2, 3), _request(batcher, 4), _request(batcher, 5)]
            await _queued(batcher, 3)
            assert len(session.runs) == 1  # one slot: the run in flight holds it
            session.finish()
            assert (await _guard(first)).tolist() == [10.0]
            await session.wait_started(2)  # no queue delay, though it is an hour
            assert session.runs[1] == [2, 3, 4, 5]
            assert batcher.depth == 0
            session.finish()
            results = await _guard(asyncio.gather(*later))
            assert [r.tolist() for r in results] == [[20.0, 30.0], [40.0], [50.0]]

    asyncio.run(scenario())


@pytest.mark.parametrize("mode", ["queued", "delay", "off"])
def test_the_next_batch_starts_while_the_event_loop_is_busy(mode: str) -> None:
    """The session thread whose run ends starts the next batch itself: with the event loop
    blocked (a slow handler elsewhere, a late scheduler), the queued requests still reach the
    session; only their answers wait for the loop."""
    session = FakeSession()

    async def scenario() -> None:
        async with batcher_over(session, _waiting_forever(mode)) as batcher:
            batcher._wait_gain = 0.0  # delay mode: recent waits gained nothing
            first = _request(batcher, 1)
            await session.wait_started(1)
            later = [_request(batcher, 2), _request(batcher, 3)]
            await _queued(batcher, 2)
            session.finish()
            # The loop is blocked from here until the next run has started (or the guard).
            assert session.started.acquire(timeout=GUARD_S), "the next run waited for the loop"
            assert session.runs[1] == ([2] if mode == "off" else [2, 3])
            assert not first.done()  # its answer is handed over by the loop, once free
            session.finish(2)
            assert (await _guard(first)).tolist() == [10.0]
            results = await _guard(asyncio.gather(*later))
            assert [r.tolist() for r in results] == [[20.0], [30.0]]

    asyncio.run(scenario())


def test_an_idle_session_takes_a_request_at_once_in_queued_mode() -> None:
    session = FakeSession()

    async def scenario() -> None:
        options = BatchingOptions(max_batch_candidates=1000, max_queue_delay_s=FOREVER_S)
        async with batcher_over(session, options) as batcher:
            for k in range(1, 4):  # one caller at a time: every request runs alone, unwaited
                task = _request(batcher, k)
                await session.wait_started(k)
                session.finish()
                assert (await _guard(task)).tolist() == [10.0 * k]
            assert session.runs == [[1], [2], [3]]

    asyncio.run(scenario())


def test_the_budget_splits_the_queue_into_back_to_back_runs() -> None:
    session = FakeSession()

    async def scenario() -> None:
        async with batcher_over(session, BatchingOptions(max_batch_candidates=4)) as batcher:
            first = _request(batcher, 0)
            await session.wait_started(1)
            rest = [
                _request(batcher, 1, 2),
                _request(batcher, 3, 4),
                _request(batcher, 5, 6, 7, 8, 9, 10),  # larger than the budget: alone
                _request(batcher, 11),
            ]
            await _queued(batcher, 4)
            for k in range(2, 5):
                session.finish()
                await session.wait_started(k)
                assert batcher.running == 1  # the next run began as the last one ended
            session.finish(2)
            await _guard(asyncio.gather(first, *rest))
            assert session.runs == [[0], [1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [11]]

    asyncio.run(scenario())


def test_a_second_slot_takes_queued_work_while_the_first_run_computes() -> None:
    session = FakeSession()

    async def scenario() -> None:
        options = BatchingOptions(max_batch_candidates=100, concurrency=2)
        async with batcher_over(session, options) as batcher:
            a = _request(batcher, 1)
            await session.wait_started(1)
            b = _request(batcher, 2)
            await session.wait_started(2)  # two batches in flight
            assert batcher.running == 2
            c, d = _request(batcher, 3), _request(batcher, 4)
            await _queued(batcher, 2)
            session.finish()
            await session.wait_started(3)
            assert sorted(session.runs[2]) == [3, 4]
            session.finish(2)
            await _guard(asyncio.gather(a, b, c, d))

    asyncio.run(scenario())


def test_batching_off_runs_one_request_per_run() -> None:
    session = FakeSession()

    async def scenario() -> None:
        async with batcher_over(session, BatchingOptions(mode="off")) as batcher:
            first = _request(batcher, 1)
            await session.wait_started(1)
            rest = [_request(batcher, 2), _request(batcher, 3)]
            await _queued(batcher, 2)
            session.finish()
            await session.wait_started(2)
            session.finish()
            await session.wait_started(3)
            session.finish()
            await _guard(asyncio.gather(first, *rest))
            assert session.runs == [[1], [2], [3]]

    asyncio.run(scenario())


def test_delay_mode_holds_a_batch_open_only_while_the_session_is_idle() -> None:
    """With no run in flight, delay mode waits for the batch to fill (here: to the budget), and
    a full batch goes out without waiting out the delay."""
    session = FakeSession()

    async def scenario() -> None:
        options = BatchingOptions(max_batch_candidates=3, max_queue_delay_s=FOREVER_S, mode="delay")
        async with batcher_over(session, options) as batcher:
            tasks = [_request(batcher, 1)]
            for _ in range(5):
                await asyncio.sleep(0)
            assert session.runs == [] and batcher.depth == 1  # held open: the session is idle
            tasks += [_request(batcher, 2), _request(batcher, 3)]
            await session.wait_started(1)  # full: out at once
            assert session.runs == [[1, 2, 3]]
            session.finish()
            await _guard(asyncio.gather(*tasks))

    asyncio.run(scenario())


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="batching mode 'sometimes'"):
        BatchingOptions(mode="sometimes")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["queued", "off"])
def test_an_idle_session_runs_a_request_without_queueing_it(mode: str) -> None:
    """The idle fast path: the request never enters the queue (depth stays 0 while it runs), it
    holds the slot, and what arrives meanwhile queues and goes out the moment the run ends."""
    session = FakeSession()

    async def scenario() -> None:
        options = BatchingOptions(max_batch_candidates=100, mode=mode)  # type: ignore[arg-type]
        async with batcher_over(session, options) as batcher:
            first = _request(batcher, 1)
            await session.wait_started(1)
            assert batcher.depth == 0 and batcher.running == 1
            second = _request(batcher, 2)
            await _queued(batcher, 1)
            assert len(session.runs) == 1  # the slot is taken: the second waits in the queue
            session.finish()
            assert (await _guard(first)).tolist() == [10.0]
            await session.wait_started(2)
            session.finish()
            assert (await _guard(second)).tolist() == [20.0]
            assert batcher.stats.compute.count == 2
            assert batcher.stats.batches[1].count == 2
            assert batcher.stats.inferences == 2

    asyncio.run(scenario())


def test_a_cancelled_caller_of_the_fast_path_keeps_the_slot_until_its_run_ends() -> None:
    """A caller that stops waiting (its call was cancelled) does not free the slot while its run
    still computes: the next request queues instead of starting a second run."""
    session = FakeSession()

    async def scenario() -> None:
        async with batcher_over(session, BatchingOptions(max_batch_candidates=100)) as batcher:
            first = _request(batcher, 1)
            await session.wait_started(1)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            assert batcher.running == 1
            second = _request(batcher, 2)
            await _queued(batcher, 1)
            assert len(session.runs) == 1
            session.finish()
            await session.wait_started(2)
            assert batcher.running == 1
            session.finish()
            assert (await _guard(second)).tolist() == [20.0]
            assert batcher.running == 0

    asyncio.run(scenario())


def test_the_fast_path_keeps_the_deadline_the_limits_and_the_unload() -> None:
    """An idle session still refuses an expired deadline and a closed batcher, fails the caller
    with the session's error (and frees the slot), and close() waits for the run in flight."""
    from recsys.rpc.errors import DeadlineExceeded, Unavailable

    session = FakeSession()

    class Failing(FakeSession):
        def score(self, user_index: np.ndarray, item_index: np.ndarray) -> np.ndarray:
            raise RuntimeError("session run failed")

    async def scenario() -> None:
        batcher = Batcher(session, BatchingOptions(max_batch_candidates=100))
        batcher.start()
        with pytest.raises(DeadlineExceeded, match="before the request was queued"):
            await batcher.score(np.zeros(1, np.int64), np.ones(1, np.int64), timeout=0.0)
        assert session.runs == []
        running = _request(batcher, 3)
        await session.wait_started(1)
        closing = asyncio.get_running_loop().create_task(batcher.close())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not closing.done()  # waits for the run in flight
        with pytest.raises(Unavailable, match="unloading"):
            await batcher.score(np.zeros(1, np.int64), np.ones(1, np.int64), timeout=None)
        session.finish()
        assert (await _guard(running)).tolist() == [30.0]
        await _guard(closing)

        failing = Batcher(Failing(), BatchingOptions(max_batch_candidates=100))
        failing.start()
        for _ in range(2):  # the slot is freed after a failure: the second call runs too
            with pytest.raises(RuntimeError, match="session run failed"):
                await _guard(failing.score(np.zeros(1, np.int64), np.ones(1, np.int64), None))
        assert failing.running == 0
        await failing.close()

    asyncio.run(scenario())


class SoloSession(FakeSession):
    """A FakeSession with a solo session: it records which runs were asked for it."""

    solo_session = object()

    def __init__(self) -> None:
        super().__init__()
        self.solo: list[bool] = []

    def score(
        self, user_index: np.ndarray, item_index: np.ndarray, *, solo: bool = False
    ) -> np.ndarray:
        self.solo.append(solo)
        return super().score(user_index, item_index)


def _solo_request(batcher: Batcher, item: int, solo: bool) -> asyncio.Task[np.ndarray]:
    """One candidate, `solo` as the engine would say it (alone in the server or not)."""
    array = np.array([item], np.int64)
    return asyncio.get_running_loop().create_task(
        batcher.score(array * 0, array, timeout=None, solo=solo)
    )


async def _run_one(session: FakeSession, task: asyncio.Task[np.ndarray], run: int) -> list[float]:
    await session.wait_started(run)
    session.finish()
    result: list[float] = (await _guard(task)).tolist()
    return result


def test_only_a_request_alone_with_an_idle_session_runs_solo() -> None:
    session = SoloSession()

    async def scenario() -> None:
        async with batcher_over(session, _waiting_forever("queued")) as batcher:
            alone = _solo_request(batcher, 1, True)  # idle session, nothing else in the server
            await session.wait_started(1)
            queued = _solo_request(batcher, 2, True)  # said alone, but a run is in flight
            await _queued(batcher, 1)
            assert await _run_one(session, alone, 1) == [10.0]
            assert await _run_one(session, queued, 2) == [20.0]
            not_alone = _solo_request(batcher, 3, False)  # other requests in the server
            assert await _run_one(session, not_alone, 3) == [30.0]
            assert session.solo == [True, False, False]

    asyncio.run(scenario())


def test_a_scorer_without_a_solo_session_is_never_asked_for_one() -> None:
    session = FakeSession()  # its score takes no `solo`

    async def scenario() -> None:
        async with batcher_over(session, _waiting_forever("queued")) as batcher:
            assert await _run_one(session, _solo_request(batcher, 4, True), 1) == [40.0]

    asyncio.run(scenario())


def test_delay_mode_never_runs_solo() -> None:
    """Delay mode holds an idle session's request open for others: never the solo session."""
    session = SoloSession()

    async def scenario() -> None:
        async with batcher_over(session, _waiting_forever("delay")) as batcher:
            batcher._wait_gain = 0.0  # recent waits gained nothing: no hold
            assert await _run_one(session, _solo_request(batcher, 2, True), 1) == [20.0]
            assert session.solo == [False]

    asyncio.run(scenario())
