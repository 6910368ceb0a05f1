"""The whole serving stack as local processes on loopback: retrieval, ranker replicas in fixed
slots (ports), and the gateway, with a load generator of blocking clients. Used by the e2e tests
and the gateway and rollout benchmarks.

The gateway is given every slot's address (RANKER_TARGETS); a slot without a process is refused
and skipped, like an address that a headless Service no longer lists, so a rolling update is
"start a replica in a free slot, wait until SERVING, SIGTERM an old one".
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from devtools.processes import ServiceProcess, free_port
from recsys.v1 import recommendation_pb2, recommendation_pb2_grpc


@dataclass
class StackOptions:
    ranker_slots: int = 4
    initial_rankers: int = 2
    retrieval_candidates: int = 100
    popular_candidates: int = 10
    ranker_shards: int = 4
    min_shard_size: int = 8
    poll_interval_s: float = 0.5
    grace_period_s: float = 5.0
    ranker_args: list[str] = field(default_factory=list)
    retrieval_args: list[str] = field(default_factory=list)
    gateway_args: list[str] = field(default_factory=list)
    # "list": one gateway channel per slot; "ipv4": one channel over every slot's address,
    # balanced round robin like a headless Service's DNS name.
    ranker_target_style: str = "list"
    warm_up_user: str = "u0"  # a user the repository knows (warm_up waits for its answer)


class Stack:
    """Retrieval, rankers and gateway processes over one model repository."""

    def __init__(
        self, repository: Path, log_dir: Path, options: StackOptions | None = None
    ) -> None:
        self.repository = repository
        self.log_dir = log_dir
        self.options = options or StackOptions()
        self.slot_ports = [free_port() for _ in range(self.options.ranker_slots)]
        self.rankers: dict[int, ServiceProcess] = {}
        self._generation = 0
        opts = self.options
        self.retrieval = ServiceProcess(
            "serving.retrieval",
            [
                f"--model-repository={repository}",
                f"--poll-interval-s={opts.poll_interval_s}",
                f"--grace-period-s={opts.grace_period_s}",
                *opts.retrieval_args,
            ],
            log_path=log_dir / "retrieval.log",
        )
        for slot in range(opts.initial_rankers):
            self.start_ranker(slot, wait=False)
        targets = ",".join(f"127.0.0.1:{p}" for p in self.slot_ports)
        if opts.ranker_target_style == "ipv4":
            targets = "ipv4:" + targets
        self.gateway = ServiceProcess(
            "gateway",
            [
                f"--retrieval-target=127.0.0.1:{self.retrieval.port}",
                f"--ranker-targets={targets}",
                f"--ranker-shards={opts.ranker_shards}",
                f"--min-shard-size={opts.min_shard_size}",
                f"--retrieval-candidates={opts.retrieval_candidates}",
                f"--popular-candidates={opts.popular_candidates}",
                f"--grace-period-s={opts.grace_period_s}",
                *opts.gateway_args,
            ],
            log_path=log_dir / "gateway.log",
        )
        try:
            self.retrieval.wait_serving(120)
            for proc in self.rankers.values():
                proc.wait_serving(120)
            self.gateway.wait_serving(120)
            self.warm_up()
        except BaseException:
            self.stop()
            raise

    def start_ranker(self, slot: int, *, wait: bool = True) -> ServiceProcess:
        if slot in self.rankers and self.rankers[slot].proc.poll() is None:
            raise RuntimeError(f"slot {slot} is taken")
        self._generation += 1
        proc = ServiceProcess(
            "serving.ranking",
            [
                f"--model-repository={self.repository}",
                "--models=books-ranker",
                "--intra-op-threads=1",
                f"--poll-interval-s={self.options.poll_interval_s}",
                f"--grace-period-s={self.options.grace_period_s}",
                *self.options.ranker_args,
            ],
            log_path=self.log_dir / f"ranker-{slot}-{self._generation}.log",
            port=self.slot_ports[slot],
        )
        self.rankers[slot] = proc
        if wait:
            proc.wait_serving(120)
        return proc

    def stop_ranker(self, slot: int) -> int:
        """SIGTERM the ranker in `slot` and wait until it has drained and exited."""
        return self.rankers.pop(slot).terminate(60)

    def running_slots(self) -> list[int]:
        return sorted(s for s, p in self.rankers.items() if p.proc.poll() is None)

    def warm_up(self, timeout: float = 30.0) -> None:
        """Until the gateway answers a known user without degradation."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.gateway.address) as channel:
            stub = recommendation_pb2_grpc.RecommendationServiceStub(channel)
            while True:
                try:
                    reply = stub.Recommend(
                        recommendation_pb2.RecommendRequest(
                            user_id=self.options.warm_up_user, domain="books", k=5
                        ),
                        timeout=5,
                    )
                    if not reply.degraded:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("the gateway gave no undegraded answer")
                time.sleep(0.2)

    def stop(self) -> None:
        for proc in [self.gateway, *self.rankers.values(), self.retrieval]:
            try:
                proc.terminate(30)
            except Exception:
                proc.kill()
        self.rankers.clear()


@dataclass
class Outcome:
    started: float
    latency_s: float
    code: str
    degraded: bool = False
    reasons: tuple[int, ...] = ()
    ranker_versions: tuple[str, ...] = ()


class LoadGenerator:
    """Blocking clients in threads that call Recommend back to back (closed loop) until stopped."""

    def __init__(
        self,
        address: str,
        *,
        concurrency: int = 4,
        timeout_s: float = 2.0,
        request: Callable[[int], recommendation_pb2.RecommendRequest] | None = None,
    ) -> None:
        self.address = address
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.request = request or (
            lambda n: recommendation_pb2.RecommendRequest(
                user_id=f"u{n % 40}", domain="books", k=10, exclude_seen=True
            )
        )
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _worker(self, worker: int) -> None:
        n = worker
        with grpc.insecure_channel(self.address) as channel:
            stub = recommendation_pb2_grpc.RecommendationServiceStub(channel)
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    reply = stub.Recommend(self.request(n), timeout=self.timeout_s)
                    outcome = Outcome(
                        start,
                        time.monotonic() - start,
                        "OK",
                        reply.degraded,
                        tuple(d.reason for d in reply.degradations),
                        tuple(
                            m.model_version
                            for m in reply.model_versions
                            if m.model_name.endswith("-ranker")
                        ),
                    )
                except grpc.RpcError as exc:
                    outcome = Outcome(start, time.monotonic() - start, exc.code().name)
                with self._lock:
                    self.outcomes.append(outcome)
                n += self.concurrency

    def __enter__(self) -> LoadGenerator:
        for worker in range(self.concurrency):
            thread = threading.Thread(target=self._worker, args=(worker,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def failures(self) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.code != "OK"]

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)


# A record of one request: wall-clock start (time.time()), latency in seconds, status code name,
# degradation reasons, ranker model versions named in the answer.
Record = tuple[float, float, str, list[int], list[str]]


def recommend_load(
    address: str,
    mode: str,
    value: float,
    duration_s: float,
    users: list[str],
    k: int,
    timeout_s: float,
    worker: int,
    workers: int,
    results: Any,
    stop: Any = None,
) -> None:
    """One load-generator process (run it with multiprocessing): `mode` "rate" sends `value`
    requests/s in all (evenly spaced, split over `workers` processes), "concurrency" keeps `value`
    requests in flight in all. Runs `duration_s` or until the `stop` event is set, then puts its
    list of Records on `results`."""

    async def run() -> list[Record]:
        records: list[Record] = []
        async with grpc.aio.insecure_channel(address) as channel:
            stub = recommendation_pb2_grpc.RecommendationServiceStub(channel)
            await channel.channel_ready()

            async def one(n: int) -> None:
                request = recommendation_pb2.RecommendRequest(
                    user_id=users[n % len(users)], domain="books", k=k, exclude_seen=True
                )
                wall = time.time()
                start = time.perf_counter()
                try:
                    reply = await stub.Recommend(request, timeout=timeout_s)
                    code = "OK"
                    reasons = [int(d.reason) for d in reply.degradations]
                    versions = [
                        m.model_version
                        for m in reply.model_versions
                        if m.model_name.endswith("-ranker")
                    ]
                except grpc.RpcError as exc:
                    code, reasons, versions = exc.code().name, [], []
                records.append((wall, time.perf_counter() - start, code, reasons, versions))

            loop = asyncio.get_running_loop()
            t0 = loop.time()
            end = t0 + duration_s

            def running() -> bool:
                return loop.time() < end and not (stop is not None and stop.is_set())

            if mode == "rate":
                interval = workers / value
                tasks = []
                n = worker
                next_at = t0 + worker / value
                while running():
                    delay = next_at - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(one(n)))
                    n += workers
                    next_at += interval
                await asyncio.gather(*tasks)
            else:
                share = int(value) // workers + (1 if worker < int(value) % workers else 0)

                async def closed(slot: int) -> None:
                    n = worker + slot * workers
                    while running():
                        await one(n)
                        n += workers * max(share, 1)

                await asyncio.gather(*(closed(s) for s in range(share)))
        return records

    results.put(asyncio.run(run()))
