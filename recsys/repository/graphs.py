"""Which ONNX graphs a ranker version holds and how their tensors are named: `graphs` in
metadata.json maps a precision ('fp32', 'int8') to a file of the version, and `graph_inputs` /
`graph_outputs` map the contract's tensor names to the graph's own (a graph exported elsewhere,
such as a peer server's, whose inputs are called differently)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys.repository.layout import METADATA_FILE, MODEL_FILE, GraphArg, RepositoryError

FP32 = "fp32"
INT8 = "int8"
PRECISIONS = (FP32, INT8)
INT8_MODEL_FILE = "model.int8.onnx"


def graph_files(metadata: Mapping[str, Any], where: Path) -> dict[str, str]:
    """precision -> file name of the graphs a version holds. Versions written before `graphs`
    existed hold one fp32 graph, model.onnx."""
    graphs = metadata.get("graphs")
    if graphs is None:
        return {FP32: MODEL_FILE}
    if (
        not isinstance(graphs, dict)
        or not graphs
        or not all(k in PRECISIONS and isinstance(v, str) and v for k, v in graphs.items())
    ):
        raise RepositoryError(
            f"{where}/{METADATA_FILE}: 'graphs' must map precisions ({', '.join(PRECISIONS)}) to "
            f"file names, not {graphs!r}"
        )
    for name in graphs.values():
        if Path(name).name != name:
            raise RepositoryError(
                f"{where}/{METADATA_FILE}: graph file {name!r} must be a file of the version"
            )
    return dict(graphs)


def choose_graph(metadata: Mapping[str, Any], where: Path, precision: str) -> tuple[str, str]:
    """(precision, file) to load for the wanted precision: that graph where the version has it,
    else its fp32 graph, else the one it has (the caller logs the fallback)."""
    files = graph_files(metadata, where)
    chosen = precision if precision in files else FP32 if FP32 in files else next(iter(files))
    return chosen, files[chosen]


@dataclass(frozen=True)
class _Renamed:
    """A graph argument under its contract name (what check_signature compares)."""

    name: str
    type: str
    shape: Sequence[Any]


@dataclass(frozen=True)
class GraphNames:
    """Contract tensor name -> the graph's name for it (identity where not declared)."""

    inputs: Mapping[str, str] = field(default_factory=dict)
    outputs: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], where: Path) -> GraphNames:
        maps = []
        for key in ("graph_inputs", "graph_outputs"):
            value = metadata.get(key, {})
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()
            ):
                raise RepositoryError(
                    f"{where}/{METADATA_FILE}: {key!r} must map tensor names to the graph's "
                    f"names, not {value!r}"
                )
            if len(set(value.values())) != len(value):
                raise RepositoryError(f"{where}/{METADATA_FILE}: {key!r} names a tensor twice")
            maps.append(dict(value))
        return cls(maps[0], maps[1])

    def input(self, name: str) -> str:
        return self.inputs.get(name, name)

    def output(self, name: str) -> str:
        return self.outputs.get(name, name)

    def feeds(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Session feeds keyed by the graph's input names."""
        if not self.inputs:
            return dict(feeds)
        return {self.input(k): v for k, v in feeds.items()}

    def as_contract(self, args: Sequence[GraphArg], outputs: bool = False) -> list[_Renamed]:
        """The graph's inputs (or outputs) under the contract's names, for check_signature."""
        mapping = self.outputs if outputs else self.inputs
        back = {graph: contract for contract, graph in mapping.items()}
        return [_Renamed(back.get(a.name, a.name), a.type, a.shape) for a in args]
