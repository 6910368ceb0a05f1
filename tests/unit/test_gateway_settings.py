"""Gateway and retrieval settings: defaults from docs/settings.md, environment variables, flags and
validation."""

from __future__ import annotations

import pytest

from gateway.config import GatewaySettings, split_targets
from recsys.rpc.settings import SettingsInvalid, load_settings
from serving.retrieval.config import RetrievalSettings


def test_gateway_defaults_and_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(GatewaySettings, [])
    assert (settings.port, settings.metrics_port) == (8000, 9000)
    assert settings.retrieval_target == "dns:///localhost:8002"
    assert (settings.retrieval_candidates, settings.max_k) == (500, 100)
    monkeypatch.setenv("GATEWAY_RANKER_TARGETS", "127.0.0.1:8001, 127.0.0.1:8011,")
    monkeypatch.setenv("GATEWAY_DOMAINS", "books,music")
    settings = load_settings(GatewaySettings, ["--ranker-shards=3"])
    assert settings.ranker_target_list == ["127.0.0.1:8001", "127.0.0.1:8011"]
    assert settings.domain_list == ["books", "music"]
    assert settings.ranker_shards == 3


@pytest.mark.parametrize(
    "argv",
    [
        ["--domains= , "],
        ["--ranker-targets="],
        ["--max-k=0"],
        ["--upstream-tls-cert-file=/x"],
        ["--deadline-margin-ms=1000"],
    ],
)
def test_gateway_refuses_bad_settings(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SettingsInvalid) as info:
        load_settings(GatewaySettings, argv)
    assert info.value.code == 2
    assert "GatewaySettings" in capsys.readouterr().err


def test_retrieval_defaults_and_models(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(RetrievalSettings, [])
    assert (settings.port, settings.metrics_port, settings.max_k) == (8002, 9002, 1000)
    monkeypatch.setenv("RETRIEVAL_MODELS", "books-retrieval,music-retrieval")
    assert load_settings(RetrievalSettings, []).model_names == [
        "books-retrieval",
        "music-retrieval",
    ]


@pytest.mark.parametrize(
    ("value", "targets"),
    [
        (
            "dns:///ranker-headless.recsys.svc.cluster.local:8001",
            ["dns:///ranker-headless.recsys.svc.cluster.local:8001"],
        ),
        ("127.0.0.1:8001,127.0.0.1:8011", ["127.0.0.1:8001", "127.0.0.1:8011"]),
        ("ipv4:127.0.0.1:8001,127.0.0.1:8011", ["ipv4:127.0.0.1:8001,127.0.0.1:8011"]),
        (
            "ipv4:10.0.0.1:1,10.0.0.2:1,dns:///r:1,localhost:2",
            ["ipv4:10.0.0.1:1,10.0.0.2:1", "dns:///r:1", "localhost:2"],
        ),
    ],
)
def test_ranker_targets_split_into_channels(value: str, targets: list[str]) -> None:
    assert split_targets(value) == targets
