"""A server built from the kit, on loopback: health, reflection, graceful SIGTERM, TLS, and the
real tritonclient reading the server calls of the Open Inference Protocol."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from devtools.processes import REPO_ROOT, ServiceProcess, health_status, project_env
from recsys.inference import grpc_service_pb2 as pb
from recsys.inference import grpc_service_pb2_grpc as pb_grpc
from recsys.rpc.metrics import package_version
from recsys.rpc.settings import ServerSettings
from recsys.rpc.tls import ClientTLS, create_channel
from tests.utils.kit_server import SERVICE_NAME, build_server
from tests.utils.servers import BackgroundServer

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture()
def kit_process(tmp_path: Path):
    proc = ServiceProcess(
        "tests.utils.kit_server", ["--grace-period-s=10"], log_path=tmp_path / "kit.log"
    )
    proc.wait_serving(30)
    yield proc
    proc.kill()


def test_health_goes_serving_and_lists_services(kit_process: ServiceProcess) -> None:
    assert health_status(kit_process.address) == SERVING
    assert health_status(kit_process.address, SERVICE_NAME) == SERVING


def test_reflection_lists_the_services(kit_process: ServiceProcess) -> None:
    with grpc.insecure_channel(kit_process.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
    names = {s.name for s in reply.list_services_response.service}
    assert {
        SERVICE_NAME,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


def test_sigterm_lets_the_call_in_flight_finish_then_exits_0(kit_process: ServiceProcess) -> None:
    result: dict[str, object] = {}

    def slow_call() -> None:
        with grpc.insecure_channel(kit_process.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(model_name="m", id="slow")
            request.parameters["sleep_s"].double_param = 2.0
            try:
                result["reply"] = stub.ModelInfer(request, timeout=20)
            except grpc.RpcError as exc:
                result["error"] = exc

    thread = threading.Thread(target=slow_call)
    thread.start()
    time.sleep(0.7)  # the call is in flight
    start = time.monotonic()
    kit_process.proc.send_signal(15)
    time.sleep(0.3)
    # Draining: health says NOT_SERVING and new calls are refused while the slow call finishes.
    assert health_status(kit_process.address) in (NOT_SERVING, None)
    thread.join(20)
    code = kit_process.proc.wait(20)
    assert "error" not in result, result.get("error")
    assert result["reply"].id == "slow"  # type: ignore[attr-defined]
    assert code == 0
    assert time.monotonic() - start < 8
    assert "Shutdown signal received" in kit_process.log()


def test_tritonclient_reads_server_live_and_ready(kit_process: ServiceProcess) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "tests/utils/triton_probe.py"),
            "--url",
            kit_process.address,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=project_env(),
        check=True,
    )
    answer = json.loads(out.stdout)
    assert answer["live"] is True
    assert answer["ready"] is True
    assert answer["server_metadata"]["name"] == "kit-test"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _signed_certificate(d: Path, name: str, extensions: str) -> None:
    """`name`.key and `name`.pem in `d`: a new RSA key and its certificate signed by the CA there
    (ca.pem, ca.key), for localhost and 127.0.0.1, with the `extensions` lines added."""
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        cwd=d,
    )
    (d / f"{name}.ext").write_text(f"subjectAltName=DNS:localhost,IP:127.0.0.1\n{extensions}")
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.pem",
        cwd=d,
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    for name in ("server", "client"):
        usage = "serverAuth" if name == "server" else "clientAuth"
        _signed_certificate(d, name, f"extendedKeyUsage={usage}\n")
    return d


def test_mutual_tls(certs: Path) -> None:
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        tls_cert_file=certs / "server.pem",
        tls_key_file=certs / "server.key",
        tls_client_ca_file=certs / "ca.pem",
    )

    async def factory():
        return build_server(settings)[0]

    server = BackgroundServer(factory)
    target = f"localhost:{server.server.port}"
    try:
        with_cert = ClientTLS(certs / "ca.pem", certs / "client.pem", certs / "client.key")
        with create_channel(target, tls=with_cert) as channel:
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(
                pb.ServerLiveRequest(), timeout=5
            )
            assert reply.live
        # Without a client certificate the handshake is refused.
        with create_channel(target, tls=ClientTLS(certs / "ca.pem")) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(
                    pb.ServerLiveRequest(), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # Plaintext clients cannot talk to a TLS server.
        with grpc.insecure_channel(target) as channel:
            with pytest.raises(grpc.RpcError):
                pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(
                    pb.ServerLiveRequest(), timeout=5
                )
    finally:
        server.stop()


@pytest.fixture(scope="module")
def noeku_cert(certs: Path) -> Path:
    """Under the same CA, a certificate with no extended key usage (no stated purpose)."""
    _signed_certificate(certs, "noeku", "")
    return certs


@pytest.mark.parametrize("require_eku", [True, False])
def test_mutual_tls_checks_the_client_certificates_key_usage(
    noeku_cert: Path, require_eku: bool
) -> None:
    certs = noeku_cert
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        tls_cert_file=certs / "server.pem",
        tls_key_file=certs / "server.key",
        tls_client_ca_file=certs / "ca.pem",
        tls_client_require_eku=require_eku,
    )

    async def factory():
        return build_server(settings)[0]

    server = BackgroundServer(factory)
    target = f"localhost:{server.server.port}"

    def call(name: str, health: bool = False) -> grpc.StatusCode:
        tls = ClientTLS(certs / "ca.pem", certs / f"{name}.pem", certs / f"{name}.key")
        with create_channel(target, tls=tls) as channel:
            try:
                if health:
                    health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=5
                    )
                else:
                    pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(
                        pb.ServerLiveRequest(), timeout=5
                    )
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[no-any-return]
            return grpc.StatusCode.OK

    try:
        assert call("client") == grpc.StatusCode.OK  # extendedKeyUsage=clientAuth
        # A server certificate (serverAuth only) is refused in the handshake.
        assert call("server") == grpc.StatusCode.UNAVAILABLE
        # A certificate with no stated purpose is refused too, unless the check is turned off.
        expected = grpc.StatusCode.UNAUTHENTICATED if require_eku else grpc.StatusCode.OK
        assert call("noeku") == expected
        assert call("noeku", health=True) == expected  # streaming and unary methods alike
    finally:
        server.stop()


def test_metrics_over_https_on_their_own_address(certs: Path) -> None:
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        metrics_host="127.0.0.1",
        metrics_tls=True,
        tls_cert_file=certs / "server.pem",
        tls_key_file=certs / "server.key",
    )

    async def factory():
        return build_server(settings)[0]

    server = BackgroundServer(factory)
    try:
        port = server.server.metrics_port
        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        url = f"https://localhost:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5, context=context) as reply:
            assert b"recsys_grpc_requests" in reply.read() or reply.status == 200
        with pytest.raises(OSError):  # plain HTTP is not served
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    finally:
        server.stop()


def test_every_kit_server_reports_its_build() -> None:
    settings = ServerSettings(host="127.0.0.1", port=0, metrics_port=0)

    async def factory():
        return build_server(settings)[0]

    server = BackgroundServer(factory)
    try:
        url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        server.stop()
    expected = f'recsys_build_info{{version="{package_version()}"}} 1.0'
    assert expected in text.splitlines()
    assert package_version() != "0+unknown"  # the test venv installs the project


@pytest.mark.parametrize("swap", [True, False])
def test_bad_tls_and_host_settings_exit_2_with_one_line(certs: Path, swap: bool) -> None:
    if swap:
        flags = [
            f"--tls-cert-file={certs / 'server.key'}",
            f"--tls-key-file={certs / 'server.pem'}",
        ]
        needle = "tls_cert_file"
    else:
        flags = ["--host=999.1.1.1"]
        needle = "host"
    out = subprocess.run(
        [sys.executable, "-m", "tests.utils.kit_server", "--port=0", "--metrics-port=0", *flags],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=project_env(),
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in out.stderr


def test_a_port_in_use_exits_2_with_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.utils.kit_server",
                "--host=127.0.0.1",
                f"--port={port}",
                "--metrics-port=0",
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env=project_env(),
        )
    assert out.returncode == 2
    lines = [line for line in out.stderr.strip().splitlines() if "host and port" in line]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0]
    assert "Traceback" not in out.stderr
