"""The on-disk layout of the model repository: paths, version names, the READY marker, metadata,
the model signatures and their check, the Triton config.pbtxt, and the id vocabularies."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

METADATA_FILE = "metadata.json"
CONFIG_FILE = "config.pbtxt"
READY_FILE = "READY"
MODEL_FILE = "model.onnx"
USERS_FILE = "users.json"
ITEMS_FILE = "items.json"
TMP_PREFIX = ".tmp-"
DIR_MODE = 0o755
FILE_MODE = 0o644

# Version directories are positive decimal integers in ASCII without leading zeros: "²", "٣" or
# "07" are not versions (str.isdigit() accepts the first two, and "07" would alias "7").
_VERSION_NAME = re.compile(r"[1-9][0-9]{0,17}")

USER_KINDS = ("target", "mapped")


class RepositoryError(Exception):
    """A model repository or one of its versions is missing, malformed or inconsistent."""


# -- paths and versions ------------------------------------------------------------------------


def parse_version_name(text: str) -> int | None:
    """'3' -> 3; anything that is not a version directory name ('²', '0', '07', 'x') -> None."""
    return int(text) if _VERSION_NAME.fullmatch(text) else None


def version_dir(root: Path, model: str, version: int) -> Path:
    return Path(root) / model / str(version)


def list_models(root: Path) -> list[str]:
    """Names of the models in a repository (directories that are not hidden), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} does not exist or is not a directory")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass(frozen=True)
class VersionScan:
    """What a model's directory holds: published versions (READY, with every model of their
    publish READY too), version directories still incomplete, and entries that are no version."""

    published: tuple[int, ...]
    incomplete: tuple[int, ...]
    invalid: tuple[str, ...]


def scan_versions(root: Path, model: str) -> VersionScan:
    """Classify the entries of `<root>/<model>/`. Hidden names and plain files are ignored."""
    model_dir = Path(root) / model
    if not model_dir.is_dir():
        return VersionScan((), (), ())
    published, incomplete, invalid = [], [], []
    for entry in model_dir.iterdir():
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        version = parse_version_name(entry.name)
        if version is None:
            invalid.append(entry.name)
        elif is_published(Path(root), model, version):
            published.append(version)
        else:
            incomplete.append(version)
    return VersionScan(tuple(sorted(published)), tuple(sorted(incomplete)), tuple(sorted(invalid)))


def list_versions(root: Path, model: str) -> list[int]:
    """Published versions of a model, ascending: half-written, half-copied or foreign entries
    are left out (see `scan_versions`)."""
    return list(scan_versions(root, model).published)


def all_version_numbers(root: Path, model: str) -> list[int]:
    """Every version number in use, published or not (the publisher never reuses one)."""
    scan = scan_versions(root, model)
    return sorted(scan.published + scan.incomplete)


# -- the READY marker --------------------------------------------------------------------------


def read_ready(directory: Path) -> dict[str, Any] | None:
    """The READY marker of a version directory, or None when it is absent or unreadable."""
    try:
        data = json.loads((directory / READY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_published(root: Path, model: str, version: int) -> bool:
    """A version is published when its READY marker names it and every model published with it
    (the marker's `models`) has its READY marker for the same version too."""
    marker = read_ready(version_dir(root, model, version))
    if marker is None or marker.get("version") != version:
        return False
    models = marker.get("models")
    if not isinstance(models, list) or model not in models:
        return False
    for other in models:
        if other == model:
            continue
        if not isinstance(other, str) or other.startswith(".") or "/" in other:
            return False
        sibling = read_ready(version_dir(root, other, version))
        if sibling is None or sibling.get("version") != version:
            return False
    return True


def write_ready(directory: Path, version: int, models: Sequence[str]) -> None:
    """Write a version's READY marker atomically (a temporary file renamed into place)."""
    write_text_atomic(
        directory / READY_FILE, json.dumps({"version": version, "models": list(models)}) + "\n"
    )


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` through a hidden temporary file in its directory, mode 0644, fsynced."""
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- files and metadata ------------------------------------------------------------------------


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from one file of a version (metadata.json, users.json, items.json)."""
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as exc:
        raise RepositoryError(f"{path} is missing") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise RepositoryError(f"{path} cannot be read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise RepositoryError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RepositoryError(f"{path} must hold a JSON object")
    return data


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")


def read_metadata(directory: Path) -> dict[str, Any]:
    """The parsed metadata.json of a version directory."""
    return read_json(directory / METADATA_FILE)


def published_timestamp(metadata: dict[str, Any]) -> float | None:
    """When training made the version (`created_at`, ISO 8601), as Unix seconds; None when the
    metadata does not say or says it in another form."""
    created = metadata.get("created_at")
    if not isinstance(created, str):
        return None
    try:
        moment = datetime.fromisoformat(created)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def verify_version(directory: Path) -> dict[str, Any]:
    """Check that every file listed in metadata.json exists with its SHA-256; return the metadata."""
    metadata = read_metadata(directory)
    files = metadata.get("files")
    if not isinstance(files, dict) or not files:
        raise RepositoryError(f"{directory / METADATA_FILE} lists no files")
    for name, expected in files.items():
        path = directory / str(name)
        if not path.is_file():
            raise RepositoryError(f"{path} is listed in metadata.json but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise RepositoryError(
                f"{path} is corrupt: SHA-256 {actual[:12]}… does not match {str(expected)[:12]}…"
            )
    return metadata


def model_kind(metadata: dict[str, Any], name: str) -> str:
    """The kind of a model ('ranker' or 'retrieval'): metadata.json's `kind`, else the name's
    suffix, else 'ranker' (versions written before the field existed)."""
    kind = metadata.get("kind")
    if isinstance(kind, str) and kind:
        return kind
    return "retrieval" if name.endswith("-retrieval") else "ranker"


# -- signatures --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    """One input or output of a graph: name, datatype (the Open Inference Protocol's spelling)
    and shape (-1 for a dimension of any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def to_json(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }


# The ranker contract: two index vectors in, one score per pair out (score[i] for pair i).
USER_INPUT = "user_index"
ITEM_INPUT = "item_index"
SCORE_OUTPUT = "score"
USER_EMBEDDING = "user_embedding"
ITEM_EMBEDDING = "item_embedding"
RANKER_SIGNATURE = Signature(
    inputs=(Tensor(USER_INPUT, "INT64", (-1,)), Tensor(ITEM_INPUT, "INT64", (-1,))),
    outputs=(Tensor(SCORE_OUTPUT, "FP32", (-1,)),),
)


# Feature rankers: one row of request-time features per candidate in, one score per row out. The
# metadata's `features` names the columns and the retrieval version whose features it expects.
FEATURES_INPUT = "features"


def feature_ranker_signature(n_features: int) -> Signature:
    """features FP32 [-1, n_features] -> score FP32 [-1]."""
    return Signature(
        inputs=(Tensor(FEATURES_INPUT, "FP32", (-1, n_features)),),
        outputs=(Tensor(SCORE_OUTPUT, "FP32", (-1,)),),
    )


def ranker_signature_for(metadata: dict[str, Any], where: Path) -> Signature:
    """The contract a ranker version must meet, by what its metadata declares: the feature
    ranker's when its inputs are `features` (with as many columns as `features.names`), else the
    dot-product ranker's (user_index, item_index)."""
    declared = declared_signature(metadata, where)
    if declared.input_names != [FEATURES_INPUT]:
        return RANKER_SIGNATURE
    names = (metadata.get("features") or {}).get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise RepositoryError(
            f"{where}/{METADATA_FILE}: a feature ranker needs features.names (a list of strings)"
        )
    return feature_ranker_signature(len(names))


def user_tower_signature(dim: int) -> Signature:
    """The retrieval model's user tower: user_index INT64 [-1] -> user_embedding FP32 [-1, dim]."""
    return Signature(
        (Tensor(USER_INPUT, "INT64", (-1,)),), (Tensor(USER_EMBEDDING, "FP32", (-1, dim)),)
    )


def item_tower_signature(dim: int) -> Signature:
    """The item tower: item_index INT64 [-1] -> item_embedding FP32 [-1, dim]."""
    return Signature(
        (Tensor(ITEM_INPUT, "INT64", (-1,)),), (Tensor(ITEM_EMBEDDING, "FP32", (-1, dim)),)
    )


_ORT_TYPES = {
    "INT64": "tensor(int64)",
    "INT32": "tensor(int32)",
    "FP32": "tensor(float)",
    "FP64": "tensor(double)",
}


class GraphArg(Protocol):
    """What ONNX Runtime's NodeArg offers: name, type ('tensor(float)') and shape."""

    @property
    def name(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def shape(self) -> Sequence[Any]: ...


def declared_signature(metadata: dict[str, Any], where: Path) -> Signature:
    """The signature metadata.json declares; RepositoryError when it is malformed."""

    def tensors(key: str) -> tuple[Tensor, ...]:
        items = metadata.get(key)
        if not isinstance(items, list) or not items:
            raise RepositoryError(f"{where}/{METADATA_FILE}: '{key}' must be a non-empty list")
        out = []
        for item in items:
            if not isinstance(item, dict):
                raise RepositoryError(f"{where}/{METADATA_FILE}: {key} entry {item!r} is no object")
            name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
            if (
                not isinstance(name, str)
                or datatype not in _ORT_TYPES
                or not isinstance(shape, list)
                or not shape
                or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            ):
                raise RepositoryError(
                    f"{where}/{METADATA_FILE}: {key} entry {item!r} needs a name, a datatype "
                    f"({', '.join(_ORT_TYPES)}) and a shape of integers"
                )
            out.append(Tensor(name, datatype, tuple(shape)))
        return tuple(out)

    return Signature(tensors("inputs"), tensors("outputs"))


def _show(t: Tensor) -> str:
    return f"{t.name} {t.datatype} {list(t.shape)}"


def _shapes(tensors: Iterable[Tensor]) -> list[tuple[str, str, int, tuple[int, ...]]]:
    """Names, datatypes, ranks and the fixed (non-batch) dimensions."""
    return [(t.name, t.datatype, len(t.shape), tuple(t.shape[1:])) for t in tensors]


def check_signature(
    metadata: dict[str, Any],
    graph_inputs: Sequence[GraphArg],
    graph_outputs: Sequence[GraphArg],
    where: Path,
    *,
    expected: Signature | None = None,
    graph_file: str = MODEL_FILE,
) -> Signature:
    """The one signature check: metadata.json's declared inputs and outputs must be `expected`
    (names, datatypes and ranks; when given), and the graph's must be the declared ones, in order.
    Returns the declared signature; raises RepositoryError naming the first difference."""
    declared = declared_signature(metadata, where)
    for what, want, have in (
        ("inputs", expected.inputs if expected else None, declared.inputs),
        ("outputs", expected.outputs if expected else None, declared.outputs),
    ):
        if want is not None and _shapes(want) != _shapes(have):
            raise RepositoryError(
                f"{where}/{METADATA_FILE} declares {what} {[_show(t) for t in have]}; "
                f"this model kind needs {[_show(t) for t in want]}"
            )
    for what, args, tensors in (
        ("inputs", graph_inputs, declared.inputs),
        ("outputs", graph_outputs, declared.outputs),
    ):
        names = [a.name for a in args]
        if names != [t.name for t in tensors]:
            raise RepositoryError(
                f"{where}/{graph_file} has {what} {names}; {METADATA_FILE} declares "
                f"{[t.name for t in tensors]}"
            )
        for arg, tensor in zip(args, tensors, strict=True):
            if arg.type != _ORT_TYPES[tensor.datatype]:
                raise RepositoryError(
                    f"{where}/{graph_file}: {what[:-1]} {arg.name!r} is {arg.type}, expected "
                    f"{_ORT_TYPES[tensor.datatype]} ({tensor.datatype})"
                )
            if len(arg.shape) != len(tensor.shape):
                raise RepositoryError(
                    f"{where}/{graph_file}: {what[:-1]} {arg.name!r} has shape {list(arg.shape)}, "
                    f"expected {len(tensor.shape)} dimension(s) {list(tensor.shape)}"
                )
    return declared


# -- Triton ------------------------------------------------------------------------------------


def triton_config(name: str, signature: Signature, *, max_batch_size: int = 65536) -> str:
    """The Triton config.pbtxt of an ONNX model with this signature. The first dimension of every
    tensor is the batch (Triton's dynamic batcher may join requests along it); a 1-D tensor is
    declared as one element per batch row, reshaped to a scalar."""

    def tensor(t: Tensor) -> str:
        dims = ", ".join(str(int(d)) for d in t.shape[1:])
        shape = f"dims: [ {dims} ]" if dims else "dims: [ 1 ]\n    reshape: { shape: [ ] }"
        return f'  {{\n    name: "{t.name}"\n    data_type: TYPE_{t.datatype}\n    {shape}\n  }}'

    return (
        f'name: "{name}"\n'
        'backend: "onnxruntime"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n" + ",\n".join(tensor(t) for t in signature.inputs) + "\n]\n"
        "output [\n" + ",\n".join(tensor(t) for t in signature.outputs) + "\n]\n"
        "dynamic_batching { }\n"
        "instance_group [ { kind: KIND_CPU } ]\n"
    )


# -- vocabularies and the item catalogue -------------------------------------------------------


@dataclass(frozen=True)
class Users:
    """users.json: `ids[i]` is the user of index i; `kinds[i]` is 'target' or 'mapped'."""

    ids: list[str]
    kinds: list[str]


@dataclass(frozen=True)
class ItemCatalogue:
    """items.json: `ids[i]` is the item of index i, with its title ('' when none) and popularity
    (target-domain training interactions)."""

    ids: list[str]
    titles: list[str]
    popularity: list[float]


def _id_list(data: dict[str, Any], path: Path) -> list[str]:
    ids = data.get("ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
        raise RepositoryError(f"{path}: 'ids' must be a non-empty list of non-empty strings")
    if len(set(ids)) != len(ids):
        raise RepositoryError(f"{path}: 'ids' holds duplicates")
    return ids


def read_users(path: Path) -> Users:
    data = read_json(path)
    ids = _id_list(data, path)
    kinds = data.get("kinds", ["target"] * len(ids))
    if not isinstance(kinds, list) or len(kinds) != len(ids):
        raise RepositoryError(f"{path}: 'kinds' must be a list as long as 'ids'")
    if not all(isinstance(k, str) and k in USER_KINDS for k in kinds):
        raise RepositoryError(f"{path}: every kind must be one of {USER_KINDS}")
    return Users(ids, kinds)


def read_items(path: Path) -> ItemCatalogue:
    data = read_json(path)
    ids = _id_list(data, path)
    titles = data.get("titles")
    if titles is None:
        titles = [None] * len(ids)
    if not isinstance(titles, list) or len(titles) != len(ids):
        raise RepositoryError(f"{path}: 'titles' must be a list as long as 'ids' (or absent)")
    if not all(t is None or isinstance(t, str) for t in titles):
        raise RepositoryError(f"{path}: every title must be a string or null")
    popularity = data.get("popularity")
    if popularity is None:
        popularity = [0] * len(ids)
    if not isinstance(popularity, list) or len(popularity) != len(ids):
        raise RepositoryError(f"{path}: 'popularity' must be a list as long as 'ids' (or absent)")
    if not all(
        isinstance(p, int | float) and not isinstance(p, bool) and math.isfinite(p) and p >= 0
        for p in popularity
    ):
        raise RepositoryError(f"{path}: every popularity must be a finite number >= 0")
    return ItemCatalogue(ids, [t or "" for t in titles], [float(p) for p in popularity])


def write_users(path: Path, ids: Sequence[str], kinds: Sequence[str] | None = None) -> None:
    write_json(path, {"ids": list(ids), "kinds": list(kinds or ["target"] * len(ids))})


def write_items(
    path: Path,
    ids: Sequence[str],
    titles: Sequence[str | None] | None = None,
    popularity: Sequence[int | float] | None = None,
) -> None:
    write_json(
        path,
        {
            "ids": list(ids),
            "titles": list(titles) if titles is not None else [None] * len(ids),
            "popularity": list(popularity) if popularity is not None else [0] * len(ids),
        },
    )
