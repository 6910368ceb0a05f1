"""Run retrieval, the ranker and the gateway on fixed loopback ports until Ctrl-C (`make serve`).

    python -m devtools.serve [--repository=model_repository] [--domains=books,...]
                             [--port-base=8000] [--log-dir=runs/serve/logs]

Ports: the gateway on base (8000), the ranker on base+1, retrieval on base+2, their /metrics on
base+1000 onwards (9000, 9001, 9002), all on 127.0.0.1. The domains default to every
`<domain>-retrieval` model in the repository. On SIGINT or SIGTERM the gateway is stopped first,
then the ranker and retrieval; each drains and exits, and the command exits 0 when all three did.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from grpc_health.v1 import health_pb2

from devtools.processes import ServiceProcess, health_status

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
DRAIN_TIMEOUT_S = 60.0  # the longest a service's drain may take (its grace period is 10 s)


def repository_domains(repository: Path) -> list[str]:
    """The domains that have a retrieval model in the repository (`<domain>-retrieval/`)."""
    return sorted(
        p.name.removesuffix("-retrieval")
        for p in repository.iterdir()
        if p.is_dir() and p.name.endswith("-retrieval") and p.name != "-retrieval"
    )


class Stack:
    """The three services as processes; `stop` ends them in the order a client would notice
    least (the gateway first, then what it calls)."""

    def __init__(self, repository: Path, domains: list[str], port_base: int, logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.processes: list[ServiceProcess] = []
        self.retrieval = self._start(
            "serving.retrieval", [f"--model-repository={repository}"], logs, port_base + 2
        )
        self.ranker = self._start(
            "serving.ranking", [f"--model-repository={repository}"], logs, port_base + 1
        )
        self.gateway = self._start(
            "gateway",
            [
                f"--retrieval-target={self.retrieval.address}",
                f"--ranker-targets={self.ranker.address}",
                f"--domains={','.join(domains)}",
                f"--model-repository={repository}",
            ],
            logs,
            port_base,
        )

    def _start(self, module: str, args: list[str], logs: Path, port: int) -> ServiceProcess:
        name = module.rsplit(".", 1)[-1]
        proc = ServiceProcess(
            module, args, log_path=logs / f"{name}.log", port=port, metrics_port=port + 1000
        )
        self.processes.append(proc)
        logger.info(
            "%s: pid %d, gRPC %s, log %s", module, proc.proc.pid, proc.address, proc.log_path
        )
        return proc

    def exited(self) -> ServiceProcess | None:
        """A service that is no longer running, if any."""
        return next((p for p in self.processes if p.proc.poll() is not None), None)

    def wait_serving(self, stop: threading.Event, timeout: float) -> bool:
        """Wait until every service is SERVING; False if stopped, or one exited or timed out."""
        deadline = time.monotonic() + timeout
        waiting = list(self.processes)
        while waiting and not stop.is_set():
            gone = self.exited()
            if gone is not None:
                logger.error("%s exited with %s; see %s", gone.module, gone.proc.returncode,
                             gone.log_path)  # fmt: skip
                return False
            if time.monotonic() > deadline:
                logger.error("%s not SERVING after %.0f s; see %s", waiting[0].module, timeout,
                             waiting[0].log_path)  # fmt: skip
                return False
            if health_status(waiting[0].address) == SERVING:
                waiting.pop(0)
            else:
                stop.wait(0.2)
        return not waiting

    def stop(self, group_signalled: bool) -> bool:
        """End every service (gateway first) and wait; True when every one exited 0.

        After Ctrl-C the terminal has sent SIGINT to the services too, and a second signal must
        not cut their drain short: a service that no longer answers SERVING is left to finish;
        one that still does (only this process was signalled) gets SIGTERM."""
        ok = True
        for proc in (self.gateway, self.ranker, self.retrieval):
            if group_signalled and proc.proc.poll() is None:
                try:
                    proc.proc.wait(1.0)
                except subprocess.TimeoutExpired:
                    if health_status(proc.address, timeout=0.5) != SERVING:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            proc.proc.wait(DRAIN_TIMEOUT_S)
            code = proc.terminate()
            logger.info("%s exited with %d", proc.module, code)
            ok = ok and code == 0
        return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--domains", help="comma list (default: every <domain>-retrieval model)")
    parser.add_argument("--port-base", type=int, default=8000)
    parser.add_argument("--log-dir", type=Path, default=Path("runs/serve/logs"))
    parser.add_argument("--start-timeout-s", type=float, default=600.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s serve: %(message)s")

    if not args.repository.is_dir():
        sys.stderr.write(f"{args.repository}: no model repository here; run `make train` first\n")
        return 2
    domains = [d.strip() for d in (args.domains or "").split(",") if d.strip()]
    domains = domains or repository_domains(args.repository)
    if not domains:
        sys.stderr.write(
            f"{args.repository}: no <domain>-retrieval model; run `make train` or pass --domains\n"
        )
        return 2

    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("%s received: stopping", signal.Signals(signum).name)
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    stack = Stack(args.repository.resolve(), domains, args.port_base, args.log_dir.resolve())
    failed = not stack.wait_serving(stop, args.start_timeout_s) and not stop.is_set()
    if not failed and not stop.is_set():
        logger.info(
            "SERVING: gateway %s (domains %s), ranker %s, retrieval %s; Ctrl-C stops them",
            stack.gateway.address, ",".join(domains), stack.ranker.address,
            stack.retrieval.address,
        )  # fmt: skip
        while not stop.wait(0.5):
            gone = stack.exited()
            if gone is not None:
                logger.error("%s exited with %s; see %s", gone.module, gone.proc.returncode,
                             gone.log_path)  # fmt: skip
                failed = True
                break
    stopped_cleanly = stack.stop(group_signalled=bool(received) and received[0] == signal.SIGINT)
    return 0 if stopped_cleanly and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
