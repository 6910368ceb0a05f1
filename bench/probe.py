"""Bad-input probe: starts the serving stack (retrieval, two rankers, gateway) on loopback over a
tiny model and sends it the hostile and unlucky requests that concern the ranker and
the gateway, one case at a time. For each case it records what was expected, what came back, and
whether every service still answered its health check afterwards.

    python -m bench.probe            # results in bench/results/probe.{json,md}

The last cases are destructive (a ranker drained under load, retrieval stopped) and run last.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from grpc_health.v1 import health_pb2  # noqa: E402

from devtools.processes import health_status, project_env  # noqa: E402
from devtools.stack import Stack, StackOptions  # noqa: E402
from devtools.tiny_models import TinyModel, make_tiny_model, publish_tiny_model  # noqa: E402
from recsys.inference import grpc_service_pb2 as pb  # noqa: E402
from recsys.inference import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from recsys.v1 import (  # noqa: E402
    ranking_pb2,
    ranking_pb2_grpc,
    recommendation_pb2,
    recommendation_pb2_grpc,
)

RESULTS = ROOT / "bench" / "results"
MODEL = "books-ranker"
LONG_ID = "x" * 20_000
# A status message longer than this echoes what the caller sent.
SHORT_MESSAGE = 1000
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class Case:
    case: str
    target: str
    expected: str
    observed: str = ""
    ok: bool = False
    healthy: bool = False
    seconds: float = 0.0


def _status(call: Callable[[], Any]) -> tuple[str, str, Any]:
    """(status code name, details, reply or None) of one blocking call."""
    try:
        return "OK", "", call()
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or "", None


def _short(details: str) -> str:
    return details if len(details) <= 120 else f"{details[:117]}..."


class Probe:
    """The stack, stubs to its services, and the cases run so far."""

    def __init__(self, stack: Stack, tiny: TinyModel) -> None:
        self.stack = stack
        self.tiny = tiny
        self.ranker = stack.rankers[0]
        self.ranker_channel = grpc.insecure_channel(
            self.ranker.address,
            options=[("grpc.max_receive_message_length", 64 << 20)],
        )
        self.gateway_channel = grpc.insecure_channel(
            stack.gateway.address,
            options=[("grpc.max_send_message_length", 64 << 20)],
        )
        self.rank = ranking_pb2_grpc.RankingServiceStub(self.ranker_channel)
        self.oip = pb_grpc.GRPCInferenceServiceStub(self.ranker_channel)
        self.gateway = recommendation_pb2_grpc.RecommendationServiceStub(self.gateway_channel)
        self.cases: list[Case] = []

    def healthy(self) -> bool:
        """Every process that should be up answers SERVING and a plain request succeeds."""
        procs = [self.stack.gateway, self.stack.retrieval, *self.stack.rankers.values()]
        if any(health_status(p.address, timeout=5) != SERVING for p in procs):
            return False
        code, _, _ = _status(
            lambda: self.gateway.Recommend(
                recommendation_pb2.RecommendRequest(user_id="u1", domain="books", k=5),
                timeout=5,
            )
        )
        return code == "OK"

    def run(
        self, case: str, target: str, expected: str, check: Callable[[], tuple[str, bool]]
    ) -> None:
        start = time.monotonic()
        try:
            observed, ok = check()
        except Exception as exc:  # a probe that breaks is an observation, not a crash
            observed, ok = f"probe error: {exc!r}", False
        row = Case(case, target, expected, observed, ok, self.healthy(), time.monotonic() - start)
        self.cases.append(row)
        print(
            f"{'pass' if ok else 'FAIL'}  {case}: {observed} "
            f"(healthy: {'yes' if row.healthy else 'NO'})",
            flush=True,
        )

    # -- the ranker ------------------------------------------------------------------------

    def rank_request(self, **fields: Any) -> ranking_pb2.RankRequest:
        values: dict[str, Any] = {
            "model_name": MODEL,
            "user_id": self.tiny.user_ids[1],
            "item_ids": self.tiny.item_ids[:5],
        }
        values.update(fields)
        return ranking_pb2.RankRequest(**values)

    def expect_code(
        self, call: Callable[[], Any], wanted: set[str], *, short: bool = False
    ) -> tuple[str, bool]:
        code, details, _ = _status(call)
        observed = f"{code} {_short(details)}".strip()
        ok = code in wanted
        if short and code != "OK":
            observed += f" [message: {len(details)} chars]"
            ok = ok and len(details) <= SHORT_MESSAGE
        return observed, ok

    def expect_rank(self, fields: dict[str, Any], *, short: bool = False) -> tuple[str, bool]:
        """A Rank call that must be INVALID_ARGUMENT (with a short message if `short`)."""
        request = self.rank_request(**fields)
        return self.expect_code(
            lambda: self.rank.Rank(request, timeout=5), {"INVALID_ARGUMENT"}, short=short
        )

    def ranker_cases(self) -> None:
        for version in ("\u00b2", "\uff13", "9" * 30):
            self.run(
                f"Rank model_version={version!r}",
                "ranker",
                "INVALID_ARGUMENT",
                functools.partial(self.expect_rank, {"model_version": version}),
            )
        self.run(
            "ModelMetadata version='\u00b2'",
            "ranker",
            "INVALID_ARGUMENT",
            lambda: self.expect_code(
                lambda: self.oip.ModelMetadata(
                    pb.ModelMetadataRequest(name=MODEL, version="\u00b2"), timeout=5
                ),
                {"INVALID_ARGUMENT", "NOT_FOUND"},
            ),
        )

        def model_ready() -> tuple[str, bool]:
            code, details, reply = _status(
                lambda: self.oip.ModelReady(
                    pb.ModelReadyRequest(name=MODEL, version="\u00b2"), timeout=5
                )
            )
            if reply is None:
                return f"{code} {_short(details)}", False
            return f"OK ready={reply.ready}", reply.ready is False

        self.run("ModelReady version='\u00b2'", "ranker", "OK ready=False", model_ready)
        for shape in ([2**32, 2**32], [2**62, 4]):

            def infer(shape: list[int] = shape) -> tuple[str, bool]:
                request = pb.ModelInferRequest(model_name=MODEL)
                for name in ("user_index", "item_index"):
                    request.inputs.add(name=name, datatype="INT64", shape=[1])
                    request.raw_input_contents.append(np.asarray([1], "<i8").tobytes())
                request.inputs[1].shape[:] = shape
                return self.expect_code(
                    lambda: self.oip.ModelInfer(request, timeout=5), {"INVALID_ARGUMENT"}
                )

            self.run(f"ModelInfer shape {shape}", "ranker", "INVALID_ARGUMENT", infer)
        for what, fields in (
            ("user_id", {"user_id": LONG_ID}),
            ("model_name", {"model_name": LONG_ID}),
            ("item id", {"item_ids": ["i1", LONG_ID]}),
        ):
            self.run(
                f"Rank {what} of 20,000 characters",
                "ranker",
                "INVALID_ARGUMENT, short message",
                functools.partial(self.expect_rank, fields, short=True),
            )
        self.run(
            "ModelMetadata name of 20,000 characters",
            "ranker",
            "INVALID_ARGUMENT, short message",
            lambda: self.expect_code(
                lambda: self.oip.ModelMetadata(pb.ModelMetadataRequest(name=LONG_ID), timeout=5),
                {"INVALID_ARGUMENT", "NOT_FOUND"},
                short=True,
            ),
        )

        def unknown_items() -> tuple[str, bool]:
            items = [self.tiny.item_ids[0], "stale-id", self.tiny.item_ids[1]]
            plain, _, _ = _status(lambda: self.rank.Rank(self.rank_request(item_ids=items)))
            code, details, reply = _status(
                lambda: self.rank.Rank(
                    self.rank_request(item_ids=items, allow_unknown_items=True), timeout=5
                )
            )
            if reply is None:
                return f"without: {plain}; with: {code} {_short(details)}", False
            flags = list(reply.missing)
            return (
                f"without: {plain}; with: OK missing={flags}",
                plain == "NOT_FOUND" and flags == [False, True, False],
            )

        self.run(
            "Rank one unknown item id (allow_unknown_items)",
            "ranker",
            "NOT_FOUND without the option; OK, flagged missing with it",
            unknown_items,
        )
        self.run(
            "tritonclient: model config, statistics, index, stock request",
            "ranker",
            "OK",
            self.triton,
        )
        self.run(
            "/metrics without _created series", "ranker, gateway", "no _created", self.no_created
        )

    def triton(self) -> tuple[str, bool]:
        """The real tritonclient, in its own process (its stubs share our message names)."""
        out = subprocess.run(
            [
                sys.executable,
                str(ROOT / "tests/utils/triton_probe.py"),
                f"--url={self.ranker.address}",
                f"--model={MODEL}",
                "--stock=8",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=project_env(),
        )
        if out.returncode != 0:
            return f"probe exited {out.returncode}: {out.stderr.strip()[-200:]}", False
        answer = json.loads(out.stdout)
        if "stock_error" in answer:
            error = answer["stock_error"]
            return f"{error['status']} {_short(error['message'])}", False
        stats = answer["statistics"]["model_stats"][0]
        shape = answer["stock"]["shape"]
        return (
            f"OK: config max_batch_size={answer['config'].get('max_batch_size', 0)}, "
            f"stock request shape {shape}, {stats['inference_count']} inferences counted, "
            f"{len(answer['index']['models'])} versions indexed",
            True,
        )

    def no_created(self) -> tuple[str, bool]:
        found = {}
        for name, proc in (("ranker", self.ranker), ("gateway", self.stack.gateway)):
            url = f"http://127.0.0.1:{proc.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as reply:
                body = reply.read().decode()
            found[name] = sum(1 for line in body.splitlines() if "_created" in line)
        return ", ".join(f"{k}: {v} _created lines" for k, v in found.items()), not any(
            found.values()
        )

    # -- the gateway -----------------------------------------------------------------------

    def gateway_cases(self) -> None:
        def recent_ids() -> tuple[str, bool]:
            request = recommendation_pb2.RecommendRequest(
                user_id="u1",
                domain="books",
                k=10,
                recent_item_ids=[f"item-{j}" for j in range(1_000_000)],
            )
            size = request.ByteSize()
            observed, ok = self.expect_code(
                lambda: self.gateway.Recommend(request, timeout=30),
                {"INVALID_ARGUMENT"},
                short=True,
            )
            return f"{observed} ({size / 1e6:.1f} MB request)", ok

        self.run(
            "Recommend with 10^6 recent_item_ids",
            "gateway",
            "INVALID_ARGUMENT, short message",
            recent_ids,
        )
        self.run(
            "Recommend user_id of 20,000 characters",
            "gateway",
            "INVALID_ARGUMENT, short message",
            lambda: self.expect_code(
                lambda: self.gateway.Recommend(
                    recommendation_pb2.RecommendRequest(user_id=LONG_ID, domain="books", k=5),
                    timeout=5,
                ),
                {"INVALID_ARGUMENT"},
                short=True,
            ),
        )

        def tight_deadlines() -> tuple[str, bool]:
            counts: collections.Counter[str] = collections.Counter()
            for n in range(20):
                request = recommendation_pb2.RecommendRequest(
                    user_id=f"u{n % 40}", domain="books", k=10
                )
                try:
                    self.gateway.Recommend(request, timeout=0.011 + 0.005 * (n % 2))
                    counts["OK"] += 1
                except grpc.RpcError as exc:
                    counts[exc.code().name] += 1
            return dict(sorted(counts.items())).__repr__(), "UNAVAILABLE" not in counts

        self.run(
            "Recommend with 11-16 ms deadlines (healthy upstreams), 20 calls",
            "gateway",
            "OK or DEADLINE_EXCEEDED, never UNAVAILABLE",
            tight_deadlines,
        )

    def odd_version_directory(self) -> None:
        """A version directory named '²' appears: the running ranker reloads (SIGHUP), and a new
        ranker starts on the repository (slot 1, free after the drain case)."""

        def check() -> tuple[str, bool]:
            (self.stack.repository / MODEL / "\u00b2").mkdir()
            self.ranker.proc.send_signal(signal.SIGHUP)
            fresh = self.stack.start_ranker(1, wait=False)
            try:
                fresh.wait_serving(60)
                started = "SERVING"
            except (RuntimeError, TimeoutError):
                started = f"exited {fresh.proc.poll()}"
                self.stack.rankers.pop(1)
            alive = self.ranker.proc.poll() is None
            code, details, _ = _status(lambda: self.rank.Rank(self.rank_request(), timeout=5))
            return (
                f"running ranker after SIGHUP: {'running' if alive else 'exited'}, Rank {code}; "
                f"new ranker: {started}",
                alive and code == "OK" and started == "SERVING",
            )

        self.run(
            "version directory named '\u00b2' (SIGHUP; a ranker started on it)",
            "ranker",
            "skipped and logged: the running one keeps serving, a new one starts",
            check,
        )

    # -- destructive, last -----------------------------------------------------------------

    def drain_case(self) -> None:
        """SIGTERM the second ranker with 40 Rank calls of 10,000 candidates in flight."""
        proc = self.stack.rankers[1]

        def drain() -> tuple[str, bool]:
            items = [self.tiny.item_ids[j % len(self.tiny.item_ids)] for j in range(10_000)]
            request = self.rank_request(item_ids=items)
            with grpc.insecure_channel(proc.address) as channel:
                stub = ranking_pb2_grpc.RankingServiceStub(channel)
                stub.Rank(request, timeout=30)
                calls = [stub.Rank.future(request, timeout=60) for _ in range(40)]
                time.sleep(0.05)
                start = time.monotonic()
                proc.proc.send_signal(signal.SIGTERM)
                counts: collections.Counter[str] = collections.Counter()
                for call in calls:
                    try:
                        call.result()
                        counts["OK"] += 1
                    except grpc.RpcError as exc:
                        counts[exc.code().name] += 1
            code = proc.proc.wait(60)
            took = time.monotonic() - start
            self.stack.rankers.pop(1)
            return (
                f"{dict(sorted(counts.items()))}, exit {code} after {took:.1f} s",
                counts == {"OK": 40} and code == 0,
            )

        self.run(
            "SIGTERM a ranker with 40 Rank calls of 10,000 candidates in flight",
            "ranker",
            "all 40 OK, exit 0 within the grace period",
            drain,
        )

    def retrieval_down_case(self) -> None:
        self.stack.retrieval.terminate(30)

        def unknown_user() -> tuple[str, bool]:
            code, details, reply = _status(
                lambda: self.gateway.Recommend(
                    recommendation_pb2.RecommendRequest(user_id="nobody-new", domain="books", k=5),
                    timeout=5,
                )
            )
            if reply is None:
                return f"{code} {_short(details)}", False
            reasons = [
                recommendation_pb2.DegradationReason.Name(d.reason) for d in reply.degradations
            ]
            return f"OK, {len(reply.items)} items, degraded {reasons}", bool(reply.items)

        start = time.monotonic()
        try:
            observed, ok = unknown_user()
        except Exception as exc:
            observed, ok = f"probe error: {exc!r}", False
        # Retrieval is down on purpose: healthy means the gateway and the ranker still answer.
        healthy = all(
            health_status(p.address, timeout=5) == SERVING
            for p in (self.stack.gateway, self.ranker)
        )
        self.cases.append(
            Case(
                "Recommend for an unknown user with retrieval down",
                "gateway",
                "OK: popular items, degraded with the reason",
                observed,
                ok,
                healthy,
                time.monotonic() - start,
            )
        )
        print(f"{'pass' if ok else 'FAIL'}  unknown user, retrieval down: {observed}", flush=True)


def _markdown(cases: list[Case], meta: dict[str, Any]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    passed = sum(c.ok for c in cases)
    lines = [
        "# Bad-input probe: ranker and gateway",
        "",
        f"`make probe` on {meta['machine']}, {meta['date']}: {passed} of {len(cases)} cases as "
        "expected. Healthy: every service still answered SERVING and a plain Recommend "
        "succeeded after the case (after the last case retrieval is down on purpose: the "
        "gateway and the ranker).",
        "",
        "| case | service | expected | observed | as expected | still healthy |",
        "|---|---|---|---|---|---|",
    ]
    for c in cases:
        lines.append(
            f"| {cell(c.case)} | {c.target} | {cell(c.expected)} | {cell(c.observed)} | "
            f"{'yes' if c.ok else '**no**'} | {'yes' if c.healthy else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "probe")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="probe-") as tmp:
        repo, logs = Path(tmp) / "repo", Path(tmp) / "logs"
        repo.mkdir()
        logs.mkdir()
        tiny = publish_tiny_model(repo, make_tiny_model(n_items=300))
        stack = Stack(repo, logs, StackOptions(ranker_slots=2, initial_rankers=2))
        try:
            probe = Probe(stack, tiny)
            probe.ranker_cases()
            probe.gateway_cases()
            probe.drain_case()
            probe.odd_version_directory()
            probe.retrieval_down_case()
        finally:
            stack.stop()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "cases": len(probe.cases),
        "as_expected": sum(c.ok for c in probe.cases),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "cases": [asdict(c) for c in probe.cases]}, indent=2) + "\n"
    )
    table = _markdown(probe.cases, meta)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
