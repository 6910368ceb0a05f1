"""Calls a server with the real tritonclient.grpc client and prints what it got as JSON.

Runs in its own process: tritonclient registers the Open Inference Protocol messages in the
protobuf descriptor pool under the same names as this project's stubs, so the two cannot be
imported into one process.

    python tests/utils/triton_probe.py --url 127.0.0.1:8001 [--model books-ranker]
        [--infer '{"user_index": [0, 0], "item_index": [3, 4]}'] [--version 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--model")
    parser.add_argument("--version", default="")
    parser.add_argument("--infer", help="JSON object: input name -> list of values")
    parser.add_argument("--datatype", default="INT64")
    args = parser.parse_args()

    client = grpcclient.InferenceServerClient(url=args.url)
    out: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "server_metadata": client.get_server_metadata(as_json=True),
    }
    if args.model:
        try:
            out["model_ready"] = client.is_model_ready(args.model, args.version)
            out["model_metadata"] = client.get_model_metadata(
                args.model, args.version, as_json=True
            )
        except InferenceServerException as exc:
            out["error"] = {"status": exc.status(), "message": exc.message()}
    if args.model and args.infer:
        tensors = json.loads(args.infer)
        dtype = np.int64 if args.datatype == "INT64" else np.float32
        inputs = []
        for name, values in tensors.items():
            array = np.asarray(values, dtype=dtype)
            tensor = grpcclient.InferInput(name, list(array.shape), args.datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        try:
            result = client.infer(args.model, inputs, model_version=args.version)
            response = result.get_response(as_json=True)
            out["infer"] = {
                "model_version": response.get("model_version"),
                "outputs": {
                    o["name"]: result.as_numpy(o["name"]).tolist() for o in response["outputs"]
                },
            }
        except InferenceServerException as exc:
            out["infer_error"] = {"status": exc.status(), "message": exc.message()}
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
