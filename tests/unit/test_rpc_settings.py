"""Settings: environment and flags, validated at start with a clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic_settings import SettingsConfigDict

from devtools.processes import project_env
from recsys.rpc.settings import ServerSettings, SettingsInvalid, load_settings


class DemoSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="DEMO_")


def test_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_PORT", "7001")
    monkeypatch.setenv("DEMO_GRACE_PERIOD_S", "2.5")
    settings = load_settings(DemoSettings, ["--metrics-port=7002", "--no-reflection"])
    assert settings.port == 7001
    assert settings.metrics_port == 7002
    assert settings.grace_period_s == 2.5
    assert settings.reflection is False


def test_flags_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_PORT", "7001")
    assert load_settings(DemoSettings, ["--port=7005"]).port == 7005


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--port=70000"], "port (env DEMO_PORT, flag --port)"),
        (["--grace-period-s=-1"], "grace_period_s"),
        (["--log-level=LOUD"], "log_level"),
        (["--port=7000", "--metrics-port=7000"], "port and metrics_port must differ"),
        (["--tls-cert-file=/nonexistent.pem"], "must be given together"),
        (["--bogus=1"], "unrecognized arguments"),
    ],
)
def test_invalid_settings_exit_2_with_message(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SettingsInvalid) as info:
        load_settings(DemoSettings, argv)
    assert info.value.code == 2
    assert needle in info.value.message
    assert needle in capsys.readouterr().err


def test_tls_files_must_exist(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("x")
    with pytest.raises(SettingsInvalid) as info:
        load_settings(
            DemoSettings, [f"--tls-cert-file={tmp_path / 'missing.pem'}", f"--tls-key-file={key}"]
        )
    assert "is not a readable file" in info.value.message


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pair")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=localhost", "-keyout", "key.pem", "-out", "cert.pem"],
        cwd=d,
        check=True,
        capture_output=True,
    )
    return d / "cert.pem", d / "key.pem"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--host=999.1.1.1"], "host (env DEMO_HOST, flag --host)"),
        (["--host=no-such-host.invalid"], "does not resolve"),
        (["--metrics-host=300.0.0.1"], "metrics_host"),
        (["--metrics-tls"], "metrics_tls needs tls_cert_file"),
    ],
)
def test_bad_hosts_are_refused_in_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SettingsInvalid) as info:
        load_settings(DemoSettings, argv)
    assert needle in info.value.message
    assert capsys.readouterr().err.count("\n") == 1


def test_good_hosts_are_accepted() -> None:
    for host in ("0.0.0.0", "127.0.0.1", "::", "[::1]", "localhost"):
        assert load_settings(DemoSettings, [f"--host={host}"]).host == host


def test_swapped_certificate_and_key_are_refused(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = pair
    assert load_settings(DemoSettings, [f"--tls-cert-file={cert}", f"--tls-key-file={key}"])
    with pytest.raises(SettingsInvalid) as info:
        load_settings(DemoSettings, [f"--tls-cert-file={key}", f"--tls-key-file={cert}"])
    assert "tls_cert_file" in info.value.message and "swapped" in info.value.message
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SettingsInvalid) as info:
        load_settings(
            DemoSettings,
            [f"--tls-cert-file={cert}", f"--tls-key-file={key}", f"--tls-client-ca-file={key}"],
        )
    assert "tls_client_ca_file" in info.value.message


BLAS_THREADS = """
import sys, threadpoolctl
from recsys.rpc.server import RpcServer
from recsys.rpc.settings import ServerSettings
with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
    RpcServer(ServerSettings(port=0, metrics_port=0, blas_threads=int(sys.argv[1])),
              service_names=[], register=lambda server: None)
    print(sorted({i["num_threads"] for i in threadpoolctl.threadpool_info()
                  if i["user_api"] == "blas"}))
"""


@pytest.mark.parametrize(("setting", "threads"), [(1, "[1]"), (0, "[2]")])
def test_blas_threads_limit_the_process(setting: int, threads: str) -> None:
    """A server limits numpy's (and FAISS's) BLAS to `blas_threads`; 0 leaves it alone. In a
    child process: the limit is process-wide."""
    out = subprocess.run(
        [sys.executable, "-c", BLAS_THREADS, str(setting)],
        capture_output=True,
        text=True,
        check=True,
        env=project_env(),
    )
    assert out.stdout.strip() == threads
