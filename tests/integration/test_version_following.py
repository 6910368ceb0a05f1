"""The ranker and retrieval follow the repository with one follower, and so behave alike: the
newest version deleted, a failed version retried (SIGHUP, and with backoff on later polls), bad
versions skipped and counted at start, half-copied versions waited for, non-finite models
refused, and the metric series of unloaded versions removed."""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from devtools.processes import ServiceProcess
from devtools.tiny_models import TinyModel, make_tiny_model, publish_tiny_model
from recsys.repository import READY_FILE, sha256_file, version_dir
from recsys.v1 import ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from tests.integration.test_ranking_server import Ranker, rank_request, sample
from tests.integration.test_retrieval_service import Retrieval

pytestmark = pytest.mark.integration


class Both:
    """An in-process ranker and retrieval service over one repository and one domain."""

    def __init__(self, repo: Path, domain: str) -> None:
        self.repo = repo
        self.domain = domain
        self.ranker_name, self.retrieval_name = f"{domain}-ranker", f"{domain}-retrieval"
        self.ranker = Ranker(repo, self.ranker_name)
        self.retrieval = Retrieval(repo)

    def served(self) -> tuple[str, str]:
        """The version each service answers with now."""
        ranked = self.ranker.rank.Rank(rank_request(self.ranker_name, "u1", ["i1"]), timeout=10)
        retrieved = self.retrieval.retrieve(user_id="u1", domain=self.domain)
        return ranked.model_version, retrieved.model.model_version

    def poll(self) -> None:
        """One scan by each, as the pollers do (failed versions wait for their backoff)."""
        self.ranker.reload()
        self.retrieval.server.run(self.retrieval.manager.follower.reload())

    def sighup(self) -> None:
        """What SIGHUP does in each service: a scan that retries failed versions."""
        self.ranker.reload(retry_failed=True)
        self.retrieval.manager.refresh()

    def failures(self) -> tuple[float, float]:
        return (
            sample("recsys_ranker_model_load_failures_total", model=self.ranker_name),
            sample("recsys_retrieval_model_load_failures_total", model=self.retrieval_name),
        )

    def close(self) -> None:
        self.retrieval.close()
        self.ranker.close()


def _has_series(name: str, **labels: str) -> bool:
    return REGISTRY.get_sample_value(name, labels) is not None


def _publish(repo: Path, domain: str, seed: int = 0) -> TinyModel:
    return publish_tiny_model(repo, make_tiny_model(domain, seed=seed))


def _break(repo: Path, domain: str, version: int) -> dict[Path, bytes]:
    """Overwrite model.onnx of both models of a version (its SHA-256 no longer matches)."""
    saved = {}
    for model in (f"{domain}-ranker", f"{domain}-retrieval"):
        path = version_dir(repo, model, version) / "model.onnx"
        saved[path] = path.read_bytes()
        path.write_bytes(b"truncated")
    return saved


@pytest.fixture()
def both(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Both]:
    domain = request.node.name.split("[")[0][-12:].replace("_", "")
    _publish(tmp_path, domain, seed=1)
    _publish(tmp_path, domain, seed=2)
    pair = Both(tmp_path, domain)
    yield pair
    pair.close()


def test_both_fall_back_to_the_previous_version_when_the_newest_is_deleted(both: Both) -> None:
    assert both.served() == ("2", "2")
    loaded = {
        "ranker": ("recsys_ranker_model_loaded", {"model": both.ranker_name, "provider": "cpu"}),
        "retrieval": (
            "recsys_retrieval_model_loaded",
            {"model": both.retrieval_name, "index": "flat"},
        ),
    }
    published = {
        "ranker": ("recsys_ranker_model_published_timestamp_seconds", {"model": both.ranker_name}),
        "retrieval": (
            "recsys_retrieval_model_published_timestamp_seconds",
            {"model": both.retrieval_name},
        ),
    }
    for name, labels in loaded.values():
        assert sample(name, version="2", **labels) == 1
    created = datetime(2026, 1, 1, tzinfo=UTC).timestamp()  # the tiny models' created_at
    for name, labels in published.values():
        assert sample(name, version="2", **labels) == created
    for model in (both.ranker_name, both.retrieval_name):
        shutil.rmtree(version_dir(both.repo, model, 2))
    both.poll()
    assert both.served() == ("1", "1")
    assert both.ranker.manager.versions(both.ranker_name) == [1]
    assert both.retrieval.manager.follower.versions(both.retrieval_name) == [1]
    # The unloaded version's series are gone from /metrics, the served one's are there.
    deadline = time.monotonic() + 10
    while _has_series(loaded["ranker"][0], version="2", **loaded["ranker"][1]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for name, labels in loaded.values():
        assert not _has_series(name, version="2", **labels)
        assert sample(name, version="1", **labels) == 1
    for name, labels in published.values():
        assert not _has_series(name, version="2", **labels)
        assert sample(name, version="1", **labels) == created


def test_both_retry_a_failed_version_with_backoff_on_later_polls(both: Both) -> None:
    both.ranker.manager.follower.retry_base_s = 0.5
    both.retrieval.manager.follower.retry_base_s = 0.5
    before = both.failures()
    v3 = _publish(both.repo, both.domain, seed=3).version
    saved = _break(both.repo, both.domain, v3)
    both.poll()
    assert both.served() == ("2", "2")
    assert [a - b for a, b in zip(both.failures(), before, strict=True)] == [1, 1]
    for path, data in saved.items():
        path.write_bytes(data)
    both.poll()  # within the backoff: not retried yet
    assert both.served() == ("2", "2")
    time.sleep(0.6)
    both.poll()
    assert both.served() == (str(v3), str(v3))
    assert [a - b for a, b in zip(both.failures(), before, strict=True)] == [1, 1]


def test_both_load_a_version_copied_file_by_file_only_when_complete(both: Both) -> None:
    source = _publish(both.repo, both.domain, seed=3).version
    target = source + 1
    before = both.failures()
    for model in (both.ranker_name, both.retrieval_name):
        # READY markers name the version: write them as a copy of version `target` would have.
        src, dst = version_dir(both.repo, model, source), version_dir(both.repo, model, target)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(READY_FILE))
        shutil.rmtree(src)
    # Everything copied but the markers: not a version yet, and no failure either.
    both.poll()
    assert both.served() == ("2", "2") and both.failures() == before
    # The marker comes too early (a parallel copy): one file is still missing.
    missing = version_dir(both.repo, both.retrieval_name, target) / "seen.npz"
    held = missing.read_bytes()
    missing.unlink()
    for model in (both.ranker_name, both.retrieval_name):
        (version_dir(both.repo, model, target) / READY_FILE).write_text(
            json.dumps({"version": target, "models": [both.ranker_name, both.retrieval_name]})
        )
    both.ranker.manager.follower.retry_base_s = 0.3
    both.retrieval.manager.follower.retry_base_s = 0.3
    both.poll()
    assert both.served() == (str(target), "2")  # the ranker's half is complete
    assert both.failures()[1] - before[1] == 1
    missing.write_bytes(held)
    time.sleep(0.4)
    both.poll()
    assert both.served() == (str(target), str(target))


def test_both_refuse_versions_with_non_finite_outputs(both: Both) -> None:
    before = both.failures()
    tiny = make_tiny_model(both.domain, seed=3)
    tiny.item_emb[-1] = np.nan  # one item: NaN scores for its pairs, a NaN embedding row
    publish_tiny_model(both.repo, tiny)
    both.sighup()
    assert both.served() == ("2", "2")
    assert [a - b for a, b in zip(both.failures(), before, strict=True)] == [1, 1]
    failed = both.retrieval.manager.follower.failures(both.retrieval_name)[tiny.version]
    assert "NaN" in failed.reason
    failed = both.ranker.manager.follower.failures(both.ranker_name)[tiny.version]
    assert "not finite" in failed.reason


def test_bad_versions_are_skipped_and_counted_at_start(tmp_path: Path) -> None:
    domain = "startbad"
    good = _publish(tmp_path, domain, seed=1).version
    bad = _publish(tmp_path, domain, seed=2).version
    for model in (f"{domain}-ranker", f"{domain}-retrieval"):
        (tmp_path / model / "²").mkdir()
        items = version_dir(tmp_path, model, bad) / "items.json"
        data = json.loads(items.read_text())
        data["titles"] = 5
        items.write_text(json.dumps(data))
        # the hashes match again: only the content is wrong
        meta_path = version_dir(tmp_path, model, bad) / "metadata.json"
        meta = json.loads(meta_path.read_text())
        meta["files"]["items.json"] = sha256_file(items)
        meta_path.write_text(json.dumps(meta))
    pair = Both(tmp_path, domain)
    try:
        assert pair.served() == (str(good), str(good))
        assert pair.failures() == (2, 2)  # the '²' directory and the bad catalogue, in each
        reasons = [
            pair.ranker.manager.follower.failures(pair.ranker_name)[bad].reason,
            pair.retrieval.manager.follower.failures(pair.retrieval_name)[bad].reason,
        ]
        assert all("'titles' must be a list" in r for r in reasons), reasons
    finally:
        pair.close()


def test_both_processes_retry_a_failed_version_on_sighup(tmp_path: Path) -> None:
    domain = "hup"
    _publish(tmp_path, domain, seed=1)
    for model in (f"{domain}-ranker", f"{domain}-retrieval"):
        (tmp_path / model / "²").mkdir()  # never fatal, also at start
    common = [f"--model-repository={tmp_path}", "--poll-interval-s=0", "--grace-period-s=2"]
    ranker = ServiceProcess(
        "serving.ranking",
        [*common, f"--models={domain}-ranker", "--provider=cpu", "--intra-op-threads=1"],
        log_path=tmp_path / "ranker.log",
    )
    retrieval = ServiceProcess(
        "serving.retrieval", [*common, "--onnx-threads=1"], log_path=tmp_path / "retrieval.log"
    )
    procs = (ranker, retrieval)

    def served() -> tuple[str, str]:
        with grpc.insecure_channel(ranker.address) as channel:
            ranked = ranking_pb2_grpc.RankingServiceStub(channel).Rank(
                rank_request(f"{domain}-ranker", "u1", ["i1"]), timeout=10
            )
        with grpc.insecure_channel(retrieval.address) as channel:
            retrieved = retrieval_pb2_grpc.RetrievalServiceStub(channel).Retrieve(
                retrieval_pb2.RetrieveRequest(user_id="u1", domain=domain, k=3), timeout=10
            )
        return ranked.model_version, retrieved.model.model_version

    def sighup_and_wait(needle: str, count: int) -> None:
        for proc in procs:
            proc.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while not all(p.log().count(needle) >= count for p in procs):
            assert time.monotonic() < deadline, [p.log()[-2000:] for p in procs]
            time.sleep(0.1)

    try:
        for proc in procs:
            proc.wait_serving(60)
        assert served() == ("1", "1")
        v2 = _publish(tmp_path, domain, seed=2).version
        saved = _break(tmp_path, domain, v2)
        sighup_and_wait(f"version {v2} (attempt 1", 1)
        assert served() == ("1", "1")
        for path, data in saved.items():
            path.write_bytes(data)
        sighup_and_wait(f"serving versions [{v2}]", 1)
        assert served() == (str(v2), str(v2))
        for proc in procs:
            assert "is not a version" in proc.log()
            assert proc.terminate() == 0
    finally:
        for proc in procs:
            proc.kill()
