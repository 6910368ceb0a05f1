"""Open Inference Protocol tensors <-> numpy for the ranker contract: input checks that name the
problem (tensor names, datatypes, shapes, contents, NaN), and raw FP32 outputs as Triton sends."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format

from recsys.inference import grpc_service_pb2 as pb
from recsys.repository import CONFIG_FILE
from recsys.rpc.errors import InvalidRequest
from serving.ranking.checks import quote
from serving.ranking.model import (
    CONTRACT_INPUTS,
    FEATURES_INPUT,
    ITEM_INPUT,
    PLATFORM,
    SCORE_OUTPUT,
    USER_INPUT,
    RankerModel,
)

logger = logging.getLogger(__name__)

# Columns a feature ranker's input may have (the element limit of a request scales with it; the
# served model's own width is checked when the request reaches it).
MAX_FEATURES = 256
# Dimensions an input shape may have ([N] or [N, 1]; more is refused before any arithmetic).
MAX_DIMS = 8

# datatype -> (numpy dtype, InferTensorContents field)
_DATATYPES: dict[str, tuple[np.dtype[Any], str]] = {
    "INT64": (np.dtype("<i8"), "int64_contents"),
    "INT32": (np.dtype("<i4"), "int_contents"),
    "UINT64": (np.dtype("<u8"), "uint64_contents"),
    "UINT32": (np.dtype("<u4"), "uint_contents"),
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP64": (np.dtype("<f8"), "fp64_contents"),
    "BOOL": (np.dtype("?"), "bool_contents"),
}


def _decode(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, max_elements: int
) -> np.ndarray:
    name = tensor.name
    if tensor.datatype not in _DATATYPES:
        raise InvalidRequest(
            f"input {name!r}: datatype {quote(tensor.datatype)} is not supported; "
            f"expected {CONTRACT_INPUTS.get(name, 'INT64')}"
        )
    dtype, field = _DATATYPES[tensor.datatype]
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidRequest(f"input {name!r}: shape {shape} has a negative dimension")
    if len(shape) > MAX_DIMS:
        raise InvalidRequest(f"input {name!r}: shape {shape} has more than {MAX_DIMS} dimensions")
    # Python integers: a product such as 2**32 * 2**32 must not wrap around as int64 does.
    count = math.prod(shape)
    if count > max_elements:
        raise InvalidRequest(
            f"input {name!r}: {count} elements is more than this server's limit of "
            f"{max_elements} per request"
        )
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidRequest(
                f"input {name!r}: raw_input_contents holds {len(raw)} bytes; shape {shape} of "
                f"{tensor.datatype} needs {count * dtype.itemsize}"
            )
        array = np.frombuffer(raw, dtype=dtype)
    else:
        values = getattr(tensor.contents, field)
        if len(values) != count:
            raise InvalidRequest(
                f"input {name!r}: contents.{field} holds {len(values)} values; shape {shape} "
                f"needs {count}"
            )
        array = np.asarray(values, dtype=dtype)
    if array.dtype.kind == "f" and np.isnan(array).any():
        raise InvalidRequest(
            f"input {name!r}: contains NaN at element {int(np.flatnonzero(np.isnan(array))[0])}"
        )
    return array.reshape(shape)


@dataclass(frozen=True)
class Decoded:
    """The inputs of a ModelInfer request as vectors, and the shape the output takes."""

    users: np.ndarray  # [N] user indices, or [N, F] FP32 feature rows (feature rankers)
    items: np.ndarray
    shape: list[int]  # the output's shape: item_index's on the wire ([N] or [N, 1]), or [N]
    features_version: str = ""  # the request parameter of that name (feature rankers)


def _features_version(request: pb.ModelInferRequest) -> str:
    param = request.parameters.get("features_version")
    return param.string_param if param is not None else ""


def decode_inputs(request: pb.ModelInferRequest, max_elements: int) -> Decoded:
    """The user_index and item_index vectors of a ModelInfer request, checked against the ranker
    contract: exactly these two INT64 inputs, [N] or [N, 1], of equal length."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    names = [t.name for t in request.inputs]
    if names == [FEATURES_INPUT]:
        return _decode_features(request, raw, max_elements)
    unknown = sorted(set(names) - set(CONTRACT_INPUTS))
    if unknown:
        raise InvalidRequest(
            f"unknown input {', '.join(quote(n) for n in unknown[:5])}; the model takes "
            f"{sorted(CONTRACT_INPUTS)} (dot-product rankers) or [{FEATURES_INPUT!r}] (feature "
            "rankers)"
        )
    if len(set(names)) != len(names):
        raise InvalidRequest(f"inputs {names} name a tensor twice")
    missing = sorted(set(CONTRACT_INPUTS) - set(names))
    if missing:
        raise InvalidRequest(f"missing input {', '.join(repr(n) for n in missing)}")
    arrays: dict[str, np.ndarray] = {}
    shapes: dict[str, list[int]] = {}
    for i, tensor in enumerate(request.inputs):
        if raw and tensor.HasField("contents"):
            raise InvalidRequest(
                f"input {tensor.name!r} has contents while the request also uses "
                "raw_input_contents; use one or the other"
            )
        array = _decode(tensor, raw[i] if raw else None, max_elements)
        expected = CONTRACT_INPUTS[tensor.name]
        if tensor.datatype != expected:
            raise InvalidRequest(
                f"input {tensor.name!r}: datatype {tensor.datatype} does not match the model's "
                f"{expected}"
            )
        if array.ndim == 2 and array.shape[1] == 1:
            # [N, 1]: what a Triton client sends for max_batch_size > 0 with dims [1].
            array = array.reshape(-1)
        elif array.ndim != 1:
            raise InvalidRequest(
                f"input {tensor.name!r}: shape {list(array.shape)} must be one-dimensional [N] "
                "or [N, 1]"
            )
        shapes[tensor.name] = list(tensor.shape)
        arrays[tensor.name] = array
    users, items = arrays[USER_INPUT], arrays[ITEM_INPUT]
    if users.shape != items.shape:
        raise InvalidRequest(
            f"inputs {USER_INPUT!r} {shapes[USER_INPUT]} and {ITEM_INPUT!r} "
            f"{shapes[ITEM_INPUT]} must have the same length"
        )
    for requested in request.outputs:
        if requested.name != SCORE_OUTPUT:
            raise InvalidRequest(
                f"unknown output {quote(requested.name)}; the model produces [{SCORE_OUTPUT!r}]"
            )
    return Decoded(
        users.astype(np.int64, copy=False), items.astype(np.int64, copy=False), shapes[ITEM_INPUT]
    )


def _decode_features(request: pb.ModelInferRequest, raw: list[bytes], max_elements: int) -> Decoded:
    """A feature ranker's one input: FP32 [N, F]; the model's F is checked by the engine."""
    tensor = request.inputs[0]
    if raw and tensor.HasField("contents"):
        raise InvalidRequest(
            f"input {FEATURES_INPUT!r} has contents while the request also uses "
            "raw_input_contents; use one or the other"
        )
    if tensor.datatype != "FP32":
        raise InvalidRequest(
            f"input {FEATURES_INPUT!r}: datatype {quote(tensor.datatype)} does not match the "
            "model's FP32"
        )
    array = _decode(tensor, raw[0] if raw else None, max_elements * MAX_FEATURES)
    if array.ndim != 2 or not 1 <= array.shape[1] <= MAX_FEATURES:
        raise InvalidRequest(
            f"input {FEATURES_INPUT!r}: shape {list(array.shape)} must be [N, F] (one row of "
            f"features per candidate, F at most {MAX_FEATURES})"
        )
    for requested in request.outputs:
        if requested.name != SCORE_OUTPUT:
            raise InvalidRequest(
                f"unknown output {quote(requested.name)}; the model produces [{SCORE_OUTPUT!r}]"
            )
    n = int(array.shape[0])
    return Decoded(array, np.zeros(n, np.int64), [n], _features_version(request))


def encode_scores(
    request: pb.ModelInferRequest,
    scores: np.ndarray,
    model_name: str,
    version: int,
    shape: list[int] | None = None,
) -> pb.ModelInferResponse:
    """A ModelInfer response with the scores as one raw FP32 output, like Triton's, shaped like
    the item_index input ([N] or [N, 1])."""
    response = pb.ModelInferResponse(
        model_name=model_name, model_version=str(version), id=request.id
    )
    response.outputs.add(name=SCORE_OUTPUT, datatype="FP32", shape=shape or [int(scores.shape[0])])
    response.raw_output_contents.append(scores.astype("<f4", copy=False).tobytes())
    return response


def _config_from_metadata(model: RankerModel) -> pb.ModelConfig:
    """The configuration a version's metadata.json implies (no batch dimension: [N] tensors)."""
    config = pb.ModelConfig(name=model.name, platform=PLATFORM, max_batch_size=0)
    for specs, add in (
        (model.metadata["inputs"], config.input.add),
        (model.metadata["outputs"], config.output.add),
    ):
        for spec in specs:
            add(
                name=spec["name"],
                data_type=pb.DataType.Value(f"TYPE_{spec['datatype']}"),
                dims=spec["shape"],
            )
    return config


def model_config(model: RankerModel) -> pb.ModelConfig:
    """The Triton model configuration of a served version: its published config.pbtxt (fields
    this server does not model are skipped), or, if the version has none or it does not parse,
    the configuration its metadata implies."""
    path: Path = model.directory / CONFIG_FILE
    config = pb.ModelConfig()
    try:
        text_format.Parse(path.read_text(encoding="utf-8"), config, allow_unknown_field=True)
    except (OSError, UnicodeDecodeError, text_format.ParseError) as exc:
        logger.warning("%s: %s; answering the configuration of metadata.json", path, exc)
        return _config_from_metadata(model)
    if not config.name:
        config.name = model.name
    if not config.platform and not config.backend:
        config.platform = PLATFORM
    return config
