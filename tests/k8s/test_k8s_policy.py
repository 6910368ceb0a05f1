"""Policy checks over the rendered manifests: probes, resources, security, images, ports,
selectors, rollout and drain timing, disruption budgets, autoscaling, GPU scheduling and the
network policy."""

from __future__ import annotations

import importlib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from typing import Any

import pytest

from tests.k8s.k8s_utils import (
    DASHBOARD_FILE,
    REPO_ROOT,
    SERVING_OVERLAYS,
    TRAINING_OVERLAYS,
    Rendered,
    env_from_configmaps,
    iter_containers,
    pod_claims,
    pod_spec,
)

# Deployment name -> (Service name, env prefix, gRPC port, metrics port), as in docs/settings.md.
SERVICES = {
    "ranker": ("ranker-headless", "RANKING_", 8001, 9001),
    "retrieval": ("retrieval", "RETRIEVAL_", 8002, 9002),
    "gateway": ("gateway", "GATEWAY_", 8000, 9000),
}
MODEL_READERS = ("ranker", "retrieval")
ALL_OVERLAYS = SERVING_OVERLAYS + TRAINING_OVERLAYS
VERSION_TAG = re.compile(r"^\d+\.\d+\.\d+([-.+][0-9A-Za-z.-]+)?$")
NAME_LABEL = "app.kubernetes.io/name"


def _workloads(result: Rendered) -> list[dict[str, Any]]:
    return [o for o in result.objects if pod_spec(o) is not None]


def _container_port(container: Mapping[str, Any], name: str) -> int:
    for port in container.get("ports", []):
        if port.get("name") == name:
            value: int = port["containerPort"]
            return value
    raise AssertionError(f"container {container['name']} has no port named {name!r}")


def _matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Label selector semantics (matchLabels and matchExpressions)."""
    match_labels = selector.get("matchLabels", {})
    if any(labels.get(k) != v for k, v in match_labels.items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return bool(match_labels or selector.get("matchExpressions"))


def _pod_labels(deployment: Mapping[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def _quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a float (cores or bytes)."""
    text = str(value)
    units = {
        "m": 1e-3,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
    }
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


@pytest.fixture(params=SERVING_OVERLAYS)
def serving(request: pytest.FixtureRequest, rendered: dict[str, Rendered]) -> Rendered:
    result: Rendered = rendered[request.param]
    return result


@pytest.fixture(params=ALL_OVERLAYS)
def any_overlay(request: pytest.FixtureRequest, rendered: dict[str, Rendered]) -> Rendered:
    result: Rendered = rendered[request.param]
    return result


# --- every workload -------------------------------------------------------------------------


def test_every_container_has_requests_and_limits(any_overlay: Rendered) -> None:
    for obj in _workloads(any_overlay):
        for c in iter_containers(obj):
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in res.get(kind, {}), (
                        f"{any_overlay.overlay} {obj['metadata']['name']}/{c['name']}: no {kind}.{resource}"
                    )
            for resource, request in res["requests"].items():
                limit = res["limits"].get(resource)
                assert limit is not None and _quantity(limit) >= _quantity(request), (
                    f"{obj['metadata']['name']}/{c['name']}: {resource} limit {limit} < request {request}"
                )


def test_every_container_is_locked_down(any_overlay: Rendered) -> None:
    for obj in _workloads(any_overlay):
        spec = pod_spec(obj)
        assert spec is not None
        name = obj["metadata"]["name"]
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, f"{name}: pod runAsNonRoot"
        assert pod_sc.get("runAsUser", 0) > 0, f"{name}: pod must run as a non-zero uid"
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, f"{name}: needs no API token"
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), f"{name}: {key}"
        for c in iter_containers(obj):
            sc = c.get("securityContext", {})
            where = f"{any_overlay.overlay} {name}/{c['name']}"
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert not sc.get("privileged"), where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            # A read-only root filesystem needs a writable /tmp.
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp, f"{where}: no writable /tmp"
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            assert "emptyDir" in volumes[tmp[0]["name"]], where


def test_images_are_pinned(any_overlay: Rendered) -> None:
    tags = set()
    for obj in _workloads(any_overlay):
        for c in iter_containers(obj):
            image: str = c["image"]
            assert "@" not in image or re.search(r"@sha256:[0-9a-f]{64}$", image), image
            repo, sep, tag = image.rpartition(":")
            assert sep and "/" not in tag, f"{image}: no tag"
            assert "/" in repo, f"{image}: not a registry path"
            assert tag != "latest" and VERSION_TAG.match(tag), f"{image}: tag is not a version"
            tags.add(tag)
    # One release: the images built from this tree (make images) carry the package version.
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert tags == {version}, f"{any_overlay.overlay}: image tags {tags}, package {version}"


def test_objects_share_one_namespace_and_the_stack_label(any_overlay: Rendered) -> None:
    namespaces = {
        o["metadata"].get("namespace") for o in any_overlay.objects if o["kind"] != "Namespace"
    }
    assert namespaces == {"recsys"}, namespaces
    for o in any_overlay.objects:
        if o["kind"] == "Namespace":
            continue
        assert o["metadata"]["labels"].get("app.kubernetes.io/part-of") == "recsys", o["metadata"]
        if pod_spec(o) is not None:
            labels = o["spec"]["template"]["metadata"]["labels"]
            assert labels.get("app.kubernetes.io/part-of") == "recsys"


# --- serving stack --------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVICES)
def test_grpc_probes_on_the_grpc_port(serving: Rendered, name: str) -> None:
    deployment = serving.get("Deployment", name)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    grpc_port = _container_port(container, "grpc")
    assert grpc_port == SERVICES[name][2]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, f"{name}: {probe}"
        assert container[probe]["grpc"].get("service", "") == "", f"{name}: overall health"
    startup = container["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    # Model load and warm-up: the rankers and retrieval get minutes, not seconds.
    assert budget >= (240 if name in MODEL_READERS else 60), f"{name}: startup budget {budget} s"
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 20, name
    assert _container_port(container, "metrics") == SERVICES[name][3]


@pytest.mark.parametrize("name", SERVICES)
def test_config_flows_from_the_generated_configmap(serving: Rendered, name: str) -> None:
    deployment = serving.get("Deployment", name)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    refs = [s["configMapRef"]["name"] for s in container["envFrom"]]
    assert len(refs) == 1 and re.fullmatch(rf"{name}-config-[a-z0-9]{{10}}", refs[0]), refs
    env = env_from_configmaps(serving, container)
    prefix, grpc_port, metrics_port = SERVICES[name][1:]
    assert all(key.startswith(prefix) for key in env), sorted(env)
    assert int(env[f"{prefix}PORT"]) == grpc_port == _container_port(container, "grpc")
    assert int(env[f"{prefix}METRICS_PORT"]) == metrics_port
    float(env[f"{prefix}GRACE_PERIOD_S"])
    if name in MODEL_READERS:
        assert env[f"{prefix}MODEL_REPOSITORY"] == "/models"


@pytest.mark.parametrize("name", SERVICES)
def test_rollout_never_drops_capacity(serving: Rendered, name: str) -> None:
    deployment = serving.get("Deployment", name)
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert strategy["rollingUpdate"]["maxSurge"] not in (0, "0%")
    assert _matches(deployment["spec"]["selector"], _pod_labels(deployment))
    # The HPA owns the replica count; a fixed one here would reset it on every apply.
    assert "replicas" not in deployment["spec"], name


@pytest.mark.parametrize("name", SERVICES)
def test_termination_grace_covers_prestop_and_drain(serving: Rendered, name: str) -> None:
    deployment = serving.get("Deployment", name)
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    pre_stop = container["lifecycle"]["preStop"]
    sleep_s = pre_stop["sleep"]["seconds"]
    assert sleep_s >= 3, "endpoints need a few seconds to drop the pod before it drains"
    env = env_from_configmaps(serving, container)
    prefix = SERVICES[name][1]
    # SIGTERM -> NOT_SERVING, SHUTDOWN_DELAY_S still serving (default 0), then the drain.
    drain_s = float(env.get(f"{prefix}SHUTDOWN_DELAY_S", 0)) + float(env[f"{prefix}GRACE_PERIOD_S"])
    assert spec["terminationGracePeriodSeconds"] > sleep_s + drain_s, (
        f"{name}: grace {spec['terminationGracePeriodSeconds']} <= {sleep_s} + {drain_s}"
    )


@pytest.mark.parametrize("name", SERVICES)
def test_service_ports_and_selector(serving: Rendered, name: str) -> None:
    service_name, _, grpc_port, metrics_port = SERVICES[name]
    service = serving.get("Service", service_name)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {"grpc", "metrics"}
    assert ports["grpc"]["port"] == grpc_port and ports["grpc"]["targetPort"] == "grpc"
    assert ports["metrics"]["port"] == metrics_port and ports["metrics"]["targetPort"] == "metrics"
    selected = [
        d["metadata"]["name"]
        for d in serving.of_kind("Deployment")
        if _matches({"matchLabels": service["spec"]["selector"]}, _pod_labels(d))
    ]
    assert selected == [name], f"{service_name} selects {selected}"
    if name == "ranker":
        assert service["spec"]["clusterIP"] == "None", "the gateway balances over ranker pods"


def test_gateway_targets_resolve_to_rendered_services(serving: Rendered) -> None:
    gateway = serving.get("Deployment", "gateway")
    env = env_from_configmaps(serving, gateway["spec"]["template"]["spec"]["containers"][0])
    for key, service_name in (
        ("GATEWAY_RANKER_TARGETS", "ranker-headless"),
        ("GATEWAY_RETRIEVAL_TARGET", "retrieval"),
    ):
        for target in env[key].split(","):
            m = re.fullmatch(
                r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", target
            )
            assert m, f"{key}={target}"
            service = serving.get("Service", m.group(1))
            assert m.group(1) == service_name
            assert m.group(2) == service["metadata"]["namespace"]
            assert int(m.group(3)) in [p["port"] for p in service["spec"]["ports"]]


@pytest.mark.parametrize("name", SERVICES)
def test_disruption_budget_and_autoscaler(serving: Rendered, name: str) -> None:
    deployment = serving.get("Deployment", name)
    pdbs = [
        p
        for p in serving.of_kind("PodDisruptionBudget")
        if _matches(p["spec"]["selector"], _pod_labels(deployment))
    ]
    assert len(pdbs) == 1, f"{name}: {len(pdbs)} PodDisruptionBudgets"
    hpas = [
        h
        for h in serving.of_kind("HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]
        == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    ]
    assert len(hpas) == 1, f"{name}: {len(hpas)} HorizontalPodAutoscalers"
    hpa = hpas[0]["spec"]
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    # A voluntary disruption must leave at least one pod serving at the autoscaler's floor.
    pdb = pdbs[0]["spec"]
    if "maxUnavailable" in pdb:
        assert int(pdb["maxUnavailable"]) < hpa["minReplicas"]
    else:
        assert 1 <= int(pdb["minAvailable"]) < hpa["minReplicas"]


@pytest.mark.parametrize("name", MODEL_READERS)
def test_model_repository_is_read_only_for_readers(serving: Rendered, name: str) -> None:
    spec = serving.get("Deployment", name)["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/models"]
    assert mount["readOnly"] is True
    volume = {v["name"]: v for v in spec["volumes"]}[mount["name"]]
    claim = volume["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    pvc = serving.get("PersistentVolumeClaim", claim["claimName"])
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_service_monitors_scrape_each_service(serving: Rendered) -> None:
    monitors = serving.of_kind("ServiceMonitor")
    scraped = set()
    for monitor in monitors:
        services = [
            s
            for s in serving.of_kind("Service")
            if _matches(monitor["spec"]["selector"], s["metadata"]["labels"])
        ]
        assert len(services) == 1, monitor["metadata"]["name"]
        port_names = {p["name"] for p in services[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] == "metrics" and endpoint["port"] in port_names
        assert monitor["spec"]["jobLabel"] in services[0]["metadata"]["labels"]
        scraped.add(services[0]["metadata"]["name"])
    assert scraped == {s[0] for s in SERVICES.values()}


# --- network policy -------------------------------------------------------------------------


def _allowed_ports(
    rendered_: Rendered,
    target: Mapping[str, Any],
    peer_labels: Mapping[str, str],
    peer_namespace: Mapping[str, str],
) -> set[int] | None:
    """The target pod's ports that the peer may reach (None: not isolated, everything)."""
    labels = _pod_labels(target)
    namespace = target["metadata"]["namespace"]
    (container,) = target["spec"]["template"]["spec"]["containers"]
    policies = [
        p
        for p in rendered_.of_kind("NetworkPolicy")
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and (not p["spec"]["podSelector"] or _matches(p["spec"]["podSelector"], labels))
    ]
    if not policies:
        return None
    allowed: set[int] = set()
    all_ports = {p["containerPort"] for p in container["ports"]}
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            if peers is None:
                admitted = True
            else:
                admitted = False
                for peer in peers:
                    ns_sel = peer.get("namespaceSelector")
                    pod_sel = peer.get("podSelector")
                    if ns_sel is None:
                        ns_ok = peer_namespace.get("kubernetes.io/metadata.name") == namespace
                    else:
                        ns_ok = ns_sel == {} or _matches(ns_sel, peer_namespace)
                    pod_ok = pod_sel is None or pod_sel == {} or _matches(pod_sel, peer_labels)
                    admitted = admitted or (ns_ok and pod_ok and "ipBlock" not in peer)
            if not admitted:
                continue
            if not rule.get("ports"):
                allowed |= all_ports
            for port in rule.get("ports", []):
                value = port["port"]
                allowed.add(value if isinstance(value, int) else _container_port(container, value))
    return allowed


@pytest.mark.parametrize("name", MODEL_READERS)
def test_only_the_gateway_reaches_rankers_and_retrieval(serving: Rendered, name: str) -> None:
    target = serving.get("Deployment", name)
    _, _, grpc_port, metrics_port = SERVICES[name]
    own_ns = {"kubernetes.io/metadata.name": target["metadata"]["namespace"]}
    gateway = _pod_labels(serving.get("Deployment", "gateway"))
    other = _pod_labels(serving.get("Deployment", "retrieval" if name == "ranker" else "ranker"))
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    assert _allowed_ports(serving, target, gateway, own_ns) == {grpc_port}
    assert _allowed_ports(serving, target, prometheus, monitoring) == {metrics_port}
    # Everyone else: the other backend, a training pod, any pod elsewhere, a gateway-labelled
    # pod in another namespace, Prometheus-labelled pods outside the monitoring namespace.
    for labels, ns in (
        (other, own_ns),
        ({NAME_LABEL: "recsys-train"}, own_ns),
        ({NAME_LABEL: "debug"}, {"kubernetes.io/metadata.name": "default"}),
        (gateway, {"kubernetes.io/metadata.name": "default"}),
        (prometheus, own_ns),
    ):
        assert _allowed_ports(serving, target, labels, ns) == set(), (labels, ns)


# --- CPU and GPU ----------------------------------------------------------------------------


def _gpu_limit(container: Mapping[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _tolerates_gpu_taint(spec: Mapping[str, Any]) -> bool:
    return any(
        t.get("key") == "nvidia.com/gpu"
        and t.get("effect") in ("NoSchedule", None)
        and t.get("operator") in ("Exists", "Equal")
        for t in spec.get("tolerations", [])
    )


def test_gpu_rankers_request_a_gpu_and_tolerate_the_taint(rendered: dict[str, Rendered]) -> None:
    gpu = rendered["gpu"]
    spec = gpu.get("Deployment", "ranker")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert _gpu_limit(container) == 1
    assert container["resources"]["requests"].get("nvidia.com/gpu") in (None, 1)
    assert _tolerates_gpu_taint(spec)
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert container["image"].split(":")[0].endswith("-gpu"), container["image"]
    assert env_from_configmaps(gpu, container)["RANKING_PROVIDER"] == "cuda"
    # Only the rankers use GPUs; retrieval and the gateway stay on CPU nodes and the CPU image.
    for name in ("retrieval", "gateway"):
        other = gpu.get("Deployment", name)["spec"]["template"]["spec"]
        assert _gpu_limit(other["containers"][0]) == 0 and not other.get("tolerations")
        assert not other["containers"][0]["image"].split(":")[0].endswith("-gpu")


def test_cpu_overlay_uses_no_gpu(rendered: dict[str, Rendered]) -> None:
    for overlay in ("cpu", "cpu/training"):
        for obj in _workloads(rendered[overlay]):
            spec = pod_spec(obj)
            assert spec is not None and not _tolerates_gpu_taint(spec)
            for c in iter_containers(obj):
                assert _gpu_limit(c) == 0 and not c["image"].split(":")[0].endswith("-gpu")
    (ranker,) = rendered["cpu"].get("Deployment", "ranker")["spec"]["template"]["spec"][
        "containers"
    ]
    assert env_from_configmaps(rendered["cpu"], ranker)["RANKING_PROVIDER"] == "cpu"


def test_gpu_overlay_changes_only_the_ranker(rendered: dict[str, Rendered]) -> None:
    """The GPU overlay holds deltas: everything but the ranker (and its config/HPA) is identical."""
    cpu = {(o["kind"], o["metadata"]["name"]): o for o in rendered["cpu"].objects}
    gpu = {(o["kind"], o["metadata"]["name"]): o for o in rendered["gpu"].objects}
    ranker_keys = {k for k in gpu if k[1] == "ranker" or k[1].startswith("ranker-config")}
    ranker_keys |= {k for k in cpu if k[1].startswith("ranker-config")}
    same = set(cpu) - ranker_keys
    assert same == set(gpu) - ranker_keys
    for key in same:
        assert cpu[key] == gpu[key], key


# --- training -------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", TRAINING_OVERLAYS)
def test_training_jobs_publish_into_the_model_repository(
    rendered: dict[str, Rendered], overlay: str
) -> None:
    result = rendered[overlay]
    jobs = {
        j["metadata"]["name"]: j
        for j in result.of_kind("Job")
        if j["metadata"]["labels"]["app.kubernetes.io/component"] == "training"
    }
    assert set(jobs) == {"recsys-train", "recsys-train-multinode"}
    for job in jobs.values():
        spec = job["spec"]["template"]["spec"]
        assert spec["restartPolicy"] == "Never"
        (container,) = spec["containers"]
        argv = container.get("command", []) + container["args"]
        i = argv.index("training")
        assert argv[i - 1] == "-m" or "command" not in container
        assert argv[i + 1] == "train"
        flags = dict(a.split("=", 1) for a in argv[i + 2 :])
        assert flags["--repository"] == "/models"
        assert flags["--config"].startswith("/app/training/configs/")
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert not mounts["/models"].get("readOnly"), "training writes new versions"
        assert mounts["/data"]["readOnly"] is True
        assert mounts["/prepared"]["readOnly"] is True, "what recsys-prepare wrote, read-only"
        assert pod_claims(spec)[mounts["/prepared"]["name"]] == "prepared-data"
        assert flags["--run-dir"].startswith("/tmp/") and "/tmp" in mounts
        if overlay.startswith("gpu"):
            assert _gpu_limit(container) == 1 and _tolerates_gpu_taint(spec)
        else:
            assert _gpu_limit(container) == 0


@pytest.mark.parametrize("overlay", TRAINING_OVERLAYS)
def test_data_preparation_job_writes_what_training_reads(
    rendered: dict[str, Rendered], overlay: str
) -> None:
    result = rendered[overlay]
    job = result.get("Job", "recsys-prepare")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    argv = container["args"]
    assert argv[:2] == ["training", "prepare"]
    flags = dict(a.split("=", 1) for a in argv[2:])
    assert flags["--engine"] == "ray" and "--address" not in flags
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    claims = pod_claims(pod)
    assert flags["--dataset"].startswith("/data/") and mounts["/data"]["readOnly"] is True
    assert claims[mounts["/data"]["name"]] == "training-data"
    assert flags["--out"].startswith("/prepared/") and not mounts["/prepared"].get("readOnly")
    assert claims[mounts["/prepared"]["name"]] == "prepared-data"
    pvc = result.get("PersistentVolumeClaim", "prepared-data")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "written here, read on other nodes"
    # Ray's local instance: as many CPUs as the limit, the object store inside a memory-backed
    # /dev/shm that holds it, both within the container's memory limit.
    limits = container["resources"]["limits"]
    assert int(flags["--num-cpus"]) == _quantity(limits["cpu"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
    store = int(flags["--object-store-mib"]) * 2**20
    assert shm["medium"] == "Memory" and store < _quantity(shm["sizeLimit"])
    assert _quantity(shm["sizeLimit"]) < _quantity(limits["memory"])
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "Ray's session directory"
    assert _gpu_limit(container) == 0 and "nodeSelector" not in pod, "no GPU for the data step"


@pytest.mark.parametrize("overlay", TRAINING_OVERLAYS)
def test_multinode_training_wiring(rendered: dict[str, Rendered], overlay: str) -> None:
    result = rendered[overlay]
    job = result.get("Job", "recsys-train-multinode")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    service = result.get("Service", pod["subdomain"])
    assert service["spec"]["clusterIP"] == "None"
    assert _matches(
        {"matchLabels": service["spec"]["selector"]}, spec["template"]["metadata"]["labels"]
    )
    (container,) = pod["containers"]
    assert container["command"] == ["torchrun"]
    args = container["args"]
    flags = dict(a.split("=", 1) for a in args[: args.index("-m")])
    assert int(flags["--nnodes"]) == spec["completions"]
    assert flags["--node-rank"] == "$(NODE_RANK)"
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    # Index 0's stable DNS name: <job name>-0.<subdomain>.
    assert flags["--master-addr"] == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    rendezvous = int(flags["--master-port"])
    assert rendezvous == _container_port(container, "rendezvous")
    assert rendezvous in [p["port"] for p in service["spec"]["ports"]]


def test_grafana_dashboard_ships_as_a_sidecar_configmap(serving: Rendered) -> None:
    configmap = serving.get("ConfigMap", "recsys-grafana-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    (name,) = configmap["data"]
    assert json.loads(configmap["data"][name]) == json.loads(DASHBOARD_FILE.read_text())


# Settings classes of the services that exist in this tree; retrieval and the gateway join this
# list when their modules land ("serving.retrieval.config:...", "gateway.config:...").
SETTINGS_CLASSES = {
    "ranker": "serving.ranking.config:RankingSettings",
    "retrieval": "serving.retrieval.config:RetrievalSettings",
    "gateway": "gateway.config:GatewaySettings",
}


@pytest.mark.parametrize("name", SETTINGS_CLASSES)
def test_configmap_keys_are_real_settings(
    serving: Rendered, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every generated env var names a field of the service's Settings (the kit ignores unknown
    ones silently) and the values pass its validation."""
    module_name, _, class_name = SETTINGS_CLASSES[name].partition(":")
    settings_cls = getattr(importlib.import_module(module_name), class_name)
    (container,) = serving.get("Deployment", name)["spec"]["template"]["spec"]["containers"]
    env = env_from_configmaps(serving, container)
    prefix = SERVICES[name][1]
    unknown = {k for k in env if k.removeprefix(prefix).lower() not in settings_cls.model_fields}
    assert not unknown, f"{name}: not settings of {class_name}: {sorted(unknown)}"
    for key in list(os.environ):
        if key.startswith(prefix):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = settings_cls()
    assert settings.port == SERVICES[name][2]
    assert settings.metrics_port == SERVICES[name][3]
