"""Which graph of a ranker version a server loads: the precision RANKING_PRECISION asks for
(fp32, or int8 where training exported a quantised graph beside it, else fp32 with a warning),
with the version's declared tensor-name mapping (recsys.repository.graphs)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys.repository.graphs import FP32, GraphNames, choose_graph
from recsys.repository.layout import MODEL_FILE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectedGraph:
    """The graph file a version is served from, its precision and its tensor names."""

    path: Path = Path(MODEL_FILE)
    precision: str = FP32
    names: GraphNames = field(default_factory=GraphNames)


def select_graph(
    name: str, version: int, directory: Path, metadata: dict[str, Any], precision: str
) -> SelectedGraph:
    """The graph to load for `precision`; RepositoryError for malformed metadata."""
    chosen, file = choose_graph(metadata, directory, precision)
    if chosen != precision:
        logger.warning(
            "%s v%d has no %s graph (metadata.json 'graphs'); serving its %s graph",
            name,
            version,
            precision,
            chosen,
        )
    return SelectedGraph(directory / file, chosen, GraphNames.from_metadata(metadata, directory))
