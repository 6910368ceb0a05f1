"""Ranker settings: defaults from docs/settings.md, environment and flags, version policies."""

from __future__ import annotations

import pytest

from recsys.rpc.settings import SettingsInvalid, load_settings
from serving.ranking.config import RankingSettings, VersionPolicy


def test_defaults() -> None:
    s = load_settings(RankingSettings, [])
    assert (s.port, s.metrics_port) == (8001, 9001)
    assert str(s.model_repository) == "/models"
    assert s.version_policy == "latest" and s.poll_interval_s == 5
    assert s.provider == "auto"
    assert (s.max_batch_candidates, s.max_queue_delay_us) == (1024, 2000)
    assert s.batching == "queued"
    assert (s.max_queue_requests, s.max_candidates_per_request) == (256, 10000)
    assert s.batching_enabled


def test_environment_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANKING_MODELS", "books-ranker, movies-ranker")
    monkeypatch.setenv("RANKING_VERSION_POLICY", "specific:3,1")
    monkeypatch.setenv("RANKING_BATCHING", "off")
    s = load_settings(RankingSettings, ["--provider=cpu", "--intra-op-threads=2"])
    assert s.model_names == ["books-ranker", "movies-ranker"]
    assert s.policy == VersionPolicy("specific", (1, 3))
    assert not s.batching_enabled
    assert s.provider == "cpu" and s.intra_op_threads == 2


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ("latest", VersionPolicy("latest")),
        ("all", VersionPolicy("all")),
        ("specific:2", VersionPolicy("specific", (2,))),
        (" specific: 4, 2 ,4", VersionPolicy("specific", (2, 4))),
    ],
)
def test_version_policy(text: str, policy: VersionPolicy) -> None:
    assert VersionPolicy.parse(text) == policy


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--version-policy=newest"], "use 'latest', 'all' or 'specific:1,2'"),
        (["--version-policy=specific:"], "positive version numbers"),
        (["--version-policy=specific:0"], "positive version numbers"),
        (["--provider=tpu"], "provider"),
        (["--max-batch-candidates=0"], "max_batch_candidates"),
    ],
)
def test_invalid_settings_are_refused(argv: list[str], needle: str) -> None:
    with pytest.raises(SettingsInvalid) as info:
        load_settings(RankingSettings, argv)
    assert needle in info.value.message
