"""The commands in k8s/README.md point at overlays that exist and select what they say."""

from __future__ import annotations

import re

from tests.k8s.k8s_utils import K8S_DIR, REPO_ROOT, Rendered

README = (K8S_DIR / "README.md").read_text()


def test_readme_paths_are_kustomizations() -> None:
    paths = set(re.findall(r"-k (k8s/[a-z0-9/._-]+)", README))
    paths |= set(re.findall(r"kubectl kustomize (k8s/[a-z0-9/._-]+)", README))
    assert paths
    for path in paths:
        assert (REPO_ROOT / path / "kustomization.yaml").is_file(), path


def test_readme_training_selectors_pick_one_variant(rendered: dict[str, Rendered]) -> None:
    commands = re.findall(
        r"kubectl apply -k k8s/overlays/([a-z/]+) -l 'app\.kubernetes\.io/name in \(([a-z0-9,-]+)\)'",
        README,
    )
    assert {names.split(",")[1] for _, names in commands} == {
        "recsys-train",
        "recsys-train-multinode",
    }
    for overlay, names in commands:
        wanted = set(names.split(","))
        picked = [
            (o["kind"], o["metadata"]["name"])
            for o in rendered[overlay].objects
            if o["metadata"]["labels"].get("app.kubernetes.io/name") in wanted
        ]
        kinds = sorted(kind for kind, _ in picked)
        assert ("PersistentVolumeClaim", "training-data") in picked
        jobs = [name for kind, name in picked if kind == "Job"]
        assert len(jobs) == 1 and jobs[0] in wanted, picked
        if jobs[0] == "recsys-train-multinode":
            assert kinds == ["Job", "PersistentVolumeClaim", "Service"]
        else:
            assert kinds == ["Job", "PersistentVolumeClaim"]
