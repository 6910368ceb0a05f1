"""Run the project's services as local processes on loopback ports and stop them as Kubernetes
would (SIGTERM, drain): used by the demo, the benchmarks and the end-to-end tests."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]  # devtools/processes.py -> checkout root


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A TCP port that is free on loopback now and was not handed out before in this process.

    Tests often reserve a port and bind it seconds later (a ranker slot that starts on demand).
    A port the OS picks with bind(0) lies in the ephemeral range, which outgoing connections
    draw from too, so one of them may take it in between; ports are therefore drawn at random
    below that range, and never twice."""
    low, _ = _ephemeral_range()
    floor = 10000 if low > 12000 else 1024
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randrange(floor, low if low > floor + 1000 else 65535)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port found")


def project_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process that imports this checkout's code."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def health_status(address: str, service: str = "", timeout: float = 1.0) -> int | None:
    """The health status of `service` at `address`, or None if the server does not answer."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return None
        return int(reply.status)


class ServiceProcess:
    """A service started with `python -m <module>`, its output kept in a log file."""

    def __init__(
        self,
        module: str,
        args: list[str],
        *,
        log_path: Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.module = module
        self.port = port if port is not None else free_port()
        self.metrics_port = metrics_port if metrics_port is not None else free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        cmd = [
            sys.executable,
            "-m",
            module,
            "--host=127.0.0.1",
            f"--port={self.port}",
            f"--metrics-port={self.metrics_port}",
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd, env=project_env(env), stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.module} exited with {self.proc.returncode}:\n{self.log()[-4000:]}"
                )
            if health_status(self.address) == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.module} not SERVING after {timeout} s:\n{self.log()[-4000:]}")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit code (SIGKILL if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return int(self.proc.returncode)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()
