"""Run the project's services as local processes on loopback ports and stop them as Kubernetes
would (SIGTERM, drain): used by the demo, the benchmarks and the end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]  # devtools/processes.py -> checkout root


def free_port() -> int:
    """A TCP port that is free on loopback now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
