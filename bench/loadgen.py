"""A closed-loop load generator in separate processes, for any unary call.

Each client process builds its own callables (channels, prepared requests) from a picklable
factory, runs `concurrency / processes` threads that call back to back, and reports the calls
that started and ended inside the measured window. Used by bench/ranker.py and reusable by
other benchmarks (e.g. a gateway's): pass a factory that returns a zero-argument callable
performing one call and returning how many items it scored.

    result = run_load(functools.partial(make_rank_call, "127.0.0.1:8001"), concurrency=8,
                      duration_s=10, processes=2)
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# A factory runs in the client process and returns one call: () -> items scored (raises on error).
CallFactory = Callable[[], Callable[[], int]]


@dataclass
class LoadResult:
    concurrency: int
    processes: int
    duration_s: float
    requests: int
    errors: int
    items: int
    requests_per_s: float
    items_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    error_codes: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _error_name(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            return str(code().name)
        except Exception:
            pass
    return type(exc).__name__


def _worker(
    factory: CallFactory,
    threads: int,
    barrier: Any,
    start_at: Any,
    warmup_s: float,
    duration_s: float,
    out: Any,
) -> None:
    calls = [factory() for _ in range(threads)]
    for call in calls:  # one call each before timing: connections up, caches warm
        try:
            call()
        except Exception:
            pass
    barrier.wait()
    while start_at.value == 0.0:
        time.sleep(0.001)
    begin = start_at.value + warmup_s
    end = begin + duration_s
    latencies: list[list[float]] = [[] for _ in range(threads)]
    items = [0] * threads
    errors: list[Counter[str]] = [Counter() for _ in range(threads)]

    def loop(k: int) -> None:
        call = calls[k]
        while True:
            t0 = time.time()
            if t0 >= end:
                return
            try:
                n = call()
                ok = True
            except Exception as exc:
                ok = False
                name = _error_name(exc)
            t1 = time.time()
            if t0 >= begin and t1 <= end:
                if ok:
                    latencies[k].append(t1 - t0)
                    items[k] += n
                else:
                    errors[k][name] += 1

    workers = [threading.Thread(target=loop, args=(k,), daemon=True) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    total_errors: Counter[str] = Counter()
    for e in errors:
        total_errors.update(e)
    out.put(([x for lat in latencies for x in lat], sum(items), dict(total_errors)))


def run_load(
    factory: CallFactory,
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
    processes: int = 2,
) -> LoadResult:
    """Run `concurrency` closed-loop callers spread over up to `processes` client processes."""
    processes = max(1, min(processes, concurrency))
    per_process = [
        concurrency // processes + (1 if i < concurrency % processes else 0)
        for i in range(processes)
    ]
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(processes + 1)
    start_at = ctx.Value("d", 0.0)
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(factory, n, barrier, start_at, warmup_s, duration_s, out),
            daemon=True,
        )
        for n in per_process
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=120)
    start_at.value = time.time() + 0.05
    results = [out.get(timeout=warmup_s + duration_s + 120) for _ in procs]
    for p in procs:
        p.join(30)
    latencies = np.array([x for lat, _, _ in results for x in lat]) * 1000.0
    items = sum(n for _, n, _ in results)
    codes: Counter[str] = Counter()
    for _, _, e in results:
        codes.update(e)
    pct = np.percentile(latencies, [50, 95, 99]) if latencies.size else np.zeros(3)
    return LoadResult(
        concurrency=concurrency,
        processes=processes,
        duration_s=duration_s,
        requests=int(latencies.size),
        errors=int(sum(codes.values())),
        items=int(items),
        requests_per_s=latencies.size / duration_s,
        items_per_s=items / duration_s,
        p50_ms=float(pct[0]),
        p95_ms=float(pct[1]),
        p99_ms=float(pct[2]),
        mean_ms=float(latencies.mean()) if latencies.size else 0.0,
        error_codes=dict(codes),
    )


@dataclass(frozen=True)
class UnaryBytesCall:
    """A picklable factory of gRPC unary calls with prepared, serialized requests: the client
    spends no time building messages, so the measurement is the server's. Each call sends the
    next payload of the pool; an OK answer counts `items[i]` items scored.

        factory = UnaryBytesCall("127.0.0.1:8001", "/recsys.v1.RankingService/Rank",
                                 tuple(r.SerializeToString() for r in requests), (1000,) * n)
    """

    target: str
    method: str
    payloads: tuple[bytes, ...]
    items: tuple[int, ...]
    timeout_s: float = 30.0
    max_message_bytes: int = 64 * 1024 * 1024

    def __call__(self) -> Callable[[], int]:
        import grpc

        channel = grpc.insecure_channel(
            self.target,
            options=[
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes),
                # One connection per caller, as separate client replicas would have.
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
        stub = channel.unary_unary(self.method, request_serializer=None, response_deserializer=None)
        payloads, items, timeout = self.payloads, self.items, self.timeout_s
        state = {"i": int.from_bytes(os.urandom(2), "little") % len(payloads)}

        def call() -> int:
            i = state["i"] = (state["i"] + 1) % len(payloads)
            stub(payloads[i], timeout=timeout)
            return items[i]

        call.channel = channel  # type: ignore[attr-defined]  # keep the channel alive
        return call
