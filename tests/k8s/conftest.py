"""Fixtures for the deployment checks: the real kubectl, the rendered overlays, Prometheus tools."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.k8s.k8s_utils import (
    OVERLAYS,
    PrometheusServer,
    Rendered,
    StartPrometheus,
    ToolMissing,
    find_kubectl,
    find_tool,
    render,
)


def _require(find: Callable[[], str]) -> str:
    try:
        return find()
    except ToolMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def kubectl() -> str:
    return _require(find_kubectl)


@pytest.fixture(scope="session")
def promtool() -> str:
    return _require(lambda: find_tool("promtool"))


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return _require(lambda: find_tool("prometheus"))


@pytest.fixture(scope="session")
def rendered(kubectl: str) -> dict[str, Rendered]:
    """Every overlay, rendered once per session."""
    return {overlay: render(overlay, kubectl) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def start_prometheus(
    prometheus_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StartPrometheus]:
    """Starts real Prometheus servers on loopback; all are stopped when the module's tests end.

    `start_prometheus({"ranker": ["127.0.0.1:9001"]}, rule_files=[...])` returns a ready server
    that scrapes every target each second into a temporary TSDB. Prometheus hands newly
    discovered targets to its scrapers every 5 s, so the first samples arrive after ~5 s: share
    one server across a module's tests where possible.
    """
    servers: list[PrometheusServer] = []

    def start(
        targets: Mapping[str, Sequence[str]],
        rule_files: Sequence[Path] = (),
        scrape_interval_s: float = 1.0,
    ) -> PrometheusServer:
        server = PrometheusServer(
            prometheus_binary,
            tmp_path_factory.mktemp("prometheus"),
            targets,
            rule_files=rule_files,
            scrape_interval_s=scrape_interval_s,
        )
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()
