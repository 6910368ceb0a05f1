"""The Dockerfiles, checked without a container engine: stages and targets, pinned bases, non-root
user, build inputs (COPY and bind mounts) in the context, no network or CA bundle in the CPU
build, the requirements each image installs and the entrypoints they run. The images themselves
are built and run by `make images-smoke` (scripts/images_smoke.py)."""

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


def _stage(instructions: list[Instruction], name: str) -> list[Instruction]:
    """The instructions of stage `name` and of the stages it is built FROM, base first."""
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    stages: dict[str, tuple[str, list[Instruction]]] = {}
    for n, begin in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(instructions)
        image, _, stage = instructions[begin].value.partition(" AS ")
        stages[stage.strip()] = (image.strip(), instructions[begin:end])
    image, own = stages[name]
    return (_stage(instructions, image) if image in stages else []) + own


# The stage each image is built from: (Dockerfile, --target).
TARGETS = {
    "serving": ("cpu", "serving"),
    "training": ("cpu", "training"),
    "gpu": ("gpu", "runtime"),
}


def test_cpu_stages_share_one_pinned_base() -> None:
    stages = _stages(_instructions("cpu"))
    names = [name for _, name in stages]
    assert names == [
        "base",
        "deps",
        "deps-train",
        "build-serving",
        "build-training",
        "training",
        "serving",
    ]
    # One external base (the venv links to its python); every other stage builds on an earlier one.
    (external,) = {image for image, _ in stages if image not in names}
    assert PINNED_BASE.match(external), f"base {external} is not pinned to a version"
    # The last stage is what a build without --target gives.
    assert names[-1] == "serving"


def test_gpu_stages_build_from_the_cuda_base() -> None:
    stages = _stages(_instructions("gpu"))
    assert [name for _, name in stages] == ["builder", "runtime"]
    assert stages[0][0] == stages[1][0] and stages[0][0].startswith("nvidia/cuda:")
    assert PINNED_BASE.match(stages[0][0])


@pytest.mark.parametrize("target", TARGETS)
def test_image_runs_as_numeric_non_root_user(target: str) -> None:
    kind, stage = TARGETS[target]
    final = _stage(_instructions(kind), stage)
    users = [ins.value for ins in final if ins.keyword == "USER"]
    assert users, f"{target}: the image sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, users[-1]
    assert gid == "" or (gid.isdigit() and int(gid) > 0), users[-1]
    # The same uid the pods run as (runAsUser), created in the image.
    created = " ".join(ins.value for ins in final if ins.keyword == "RUN")
    assert f"--uid {uid}" in created


def _context_allowlist() -> set[str]:
    ignore = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "**", ".dockerignore should exclude everything by default"
    return {line[1:].rstrip("/") for line in ignore if line.startswith("!")}


def _in_context(source: str, included: set[str]) -> bool:
    parts = Path(source.rstrip("/")).parts
    return any("/".join(parts[: n + 1]) in included for n in range(len(parts)))


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_copy_sources_exist_and_are_in_the_build_context(kind: str) -> None:
    included = _context_allowlist()
    copies = [ins for ins in _instructions(kind) if ins.keyword == "COPY"]
    assert copies
    for ins in copies:
        parts = shlex.split(ins.value)
        if any(p.startswith("--from=") for p in parts):
            continue
        *sources, _dest = [p for p in parts if not p.startswith("--")]
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"{kind} line {ins.line}: {source} does not exist"
            assert _in_context(source, included), f"{kind}: {source} is excluded by .dockerignore"


def test_cpu_build_reads_only_the_bind_mounted_wheelhouse() -> None:
    """No index, no network, nothing of the wheelhouse or a CA bundle copied into a layer."""
    instructions = _instructions("cpu")
    text = "\n".join(ins.value for ins in instructions)
    assert "index-url" not in text and "https://" not in text
    env = " ".join(ins.value for ins in _stage(instructions, "deps") if ins.keyword == "ENV")
    assert "PIP_NO_INDEX=1" in env and "PIP_FIND_LINKS=/wheelhouse" in env
    installs = [ins for ins in instructions if ins.keyword == "RUN" and "pip install" in ins.value]
    assert len(installs) == 4, "the two dependency sets and the package, for each image"
    for ins in installs:
        assert ins.value.startswith("--mount=type=bind,source=wheelhouse,target=/wheelhouse "), ins
        assert "-c constraints.txt" in ins.value
    assert "wheelhouse" in _context_allowlist()
    for ins in instructions:
        if ins.keyword in ("COPY", "ADD"):
            assert "wheelhouse" not in ins.value and "cert" not in ins.value.lower(), ins
    # The images take only the venv from the build stages: no build mount point, no sources.
    for target in ("serving", "training"):
        own = _stage(instructions, target)
        start = max(i for i, ins in enumerate(own) if ins.keyword == "FROM")
        copies = [ins.value for ins in own[start:] if ins.keyword == "COPY"]
        assert copies == [f"--from=build-{target} /opt/venv /opt/venv"], copies


def test_gpu_build_mounts_the_ca_bundle_as_a_secret_only() -> None:
    instructions = _instructions("gpu")
    (download,) = [i for i in instructions if i.keyword == "RUN" and "requirements.txt" in i.value]
    assert download.value.startswith("--mount=type=secret,id=ca-bundle ")
    assert "PIP_CERT=/run/secrets/ca-bundle" in download.value
    for ins in instructions:
        if ins.keyword in ("COPY", "ADD"):
            assert "cert" not in ins.value.lower() and "secret" not in ins.value, ins
    assert "--extra-index-url" not in "\n".join(i.value for i in instructions)


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoint_runs_python_modules_of_the_installed_package(target: str) -> None:
    kind, stage = TARGETS[target]
    final = _stage(_instructions(kind), stage)
    (entrypoint,) = [json.loads(i.value) for i in final if i.keyword == "ENTRYPOINT"]
    (cmd,) = [json.loads(i.value) for i in final if i.keyword == "CMD"]
    assert entrypoint == ["python", "-m"]
    assert cmd[0] == ("training" if target == "training" else "serving.ranking")
    env = " ".join(i.value for i in final if i.keyword == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env
    # The package is installed (pip install .): no source root on the path by hand.
    assert "PYTHONPATH" not in env
    runs = " ".join(i.value for i in _instructions(kind) if i.keyword == "RUN")
    assert "--no-deps ." in runs and "pip check" in runs


@pytest.mark.parametrize("target", ["training", "gpu"])
def test_training_configs_are_where_the_jobs_point(target: str) -> None:
    """The Jobs pass --config=/app/training/configs/<file>: the image links that folder to the
    installed package data, which pyproject.toml ships."""
    kind, stage = TARGETS[target]
    runs = " ".join(i.value for i in _stage(_instructions(kind), stage) if i.keyword == "RUN")
    assert "/app/training/configs" in runs and "test -f /app/training/configs/" in runs
    package_data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "configs/*.toml" in package_data["package-data"]["training"]
    for job in ("k8s/training/job.yaml", "k8s/training/multinode/job.yaml"):
        configs = re.findall(
            r"--config=/app/(training/configs/\S+\.toml)", (REPO_ROOT / job).read_text()
        )
        assert configs, job
        for config in configs:
            assert (REPO_ROOT / config).is_file(), f"{job}: {config} is not in the package"


def _requirements(*extras: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "docker/requirements.py", *extras],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return proc.stdout.split()


def _dependency_step(kind: str, workdir: Path) -> None:
    """Runs the builder's requirement/constraint preparation (the part before `pip install`)."""
    (run,) = [
        i.value for i in _instructions(kind) if i.keyword == "RUN" and "requirements.txt" in i.value
    ]
    prepare = run.split(" && pip install")[0].split(" ", 1)[1]  # without the --mount
    for name in ("pyproject.toml", "constraints.txt", "docker/requirements.py"):
        (workdir / name).parent.mkdir(exist_ok=True)
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


def test_serving_installs_the_base_and_training_the_train_and_distributed_extras() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    serving, training = _requirements(), _requirements("train", "distributed")
    extras = project["optional-dependencies"]
    assert serving == project["dependencies"]
    assert training == serving + extras["train"] + extras["distributed"]
    assert not {"torch", "matplotlib", "onnx", "tqdm", "ray"} & {_name(r) for r in serving}
    assert {"torch", "matplotlib", "ray"} <= {_name(r) for r in training}
    (deps_train,) = [i.value for i in _instructions("cpu") if "requirements-train.txt" in i.value]
    assert "docker/requirements.py train distributed >" in deps_train
    pins = _pins(REPO_ROOT / "constraints.txt")
    for requirement in training:
        assert _name(requirement) in pins, f"{requirement} is not pinned in constraints.txt"
    assert pins["torch"].endswith("+cpu")
    # The build backend that `pip install .` needs in the image comes from the wheelhouse too.
    build_system = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["build-system"]
    for requirement in build_system["requires"]:
        assert _name(requirement) in pins, f"build requirement {requirement} is not pinned"
    wheelhouse = (REPO_ROOT / "scripts" / "wheelhouse.sh").read_text()
    assert "docker/requirements.py train distributed" in wheelhouse
    assert "setuptools wheel" in wheelhouse


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
