"""The Triton peer: Triton Inference Server through PyTriton, dynamic batching on, with an
inference function that runs one ONNX Runtime session on each batch. Runs in
.venv-peers/pytriton. Clients send [N, 1] tensors (max_batch_size > 0).

    python bench/peer_servers/pytriton_server.py --model=model.onnx --name=bench-ranker \
        --port=8001 --http-port=8000 --metrics-port=8002
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig

import numpy as np
import onnxruntime as ort


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=16384)
    parser.add_argument("--max-queue-delay-us", type=int, default=500)
    args = parser.parse_args()
    # Triton's Python backend stub links libpython: this interpreter's, not another of the same
    # minor version found first on the loader's path (its C objects would not match the stdlib).
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(
            [libdir, *filter(None, [os.environ.get("LD_LIBRARY_PATH")])]
        )
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    session = ort.InferenceSession(args.model, sess_options=so, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    output = session.get_outputs()[0].name

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {name: inputs[name].reshape(-1).astype(np.int64, copy=False) for name in names}
        scores = session.run([output], feeds)[0].astype(np.float32)
        return {output: scores.reshape(-1, 1)}

    config = TritonConfig(
        grpc_port=args.port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        grpc_address="127.0.0.1",
        http_address="127.0.0.1",
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=infer,
            inputs=[Tensor(name=n, dtype=np.int64, shape=(1,)) for n in names],
            outputs=[Tensor(name=output, dtype=np.float32, shape=(1,))],
            config=ModelConfig(
                max_batch_size=args.max_batch,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
            strict=False,
        )
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
