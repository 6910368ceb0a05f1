"""docs/settings.md and docs/metrics.md are what `make docs` generates from the code, and what
they say (variables, flags, metric names) is what the services really read and export."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from pydantic_settings import BaseSettings

from devtools import refdocs

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_committed_reference_matches_the_code() -> None:
    assert refdocs.stale() == [], "docs/settings.md or docs/metrics.md is out of date: `make docs`"


def test_stale_names_a_file_that_drifted(tmp_path: Path) -> None:
    for rel, text in refdocs.generated().items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert refdocs.stale(tmp_path) == []
    settings = tmp_path / refdocs.SETTINGS_DOC
    settings.write_text(settings.read_text().replace("`8001`", "`8011`", 1))
    assert refdocs.stale(tmp_path) == [refdocs.SETTINGS_DOC]
    (tmp_path / refdocs.METRICS_DOC).unlink()
    assert refdocs.stale(tmp_path) == [refdocs.SETTINGS_DOC, refdocs.METRICS_DOC]


def test_check_mode_fails_on_drift(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(refdocs, "REPO_ROOT", tmp_path)
    assert refdocs.main(["--check"]) == 1
    assert refdocs.main([]) == 0
    assert refdocs.main(["--check"]) == 0


def test_every_setting_has_a_description() -> None:
    assert refdocs.missing_descriptions() == []


def _documented_rows() -> list[tuple[str, str, str, str]]:
    """(section, setting, variable, flag) of every row of docs/settings.md."""
    rows, section = [], ""
    for line in (REPO_ROOT / refdocs.SETTINGS_DOC).read_text().splitlines():
        if line.startswith("## "):
            section = line[3:]
        m = re.match(r"\| `(\w+)` \| `([\w*]+)` \| `(--[\w-]+)", line)
        if m:
            rows.append((section, *m.groups()))
    return rows


def _other_value(cls: type[BaseSettings], name: str) -> tuple[str, object]:
    """A valid value for the field that differs from its default, as text and as read back."""
    info = cls.model_fields[name]
    kind, default = info.annotation, info.default
    special = {
        "version_policy": "all",
        "host": "127.0.0.2",
        "domains": "books,music",
        "retrieval_target": "127.0.0.1:1",
        "ranker_targets": "127.0.0.1:2",
        "upstream_tls_server_name": "ranker.internal",
        "metrics_host": "127.0.0.3",
    }
    if name in special:
        return special[name], special[name]
    if typing.get_origin(kind) is typing.Literal:
        value = next(v for v in typing.get_args(kind) if v != default)
        return str(value), value
    if kind is bool:
        return str(not default).lower(), not default
    if kind is int:
        value = int(default) + 1
        return str(value), value
    if kind is float:
        value = float(default) / 2 if default else 0.5
        return str(value), value
    if kind in (Path, Path | None):
        return "/srv/models", Path("/srv/models")
    if kind is str:
        return "books-ranker", "books-ranker"
    raise AssertionError(f"no test value for {cls.__name__}.{name}: {kind}")


CLASSES = {s.title: refdocs._load(s.settings) for s in refdocs.SERVICES}
TLS_FILES = {"tls_cert_file", "tls_key_file", "tls_client_ca_file"}
UPSTREAM_TLS = {"upstream_tls_ca_file", "upstream_tls_cert_file", "upstream_tls_key_file"}
# Settings that are valid only together with the certificate files above.
NEEDS_TLS_FILES = {"metrics_tls", "tls_client_require_eku"}


@pytest.mark.parametrize("service", sorted(CLASSES))
def test_documented_variables_and_flags_set_the_setting(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = CLASSES[service]
    prefix = refdocs.env_prefix(cls)
    rows = [r for r in _documented_rows() if r[0] in (service, "Every service")]
    names = {r[1] for r in rows}
    assert names == set(cls.model_fields), "every field of the class is documented"
    checked = 0
    for _, name, variable, flag in rows:
        if name in TLS_FILES | UPSTREAM_TLS | NEEDS_TLS_FILES:
            continue  # they need real certificate files together; the kit's tests cover them
        text, value = _other_value(cls, name)
        variable = variable.replace("*_", prefix)
        with monkeypatch.context() as m:
            m.setenv(variable, text)
            assert getattr(cls(_cli_parse_args=[]), name) == value, variable
        if cls.model_fields[name].annotation is bool:
            args = [flag] if value else [f"--no-{flag.removeprefix('--')}"]
        else:
            args = [f"{flag}={text}"]
        assert getattr(cls(_cli_parse_args=args), name) == value, args
        checked += 1
    assert checked >= len(names) - len(TLS_FILES | UPSTREAM_TLS | NEEDS_TLS_FILES)


def test_documented_metric_names_are_exported() -> None:
    """Every name in docs/metrics.md appears in the services' /metrics text once observed."""
    documented = re.findall(r"^\| `(recsys_\w+)` \|", (REPO_ROOT / refdocs.METRICS_DOC).read_text(),
                            re.M)  # fmt: skip
    assert len(documented) == len(set(documented)) > 10
    registry = CollectorRegistry()
    exported = set()
    for module in [refdocs.COMMON_METRICS, *(s.metrics for s in refdocs.SERVICES)]:
        for metric in refdocs.module_metrics(module):
            # A fresh copy of the definition in a private registry, one labelled child observed.
            kind = type(metric)
            kwargs: dict[str, object] = {"registry": registry}
            if metric._labelnames:
                kwargs["labelnames"] = metric._labelnames
            copy = kind(metric._name, metric._documentation, **kwargs)  # type: ignore[arg-type]
            child = copy.labels(*["x"] * len(metric._labelnames)) if metric._labelnames else copy
            if hasattr(child, "observe"):
                child.observe(0.001)
            elif hasattr(child, "inc"):
                child.inc()
            else:
                child.info({"version": "x"})
    text = generate_latest(registry).decode()
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    for name in documented:
        assert name in exported or f"{name}_bucket" in exported, name
