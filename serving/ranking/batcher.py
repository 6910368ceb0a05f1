"""Dynamic batching for one model version that never idles the session: requests queue while a
batch computes, and the session thread whose run ends takes them as the next batch at once;
expired or cancelled requests are dropped before compute; a bounded queue refuses work instead of
growing without end."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
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
    """What a batcher runs: a model version's thread-safe `score` (RankerModel). A scorer with
    a `solo_session` (RankerModel with RANKING_SOLO_INTRA_OP_THREADS) also takes `solo=True`:
    the batcher passes it for a request that had the server to itself."""

    name: str
    version: int

    def score(self, user_index: np.ndarray, item_index: np.ndarray) -> np.ndarray: ...


@dataclass
class BatchingOptions:
    """Limits of one batcher (from RankingSettings).

    `mode`: "queued" (batch what is queued when a slot frees, never wait), "delay" (the same,
    and while the session is idle hold a batch open up to `max_queue_delay_s` for more requests)
    or "off" (one request per session run)."""

    max_batch_candidates: int = 1024
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
    enqueued: float  # time.monotonic()
    deadline: float | None  # time.monotonic() after which the caller no longer waits
    solo: bool = False  # alone in the server, the session idle: may run on the solo session
    enqueued_wall: float = field(default_factory=time.perf_counter)


class Batcher:
    """Queues scoring requests for one model version and runs them in batches on its own
    session threads (`concurrency` of them, one session-run slot each).

    A request that finds the queue empty and a slot free goes straight to that slot's thread.
    Otherwise it queues, and the thread whose run ends takes every live request queued, oldest
    first, up to `max_batch_candidates` (a request larger than that runs alone), and starts the
    next run itself, without a round trip through the event loop: so the session is idle only
    while the queue is empty, however late the loop is scheduled. "delay" mode also, while no
    run is in flight, holds a batch open for up to the queue delay (skipping the wait while
    recent waits gained nothing). The event loop only queues requests and hands each finished
    batch's scores to its callers.
    """

    def __init__(self, model: Scorer, options: BatchingOptions) -> None:
        self.model = model
        self.options = options
        self._label = model.name
        # Guards the queue, the hand-offs and the counters below; the session threads wait on it.
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._queued_candidates = 0
        self._handoff: deque[list[_Pending]] = deque()  # batches given to an idle slot
        self._free = options.concurrency  # slots without a run (or a held-open batch)
        self._running = 0  # session runs in flight
        self._holding = False  # a slot holds a batch open (delay mode)
        self._closed = False
        self._wait_gain = 1.0  # moving average of requests gained per wait
        self._batches_since_probe = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self._depth = metrics.QUEUE_DEPTH.labels(model.name)
        self._queue_latency = metrics.QUEUE_DURATION.labels(model.name)
        self._compute_latency = metrics.COMPUTE_DURATION.labels(model.name, str(model.version))
        # RankerModel's solo session (RANKING_SOLO_INTRA_OP_THREADS), where it has one.
        self._has_solo = getattr(model, "solo_session", None) is not None
        self._solo_runs = metrics.SOLO_RUNS.labels(model.name)
        self._batch_requests = metrics.BATCH_REQUESTS.labels(model.name)
        self._batch_candidates = metrics.BATCH_CANDIDATES.labels(model.name)
        self.stats = VersionStats()

    def start(self) -> None:
        """Start the session threads; from the event loop that will await the scores."""
        if self._threads:
            return
        self._loop = asyncio.get_running_loop()
        for slot in range(self.options.concurrency):
            thread = threading.Thread(
                target=self._work,
                name=f"ort-{self.model.name}-v{self.model.version}_{slot}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        """Session runs in flight."""
        return self._running

    async def score(
        self, users: np.ndarray, items: np.ndarray, timeout: float | None, *, solo: bool = False
    ) -> np.ndarray:
        """Scores for one request, computed in some batch. `timeout` is the caller's remaining
        time in seconds (None: no deadline). `solo`: no other request is in the server, so that
        if no run is in flight either, this one may score on the model's solo session."""
        if self._closed:
            raise Unavailable(f"{self.model.name} v{self.model.version} is unloading; retry")
        if len(self._queue) >= self.options.max_queue_requests:
            metrics.DROPPED.labels(self._label, "queue_full").inc()
            raise ResourceExhausted(
                f"the batching queue of {self.model.name} v{self.model.version} is full "
                f"({self.options.max_queue_requests} requests); retry later or elsewhere"
            )
        if timeout is not None and timeout <= 0:
            metrics.DROPPED.labels(self._label, "expired").inc()
            raise DeadlineExceeded("the deadline passed before the request was queued")
        self.start()
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        pending = _Pending(
            users,
            items,
            loop.create_future(),
            now,
            None if timeout is None else now + timeout,
        )
        with self._cond:
            if not self._queue and self._free and self.options.mode != "delay":
                # Nothing queued and a slot free: straight to its thread (delay mode's idle
                # wait is its point, so it queues).
                self._free -= 1
                pending.solo = solo and self._has_solo and self._running == 0
                self._running += 1
                self._handoff.append([pending])
            else:
                self._queue.append(pending)
                self._queued_candidates += len(items)
                self._depth.inc()
            self._cond.notify_all()
        try:
            # Shielded: a cancelled caller must not mark the run done while it still computes.
            return await asyncio.shield(pending.future)
        except asyncio.CancelledError:
            pending.future.cancel()
            raise

    # -- on the session threads, with self._cond held unless said otherwise --

    def _take(self) -> _Pending:
        pending = self._queue.popleft()
        self._queued_candidates -= len(pending.items)
        self._depth.dec()
        return pending

    def _alive(self, pending: _Pending, now: float) -> bool:
        """False (and the request is answered) if it was cancelled or its deadline passed."""
        if pending.deadline is not None and now >= pending.deadline:
            metrics.DROPPED.labels(self._label, "expired").inc()
            self._answer(
                pending, DeadlineExceeded("the deadline passed while the request was queued")
            )
            return False
        if pending.future.done():
            metrics.DROPPED.labels(self._label, "cancelled").inc()
            return False
        return True

    def _prune(self, now: float) -> None:
        """Drop the expired and cancelled requests from the queue (each answered by _alive)."""
        live = [p for p in self._queue if self._alive(p, now)]
        dropped = len(self._queue) - len(live)
        if dropped:
            self._queue = deque(live)
            self._queued_candidates = sum(len(p.items) for p in live)
            self._depth.dec(dropped)

    def _answer(self, pending: _Pending, error: BaseException) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for the answer
            self._loop.call_soon_threadsafe(_fail, pending.future, error)

    def _should_wait(self) -> bool:
        """Whether delay mode holds this batch open. Waiting only pays when more requests arrive
        meanwhile; while recent waits gained nothing (say, one caller at a time), batches go out
        at once, and every PROBE_EVERY-th batch waits again to notice when load returns."""
        self._batches_since_probe += 1
        if self._wait_gain >= WAIT_GAIN_THRESHOLD or self._batches_since_probe >= PROBE_EVERY:
            self._batches_since_probe = 0
            return True
        return False

    def _hold_open(self) -> None:
        """Delay mode with no run in flight: wait until the queue holds a full batch, the oldest
        request has waited the queue delay, or the soonest deadline comes."""
        limit = self.options.max_batch_candidates
        if self._queued_candidates >= limit or not self._should_wait():
            return
        self._holding = True
        before = len(self._queue)
        try:
            while self._queue and self._queued_candidates < limit and not self._closed:
                now = time.monotonic()
                remaining = self._queue[0].enqueued + self.options.max_queue_delay_s - now
                deadlines = [p.deadline for p in self._queue if p.deadline is not None]
                if deadlines:  # a caller that gives up sooner is answered sooner
                    remaining = min(remaining, min(deadlines) - now)
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        finally:
            self._holding = False
        self._wait_gain = 0.7 * self._wait_gain + 0.3 * (len(self._queue) - before)

    def _take_batch(self) -> list[_Pending]:
        """The live requests queued, oldest first, within the candidate budget (the first one
        always: a request larger than the budget runs alone); one request with batching off."""
        if self.options.mode == "delay" and self._running == 0:
            self._hold_open()
        now = time.monotonic()
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

    def _next_batch(self, holds_slot: bool) -> list[_Pending] | None:
        """The next batch for this thread's slot (None: the batcher closed). `holds_slot`: the
        thread's last run just ended and it still holds its slot."""
        with self._cond:
            while True:
                if self._handoff and not holds_slot:
                    return self._handoff.popleft()
                if self._queue and not self._holding and (holds_slot or self._free):
                    if not holds_slot:
                        self._free -= 1
                        holds_slot = True
                    batch = self._take_batch()
                    if batch:
                        self._running += 1
                        if self._queue:  # what is left over is for another free slot
                            self._cond.notify_all()
                        return batch
                    continue
                if holds_slot:
                    self._free += 1
                    holds_slot = False
                if self._closed and not self._handoff:
                    return None
                self._cond.wait()

    def _work(self) -> None:
        """A session thread: run batches until the batcher closes, each run's outcome handed to
        the event loop."""
        _name_os_thread(f"ort-{self.model.name}")
        assert self._loop is not None
        holds_slot = False
        while (batch := self._next_batch(holds_slot)) is not None:
            start = time.perf_counter()
            scores: np.ndarray | None = None
            error: BaseException | None = None
            try:
                if len(batch) == 1:
                    users, items = batch[0].users, batch[0].items
                else:
                    users = np.concatenate([p.users for p in batch])
                    items = np.concatenate([p.items for p in batch])
                if batch[0].solo and len(batch) == 1:
                    scores = self.model.score(users, items, solo=True)  # type: ignore[call-arg]
                    self._solo_runs.inc()
                else:
                    scores = self.model.score(users, items)
            except Exception as exc:
                error = exc
                logger.exception(
                    "Session run of %s v%d failed for %d request(s)",
                    self.model.name,
                    self.model.version,
                    len(batch),
                )
            elapsed = time.perf_counter() - start
            with self._cond:
                self._running -= 1
                # Before this run's callers hear back, the queue's dead requests are answered
                # and uncounted, as the next batch would find them.
                self._prune(time.monotonic())
            holds_slot = True
            try:
                self._loop.call_soon_threadsafe(self._deliver, batch, scores, error, start, elapsed)
            except RuntimeError:  # the loop is closed: nobody waits for these scores
                return

    # -- on the event loop --

    def _deliver(
        self,
        batch: list[_Pending],
        scores: np.ndarray | None,
        error: BaseException | None,
        start: float,
        elapsed: float,
    ) -> None:
        for pending in batch:
            self._queue_latency.observe(start - pending.enqueued_wall)
            self.stats.queue.add(start - pending.enqueued_wall)
        if scores is None:
            for pending in batch:
                _fail(pending.future, error or RuntimeError("session run failed"))
            return
        n_candidates = sum(len(p.items) for p in batch)
        self._compute_latency.observe(elapsed)
        self.stats.record_run(len(batch), n_candidates, elapsed)
        self._batch_requests.observe(len(batch))
        self._batch_candidates.observe(n_candidates)
        offset = 0
        for pending in batch:
            n = len(pending.items)
            if not pending.future.done():
                pending.future.set_result(scores[offset : offset + n])
            offset += n

    async def close(self) -> None:
        """Stop taking requests, fail whatever is still queued, wait for runs in flight."""
        self._closed = True
        with self._cond:
            queued = list(self._queue)
            while self._queue:
                self._take()
            self._cond.notify_all()
        for pending in queued:
            _fail(
                pending.future,
                Unavailable(f"{self.model.name} v{self.model.version} was unloaded; retry"),
            )
        threads, self._threads = self._threads, []
        if threads:
            await asyncio.to_thread(_join, threads)
            await asyncio.sleep(0)  # the last runs' deliveries, posted before the threads ended


def _join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join()


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
