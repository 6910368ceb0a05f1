"""A small server built from the kit alone, for testing the kit: it speaks the Open Inference
Protocol's server calls, and its ModelInfer sleeps or raises on request.

    python -m tests.utils.kit_server --port=8001 --metrics-port=9001
"""

from __future__ import annotations

import asyncio
import sys

import grpc
from pydantic_settings import SettingsConfigDict

from recsys.inference import grpc_service_pb2 as pb
from recsys.inference import grpc_service_pb2_grpc as pb_grpc
from recsys.rpc import errors
from recsys.rpc.log import configure_logging
from recsys.rpc.server import RpcServer, serve_until_signal
from recsys.rpc.settings import ServerSettings, load_settings

SERVICE_NAME = "inference.GRPCInferenceService"


class KitSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="KIT_")


class KitTestServicer(pb_grpc.GRPCInferenceServiceServicer):
    """ServerLive/ServerReady from the server's health; ModelInfer sleeps ("sleep_s") or raises
    the domain error named by "raise" (or ValueError for "boom")."""

    def __init__(self) -> None:
        self.ready = False
        self.started = 0

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="kit-test", version="0", extensions=[])

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        self.started += 1
        params = request.parameters
        if "sleep_s" in params:
            await asyncio.sleep(params["sleep_s"].double_param)
        if "raise" in params:
            name = params["raise"].string_param
            if name == "boom":
                raise ValueError("secret detail that must not reach the client")
            raise getattr(errors, name)(f"raised {name}")
        return pb.ModelInferResponse(model_name=request.model_name, id=request.id)


def build_server(settings: ServerSettings) -> tuple[RpcServer, KitTestServicer]:
    servicer = KitTestServicer()
    server = RpcServer(
        settings,
        service_names=[SERVICE_NAME],
        register=lambda s: pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, s),
    )
    return server, servicer


async def _main(settings: KitSettings) -> None:
    server, servicer = build_server(settings)

    async def startup() -> None:
        servicer.ready = True

    async def shutdown() -> None:
        servicer.ready = False

    await serve_until_signal(server, on_startup=startup, on_shutdown=shutdown)


def main() -> None:
    settings = load_settings(KitSettings)
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(_main(settings))


if __name__ == "__main__":
    sys.exit(main())
