"""The Dockerfiles, checked without a container engine: structure, pinned bases, non-root user,
COPY sources, the dependency pins they install and the entrypoints they run."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.k8s.k8s_utils import REPO_ROOT, Instruction, parse_dockerfile

DOCKERFILES = {
    "cpu": REPO_ROOT / "docker" / "Dockerfile",
    "gpu": REPO_ROOT / "docker" / "Dockerfile.gpu",
}
# Base images: exact versions only (python:X.Y.Z-..., nvidia/cuda:X.Y.Z-...).
PINNED_BASE = re.compile(
    r"^(python:\d+\.\d+\.\d+-slim-[a-z]+|nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+)$"
)
# The modules the images and the Deployments run (docs/services.md).
SERVICE_MODULES = {
    "serving.ranking": "serving/ranking/__main__.py",
    "serving.retrieval": "serving/retrieval/__main__.py",
    "gateway": "gateway/__main__.py",
}


def _instructions(kind: str) -> list[Instruction]:
    return parse_dockerfile(DOCKERFILES[kind])


def _args(instructions: list[Instruction]) -> dict[str, str]:
    out = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.value:
            name, _, default = ins.value.partition("=")
            out[name] = default
    return out


def _stages(instructions: list[Instruction]) -> list[tuple[str, str]]:
    """(image, stage name) of every FROM, ARGs resolved."""
    args = _args(instructions)
    stages = []
    for ins in instructions:
        if ins.keyword == "FROM":
            image, _, name = ins.value.partition(" AS ")
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image.strip())
            stages.append((image, name.strip()))
    return stages


def _final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last_from = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    return instructions[last_from:]


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_multi_stage_with_pinned_bases(kind: str) -> None:
    stages = _stages(_instructions(kind))
    assert [name for _, name in stages] == ["builder", "runtime"]
    for image, _ in stages:
        assert PINNED_BASE.match(image), f"{kind}: base {image} is not pinned to a version"
    # The venv links to the builder's interpreter: both stages must use the same base.
    assert stages[0][0] == stages[1][0]
    if kind == "gpu":
        assert stages[0][0].startswith("nvidia/cuda:")


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_runtime_runs_as_numeric_non_root_user(kind: str) -> None:
    final = _final_stage(_instructions(kind))
    users = [ins.value for ins in final if ins.keyword == "USER"]
    assert users, f"{kind}: the runtime stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, users[-1]
    assert gid == "" or (gid.isdigit() and int(gid) > 0), users[-1]
    # The same uid the pods run as (runAsUser), created in the image.
    created = " ".join(ins.value for ins in final if ins.keyword == "RUN")
    assert f"--uid {uid}" in created


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_copy_sources_exist_and_are_in_the_build_context(kind: str) -> None:
    instructions = _instructions(kind)
    ignore = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert ignore[0] == "**", ".dockerignore should exclude everything by default"
    copies = [ins for ins in instructions if ins.keyword == "COPY"]
    assert copies
    for ins in copies:
        parts = shlex.split(ins.value)
        if any(p.startswith("--from=") for p in parts):
            continue
        *sources, _dest = [p for p in parts if not p.startswith("--")]
        for source in sources:
            path = REPO_ROOT / source
            assert path.exists(), f"{kind} line {ins.line}: COPY source {source} does not exist"
            top = Path(source).parts[0].rstrip("/")
            assert top in included, f"{kind}: {source} is excluded by .dockerignore"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_entrypoint_runs_python_modules(kind: str) -> None:
    final = _final_stage(_instructions(kind))
    (entrypoint,) = [json.loads(i.value) for i in final if i.keyword == "ENTRYPOINT"]
    (cmd,) = [json.loads(i.value) for i in final if i.keyword == "CMD"]
    assert entrypoint == ["python", "-m"]
    assert cmd == ["serving.ranking"]
    env = " ".join(i.value for i in final if i.keyword == "ENV")
    assert "PYTHONPATH=/app" in env
    assert "PATH=/opt/venv/bin:$PATH" in env


def _dependency_step(kind: str, workdir: Path) -> None:
    """Runs the builder's requirement/constraint preparation (the part before `pip install`)."""
    (run,) = [
        i.value for i in _instructions(kind) if i.keyword == "RUN" and "requirements.txt" in i.value
    ]
    prepare = run.split(" && pip install")[0]
    for name in ("pyproject.toml", "constraints.txt"):
        (workdir / name).write_bytes((REPO_ROOT / name).read_bytes())
    subprocess.run(
        ["bash", "-c", f"set -e -o pipefail; {prepare}"],
        cwd=workdir,
        check=True,
        timeout=30,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def test_cpu_image_installs_pinned_dependencies(tmp_path: Path) -> None:
    _dependency_step("cpu", tmp_path)
    requirements = (tmp_path / "requirements.txt").read_text().split()
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert requirements == project["dependencies"]
    pins = _pins(tmp_path / "constraints.txt")
    for requirement in requirements:
        assert _name(requirement) in pins, f"{requirement} is not pinned in constraints.txt"
    assert pins["torch"].endswith("+cpu")


def test_gpu_image_swaps_in_onnxruntime_gpu(tmp_path: Path) -> None:
    _dependency_step("gpu", tmp_path)
    requirements = [_name(r) for r in (tmp_path / "requirements.txt").read_text().split()]
    assert "onnxruntime-gpu" in requirements and "onnxruntime" not in requirements
    pins = _pins(tmp_path / "constraints-gpu.txt")
    assert "onnxruntime" not in pins
    assert pins["torch"] == "2.13.0", "the CUDA build of the same torch release"
    exact = [r for r in (tmp_path / "requirements.txt").read_text().split() if "==" in r]
    assert "onnxruntime-gpu==1.31.1" in exact
    for name in requirements:
        assert name in pins or name == "onnxruntime-gpu", f"{name} is not pinned"


# Fails until the service modules land on main: the images and Deployments run these modules,
# so this check is expected to be red on a branch that has only the deployment files.
@pytest.mark.parametrize("module", SERVICE_MODULES)
def test_service_entrypoints_start(module: str) -> None:
    """`python -m <module> --help` exits 0 in the image's layout (/app)."""
    assert (REPO_ROOT / SERVICE_MODULES[module]).is_file(), f"{SERVICE_MODULES[module]} is missing"
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
