"""The serving dependencies alone run every service: a fresh venv with only the project's base
requirements (what the serving image installs) starts the ranker, retrieval and the gateway, and
holds neither torch nor matplotlib."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.k8s.k8s_utils import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SERVICES = ["serving.ranking", "serving.retrieval", "gateway"]
TRAINING_ONLY = ["torch", "matplotlib", "tqdm", "onnx", "ray"]
WHEELHOUSE = REPO_ROOT / "wheelhouse"


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    # The repository on the path as `python -m` from its root puts it; nothing else of this venv.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("serving-venv")
    created = _run([sys.executable, "-m", "venv", str(venv)], REPO_ROOT, 120)
    assert created.returncode == 0, created.stderr
    python = venv / "bin" / "python"
    requirements = venv / "requirements.txt"
    listed = _run([str(python), "docker/requirements.py"], REPO_ROOT, 30)
    assert listed.returncode == 0, listed.stderr
    requirements.write_text(listed.stdout)
    # The images' wheelhouse where `make images` made one (no network), else the configured index.
    source = ["--no-index", f"--find-links={WHEELHOUSE}"] if WHEELHOUSE.is_dir() else []
    installed = _run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *source,
            "-c",
            "constraints.txt",
            "-r",
            str(requirements),
        ],
        REPO_ROOT,
        540,
    )
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    return python


def test_base_requirements_leave_out_the_training_stack(serving_venv: Path) -> None:
    probe = _run(
        [
            str(serving_venv),
            "-c",
            "import importlib.util, sys; print(*[m for m in sys.argv[1:] if importlib.util.find_spec(m)])",
            *TRAINING_ONLY,
            "grpc",
            "onnxruntime",
            "faiss",
        ],
        REPO_ROOT,
        60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["grpc", "onnxruntime", "faiss"]


@pytest.mark.parametrize("module", SERVICES)
def test_service_entry_point_runs_without_the_training_stack(
    serving_venv: Path, module: str
) -> None:
    """`python -m <service> --help` exits 0, and importing the whole server loads no torch."""
    helped = _run([str(serving_venv), "-m", module, "--help"], REPO_ROOT, 60)
    assert helped.returncode == 0, helped.stdout + helped.stderr
    assert "--port" in helped.stdout
    server = f"{module}.server"
    loaded = _run(
        [
            str(serving_venv),
            "-c",
            f"import sys, {server}, {module}.__main__; "
            "print(*sorted({m.split('.')[0] for m in sys.modules}))",
        ],
        REPO_ROOT,
        60,
    )
    assert loaded.returncode == 0, loaded.stderr
    top_level = set(loaded.stdout.split())
    assert {"grpc", "recsys"} <= top_level
    assert not top_level & set(TRAINING_ONLY)
