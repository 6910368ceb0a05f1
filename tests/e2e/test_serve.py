"""`make serve` and `make serve-*` as a user runs them: the three services on a tiny published
repository, the README's grpcurl command against the gateway, and a stop that leaves no process
behind (Ctrl-C to the whole process group, SIGTERM to make alone)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.processes import health_status
from devtools.tiny_models import TinyModel, make_tiny_model, publish_tiny_model

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
README_GATEWAY = "127.0.0.1:8000"  # the address the README's commands call


def _make(target: str, args: list[str]) -> list[str]:
    """`make <target> ARGS=...` with this test's virtualenv, never re-running the set-up."""
    return [
        "make", "--no-print-directory", f"VENV={VENV}", "-o", f"{VENV}/.installed", target,
        f"ARGS={shlex.join(args)}",
    ]  # fmt: skip


def _port_base() -> int:
    """A base port with base..base+2 and base+1000..base+1002 free on loopback now."""
    for base in range(21000 + os.getpid() % 500 * 10, 40000, 10):
        ports = [base + i for i in (0, 1, 2, 1000, 1001, 1002)]
        try:
            for port in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return True
        time.sleep(0.1)
    return False


def readme_command(*words: str) -> str:
    """The one README command line holding every word, continuation lines joined."""
    text = (REPO_ROOT / "README.md").read_text()
    joined = re.sub(r"\\\n\s*", "", text)
    lines = [ln for ln in joined.splitlines() if all(w in ln for w in words)]
    assert len(lines) == 1, f"expected one README.md command with {words}, got {lines}"
    return lines[0].split("#", 1)[0].strip()


def _run_readme_command(command: str, served: Served) -> subprocess.CompletedProcess[str]:
    assert README_GATEWAY in command
    command = command.replace(".venv/bin/", f"{VENV}/bin/", 1)
    command = command.replace(README_GATEWAY, f"127.0.0.1:{served.base}")
    return subprocess.run(
        command, shell=True, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
    )


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    base: int
    output: Path

    def text(self) -> str:
        return self.output.read_text(errors="replace")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TinyModel]:
    repo = tmp_path_factory.mktemp("repo")
    return repo, publish_tiny_model(repo, make_tiny_model())


@pytest.fixture(scope="module")
def served(
    model: tuple[Path, TinyModel], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    repo, _ = model
    work = tmp_path_factory.mktemp("serve")
    base = _port_base()
    output = work / "make-serve.out"
    args = [f"--repository={repo}", f"--port-base={base}", f"--log-dir={work / 'logs'}"]
    with output.open("wb") as out:
        proc = subprocess.Popen(
            _make("serve", args), cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    served = Served(proc, base, output)
    try:
        deadline = time.monotonic() + 120
        while "SERVING:" not in served.text():
            assert proc.poll() is None, f"make serve exited early:\n{served.text()}"
            assert time.monotonic() < deadline, f"make serve not ready:\n{served.text()}"
            time.sleep(0.2)
        yield served
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_readme_grpcurl_command_answers(served: Served, model: tuple[Path, TinyModel]) -> None:
    command = readme_command("grpcurl", "/Recommend")
    assert command.startswith(".venv/bin/grpcurl "), command
    assert (VENV / "bin" / "grpcurl").is_file(), "the dev extra installs grpcurl into the venv"
    result = _run_readme_command(command, served)
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    _, tiny = model
    # The README's user is not in the tiny model: popular items, from the served repository.
    assert len(reply["items"]) == 10
    assert {item["item_id"] for item in reply["items"]} <= set(tiny.item_ids)
    assert {"model_name": "books-retrieval", "model_version": str(tiny.version)} in reply[
        "model_versions"
    ]


def test_readme_python_example_answers(served: Served, model: tuple[Path, TinyModel]) -> None:
    command = readme_command("python examples/recommend_client.py")
    assert command.startswith(".venv/bin/python "), command
    result = _run_readme_command(command, served)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 10
    _, tiny = model
    assert all(line.split()[3] in tiny.item_ids and "POPULAR" in line for line in lines), lines


def test_the_ranker_and_retrieval_are_on_the_fixed_ports_beside_the_gateway(
    served: Served,
) -> None:
    for offset in (0, 1, 2):
        assert health_status(f"127.0.0.1:{served.base + offset}") == 1  # SERVING


def test_ctrl_c_stops_every_service_and_leaves_no_process(served: Served) -> None:
    os.killpg(served.proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    served.proc.wait(60)
    assert _wait_group_gone(served.proc.pid, 10), "a process of make serve is still running"
    text = served.text()
    for module in ("gateway", "serving.ranking", "serving.retrieval"):
        assert f"{module} exited with 0" in text, text
    # make itself reports the interrupt; the services drained and exited 0 before it.
    assert "SIGINT received" in text


def test_sigterm_to_make_serve_ranking_reaches_the_server(
    model: tuple[Path, TinyModel], tmp_path: Path
) -> None:
    repo, _ = model
    base = _port_base()
    args = [f"--model-repository={repo}", "--host=127.0.0.1", f"--port={base}",
            f"--metrics-port={base + 1000}"]  # fmt: skip
    output = tmp_path / "serve-ranking.out"
    with output.open("wb") as out:
        proc = subprocess.Popen(
            _make("serve-ranking", args), cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while health_status(f"127.0.0.1:{base}") != 1:
            assert proc.poll() is None, output.read_text()
            assert time.monotonic() < deadline, output.read_text()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # make alone, as a supervisor or `kill` would
        proc.wait(60)
        assert _wait_group_gone(proc.pid, 10), "the ranker outlived make"
        assert "Stopped" in output.read_text()
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
