"""The commands in k8s/README.md point at overlays that exist and select what they say."""

from __future__ import annotations

import re

from tests.k8s.k8s_utils import K8S_DIR, REPO_ROOT, Rendered, pod_claims

README = (K8S_DIR / "README.md").read_text()


def test_readme_paths_are_kustomizations() -> None:
    paths = set(re.findall(r"-k (k8s/[a-z0-9/._-]+)", README))
    paths |= set(re.findall(r"kubectl kustomize (k8s/[a-z0-9/._-]+)", README))
    assert paths
    for path in paths:
        assert (REPO_ROOT / path / "kustomization.yaml").is_file(), path


def test_readme_training_selectors_pick_one_variant(rendered: dict[str, Rendered]) -> None:
    """Each training command selects one Job and every claim its pod mounts, nothing else."""
    commands = re.findall(
        r"kubectl apply -k k8s/overlays/([a-z/]+) -l 'app\.kubernetes\.io/name in \(([a-z0-9,-]+)\)'",
        README,
    )
    picked_jobs = set()
    for overlay, names in commands:
        wanted = set(names.split(","))
        picked = [
            o
            for o in rendered[overlay].objects
            if o["metadata"]["labels"].get("app.kubernetes.io/name") in wanted
        ]
        jobs = [o for o in picked if o["kind"] == "Job"]
        assert len(jobs) == 1, [o["metadata"]["name"] for o in picked]
        (job,) = jobs
        picked_jobs.add(job["metadata"]["name"])
        pod = job["spec"]["template"]["spec"]
        claims = set(pod_claims(pod).values())
        # The model repository belongs to the serving stack, applied before any training run.
        claims.discard("model-repository")
        selected = {(o["kind"], o["metadata"]["name"]) for o in picked} - {
            ("Job", job["metadata"]["name"])
        }
        services = {("Service", pod["subdomain"])} if "subdomain" in pod else set()
        assert selected == {("PersistentVolumeClaim", c) for c in claims} | services, overlay
    assert picked_jobs == {"recsys-prepare", "recsys-train", "recsys-train-multinode"}
