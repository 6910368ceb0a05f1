"""The KServe peer: kserve.ModelServer (its gRPC Open Inference Protocol server) with a
kserve.Model that runs one ONNX Runtime session. Runs in .venv-peers/kserve.

    python bench/peer_servers/kserve_server.py --model=model.onnx --name=bench-ranker \
        --port=8001 --http-port=8080
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
import onnxruntime as ort


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # kserve parses the command line at import
    from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

    class OnnxRanker(Model):
        def __init__(self) -> None:
            super().__init__(args.name)
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            self.session = ort.InferenceSession(
                args.model, sess_options=so, providers=["CPUExecutionProvider"]
            )
            self.inputs = [i.name for i in self.session.get_inputs()]
            self.output = self.session.get_outputs()[0].name
            self.ready = True

        def predict(self, payload: InferRequest, headers: Any = None) -> InferResponse:
            arrays = {i.name: i.as_numpy().reshape(-1) for i in payload.inputs}
            feeds = {name: arrays[name].astype(np.int64, copy=False) for name in self.inputs}
            scores = self.session.run([self.output], feeds)[0].astype(np.float32)
            shape = list(payload.inputs[0].shape)
            out = InferOutput(name=self.output, shape=shape, datatype="FP32")
            out.set_data_from_numpy(scores.reshape(shape), binary_data=True)
            return InferResponse(
                response_id=payload.id or "",
                model_name=self.name,
                infer_outputs=[out],
                use_binary_outputs=True,
            )

    ModelServer(grpc_port=args.port, http_port=args.http_port, workers=1).start([OnnxRanker()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
