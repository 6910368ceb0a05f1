"""Dynamic batching for one model version that never idles the session: requests queue while a
batch computes and go out together the moment a session-run slot frees; expired or cancelled
requests are dropped before compute; a bounded queue refuses work instead of growing without end."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from recsys.rpc.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from serving.ranking import metrics
from serving.ranking.stats import VersionStats

logger = logging.getLogger(__name__)

# Delay mode's adaptive wait: hold batches open while waiting has recently gained this many
# requests...
WAIT_GAIN_THRESHOLD = 0.25
# ...and otherwise still wait on one batch in this many, to notice when load returns.
PROBE_EVERY = 16

BatchingMode = Literal["queued", "delay", "off"]
MODES: tuple[str, ...] = ("queued", "delay", "off")


def _name_os_thread(name: str) -> None:
    """Name the calling thread for the OS too (Linux keeps 15 characters), so that per-thread
    tools (top -H, /proc/<pid>/task/*/comm, the benchmarks) can tell session runs apart."""
    with contextlib.suppress(OSError):
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(name[:15])


class Scorer(Protocol):
    """What a batcher runs: a model version's thread-safe `score` (RankerModel)."""

    name: str
    version: int

    def score(self, user_index: np.ndarray, item_index: np.ndarray) -> np.ndarray: ...


@dataclass
class BatchingOptions:
    """Limits of one batcher (from RankingSettings).

    `mode`: "queued" (batch what is queued when a slot frees, never wait), "delay" (the same,
    and while the session is idle hold a batch open up to `max_queue_delay_s` for more requests)
    or "off" (one request per session run)."""

    max_batch_candidates: int = 16384
    max_queue_delay_s: float = 0.002
    max_queue_requests: int = 256
    concurrency: int = 1
    mode: BatchingMode = "queued"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"batching mode {self.mode!r}: use one of {', '.join(MODES)}")

    @property
    def enabled(self) -> bool:
        return self.mode != "off" and self.max_batch_candidates > 1


@dataclass
class _Pending:
    users: np.ndarray
    items: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued: float  # loop.time()
    deadline: float | None  # loop.time() after which the caller no longer waits
    enqueued_wall: float = field(default_factory=time.perf_counter)


class Batcher:
    """Queues scoring requests for one model version and runs them in batches on worker threads.

    One collector task waits for work, then for a free session-run slot (`concurrency` of them),
    then takes every live request queued, oldest first, up to `max_batch_candidates` (a request
    larger than that runs alone) and starts the run. While a run computes, requests queue; the
    moment it ends they go out as the next batch. So the session is idle only while the queue is
    empty, except in "delay" mode, which, when no run is in flight, holds a batch open for up to
    the queue delay (skipping the wait while recent waits gained nothing). A request that finds
    the queue empty and a slot free (queued and off modes) runs at once from its own coroutine,
    without the queue and the collector's hop.
    """

    def __init__(self, model: Scorer, options: BatchingOptions) -> None:
        self.model = model
        self.options = options
        self._label = model.name
        self._queue: deque[_Pending] = deque()
        self._queued_candidates = 0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(options.concurrency)
        self._running = 0  # session runs in flight
        self._executor = ThreadPoolExecutor(
            max_workers=options.concurrency,
            thread_name_prefix=f"ort-{model.name}-v{model.version}",
            initializer=_name_os_thread,
            initargs=(f"ort-{model.name}",),
        )
        # Session runs in flight: batch tasks, and the runs of requests that ran alone.
        self._computing: set[asyncio.Future[Any]] = set()
        self._collector: asyncio.Task[None] | None = None
        self._closed = False
        self._wait_gain = 1.0  # moving average of requests gained per wait
        self._batches_since_probe = 0
        self._depth = metrics.QUEUE_DEPTH.labels(model.name)
        self._queue_latency = metrics.QUEUE_DURATION.labels(model.name)
        self._compute_latency = metrics.COMPUTE_DURATION.labels(model.name, str(model.version))
        self._batch_requests = metrics.BATCH_REQUESTS.labels(model.name)
        self._batch_candidates = metrics.BATCH_CANDIDATES.labels(model.name)
        self.stats = VersionStats()

    def start(self) -> None:
        if self._collector is None:
            self._collector = asyncio.get_running_loop().create_task(self._run())

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def score(
        self, users: np.ndarray, items: np.ndarray, timeout: float | None
    ) -> np.ndarray:
        """Scores for one request, computed in some batch. `timeout` is the caller's remaining
        time in seconds (None: no deadline)."""
        if self._closed:
            raise Unavailable(f"{self.model.name} v{self.model.version} is unloading; retry")
        if len(self._queue) >= self.options.max_queue_requests:
            metrics.DROPPED.labels(self._label, "queue_full").inc()
            raise ResourceExhausted(
                f"the batching queue of {self.model.name} v{self.model.version} is full "
                f"({self.options.max_queue_requests} requests); retry later or elsewhere"
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        if timeout is not None and timeout <= 0:
            metrics.DROPPED.labels(self._label, "expired").inc()
            raise DeadlineExceeded("the deadline passed before the request was queued")
        if not self._queue and self.options.mode != "delay" and not self._slots.locked():
            # Nothing queued and a slot free: run now, from this coroutine, without the queue
            # and the collector's hop (delay mode's idle wait is its point, so it queues).
            return await self._run_alone(users, items)
        pending = _Pending(
            users,
            items,
            loop.create_future(),
            now,
            None if timeout is None else now + timeout,
        )
        self._queue.append(pending)
        self._queued_candidates += len(items)
        self._depth.inc()
        self._wakeup.set()
        return await pending.future

    def _take(self) -> _Pending:
        pending = self._queue.popleft()
        self._queued_candidates -= len(pending.items)
        self._depth.dec()
        return pending

    def _alive(self, pending: _Pending, now: float) -> bool:
        """False (and the request is answered) if it was cancelled or its deadline passed."""
        if pending.deadline is not None and now >= pending.deadline:
            metrics.DROPPED.labels(self._label, "expired").inc()
            if not pending.future.done():
                pending.future.set_exception(
                    DeadlineExceeded("the deadline passed while the request was queued")
                )
            return False
        if pending.future.done():
            metrics.DROPPED.labels(self._label, "cancelled").inc()
            return False
        return True

    @property
    def running(self) -> int:
        """Session runs in flight."""
        return self._running

    def _should_wait(self) -> bool:
        """Whether delay mode holds this batch open. Waiting only pays when more requests arrive
        meanwhile; while recent waits gained nothing (say, one caller at a time), batches go out
        at once, and every PROBE_EVERY-th batch waits again to notice when load returns."""
        self._batches_since_probe += 1
        if self._wait_gain >= WAIT_GAIN_THRESHOLD or self._batches_since_probe >= PROBE_EVERY:
            self._batches_since_probe = 0
            return True
        return False

    def _record_wait(self, gained: int) -> None:
        self._wait_gain = 0.7 * self._wait_gain + 0.3 * gained

    async def _hold_open(self) -> None:
        """Delay mode with the session idle: wait until the queue holds a full batch, the oldest
        request has waited the queue delay, or the soonest deadline comes."""
        loop = asyncio.get_running_loop()
        limit = self.options.max_batch_candidates
        if self._queued_candidates >= limit or not self._should_wait():
            return
        before = len(self._queue)
        while self._queue and self._queued_candidates < limit:
            now = loop.time()
            remaining = self._queue[0].enqueued + self.options.max_queue_delay_s - now
            deadlines = [p.deadline for p in self._queue if p.deadline is not None]
            if deadlines:  # a caller that gives up sooner is answered sooner
                remaining = min(remaining, min(deadlines) - now)
            if remaining <= 0:
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)
        self._record_wait(len(self._queue) - before)

    def _take_batch(self, now: float) -> list[_Pending]:
        """The live requests queued, oldest first, within the candidate budget (the first one
        always: a request larger than the budget runs alone); one request with batching off."""
        limit = self.options.max_batch_candidates
        batch: list[_Pending] = []
        size = 0
        while self._queue:
            head = self._queue[0]
            if not self._alive(head, now):
                self._take()
                continue
            n = len(head.items)
            if batch and size + n > limit:
                break
            batch.append(self._take())
            size += n
            if not self.options.enabled or size >= limit:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Requests keep queueing while this waits for a run in flight to end.
            await self._slots.acquire()
            try:
                if self.options.mode == "delay" and self._running == 0:
                    await self._hold_open()
                batch = self._take_batch(loop.time())
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            self._running += 1
            task = loop.create_task(self._compute(batch))
            self._computing.add(task)
            task.add_done_callback(self._computing.discard)

    async def _run_alone(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """One request's session run on a free slot, taken at once (no await before the run
        starts, so no other request can take the slot meanwhile). The slot is released when the
        run ends, even if the caller stopped waiting (cancelled): it stays counted in flight."""
        loop = asyncio.get_running_loop()
        await self._slots.acquire()  # free (checked by the caller): returns without suspending
        self._running += 1
        start = time.perf_counter()
        try:
            run = loop.run_in_executor(self._executor, self.model.score, users, items)
        except BaseException:
            self._release()
            raise
        self._computing.add(run)

        def finished(future: asyncio.Future[np.ndarray]) -> None:
            self._computing.discard(future)
            self._release()
            if not future.cancelled() and future.exception() is None:
                elapsed = time.perf_counter() - start
                self._queue_latency.observe(0.0)
                self.stats.queue.add(0.0)
                self._compute_latency.observe(elapsed)
                self.stats.record_run(1, len(items), elapsed)
                self._batch_requests.observe(1)
                self._batch_candidates.observe(len(items))

        run.add_done_callback(finished)
        try:
            # Shielded: a cancelled caller must not mark the run done while it still computes.
            return await asyncio.shield(run)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception(
                "Session run of %s v%d failed for 1 request", self.model.name, self.model.version
            )
            raise

    def _release(self) -> None:
        self._running -= 1
        self._slots.release()

    async def _compute(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        try:
            start = time.perf_counter()
            for pending in batch:
                self._queue_latency.observe(start - pending.enqueued_wall)
                self.stats.queue.add(start - pending.enqueued_wall)
            if len(batch) == 1:
                users, items = batch[0].users, batch[0].items
            else:
                users = np.concatenate([p.users for p in batch])
                items = np.concatenate([p.items for p in batch])
            scores = await loop.run_in_executor(self._executor, self.model.score, users, items)
            elapsed = time.perf_counter() - start
            self._compute_latency.observe(elapsed)
            self.stats.record_run(len(batch), len(items), elapsed)
            self._batch_requests.observe(len(batch))
            self._batch_candidates.observe(len(items))
            offset = 0
            for pending in batch:
                n = len(pending.items)
                if not pending.future.done():
                    pending.future.set_result(scores[offset : offset + n])
                offset += n
        except Exception as exc:
            logger.exception(
                "Session run of %s v%d failed for %d requests",
                self.model.name,
                self.model.version,
                len(batch),
            )
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
        finally:
            self._release()

    async def close(self) -> None:
        """Stop collecting, fail whatever is still queued, wait for runs in flight."""
        self._closed = True
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
        while self._queue:
            pending = self._take()
            if not pending.future.done():
                pending.future.set_exception(
                    Unavailable(f"{self.model.name} v{self.model.version} was unloaded; retry")
                )
        if self._computing:
            await asyncio.gather(*self._computing, return_exceptions=True)
        self._executor.shutdown(wait=False)
