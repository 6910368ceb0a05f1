"""The plain peer: a grpc.aio server of the Open Inference Protocol's ModelInfer over one ONNX
Runtime session, one request per session run (no batching), no checks beyond the tensors' sizes.

    python -m bench.peer_servers.plain --model=model.onnx --name=bench-ranker --port=8001
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort

from recsys.inference import grpc_service_pb2 as pb
from recsys.inference import grpc_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


class Plain(pb_grpc.GRPCInferenceServiceServicer):
    """ModelInfer (raw INT64 inputs in the session's input order), readiness and nothing else."""

    def __init__(self, name: str, session: ort.InferenceSession) -> None:
        self.name = name
        self.session = session
        self.inputs = [i.name for i in session.get_inputs()]
        self.output = session.get_outputs()[0].name
        self.executor = ThreadPoolExecutor(max_workers=1)

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: object
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: object
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: object
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name == self.name)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: object
    ) -> pb.ModelInferResponse:
        by_name = {t.name: i for i, t in enumerate(request.inputs)}
        feeds = {
            name: np.frombuffer(request.raw_input_contents[by_name[name]], np.int64).reshape(-1)
            for name in self.inputs
        }
        loop = asyncio.get_running_loop()
        scores = await loop.run_in_executor(
            self.executor, lambda: self.session.run([self.output], feeds)[0]
        )
        response = pb.ModelInferResponse(model_name=self.name, id=request.id)
        shape = list(request.inputs[0].shape)
        response.outputs.add(name=self.output, datatype="FP32", shape=shape)
        response.raw_output_contents.append(np.asarray(scores, "<f4").tobytes())
        return response


async def serve(name: str, model: str, port: int, threads: int) -> None:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Plain(name, session), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    logger.info("plain peer on 127.0.0.1:%d", port)
    await server.wait_for_termination()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    asyncio.run(serve(args.name, args.model, args.port, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
