"""Calls a server with the real tritonclient.grpc client and prints what it got as JSON.

Runs in its own process: tritonclient registers the Open Inference Protocol messages in the
protobuf descriptor pool under the same names as this project's stubs, so the two cannot be
imported into one process.

    python tests/utils/triton_probe.py --url 127.0.0.1:8001 [--model books-ranker]
        [--infer '{"user_index": [0, 0], "item_index": [3, 4]}'] [--version 2]
        [--stock 8]

--stock N builds a request of N candidates from get_model_config alone, as a client that knows
nothing else would (with max_batch_size > 0 a batch dimension of N before the dims, -1 dims as 1;
otherwise the dims with -1 as N), sends it, and also reports the statistics and the repository
index.
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
    parser.add_argument("--stock", type=int, default=0)
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
    if args.model and args.stock:
        try:
            out.update(_stock(client, args.model, args.version, args.stock))
        except InferenceServerException as exc:
            out["stock_error"] = {"status": exc.status(), "message": exc.message()}
    json.dump(out, sys.stdout)
    return 0


def _stock(client: grpcclient.InferenceServerClient, model: str, version: str, n: int) -> Any:
    """A request built from the model configuration only; its answer, statistics and index."""
    config = client.get_model_config(model, version, as_json=True)["config"]
    batch = int(config.get("max_batch_size", 0))
    inputs, sent = [], {}
    for spec in config["input"]:
        dims = [int(d) for d in spec["dims"]]
        shape = (
            [n, *[1 if d == -1 else d for d in dims]]
            if batch > 0
            else [n if d == -1 else d for d in dims]
        )
        datatype = spec["data_type"].removeprefix("TYPE_")
        values = np.arange(n, dtype=np.int64) % (3 if spec["name"] == "user_index" else 100)
        array = values.reshape(shape).astype(np.int64 if datatype == "INT64" else np.int32)
        tensor = grpcclient.InferInput(spec["name"], shape, datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
        sent[spec["name"]] = {"shape": shape, "values": values.tolist()}
    outputs = [grpcclient.InferRequestedOutput(o["name"]) for o in config["output"]]
    result = client.infer(model, inputs, model_version=version, outputs=outputs)
    scores = result.as_numpy(config["output"][0]["name"])
    return {
        "config": config,
        "stock": {"sent": sent, "shape": list(scores.shape), "scores": scores.reshape(-1).tolist()},
        "statistics": client.get_inference_statistics(model, version, as_json=True),
        "all_statistics": client.get_inference_statistics(as_json=True),
        "index": client.get_model_repository_index(as_json=True),
    }


if __name__ == "__main__":
    sys.exit(main())
