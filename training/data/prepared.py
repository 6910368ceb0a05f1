"""The prepared data set layout: ids already mapped to int32 codes, partitioned by user.

``python -m training prepare`` (training/data/distributed.py) writes it; ``load_dataset`` reads
it like any data set folder, recognised by its manifest::

    prepared.json                 the manifest (written last: a folder without it is incomplete)
    users.parquet                 column "id": the sorted user ids of every domain; code i = row i
    <domain>/items.parquet        column "id": the domain's sorted item ids
    <domain>/titles.parquet       columns "id", "title" (when the data set declares titles)
    <domain>/part-00000.parquet   the interactions of users whose code c has c * P // U == 0
    <domain>/part-00001.parquet   ... (P partitions over U users, the same users in every domain)

A partition file holds the columns ``user`` and ``item`` (int32 codes), ``row`` (int64: the
interaction's position in the domain's input, counted over its files in order), and ``rating``
(float32), ``timestamp`` (int64) and ``split`` (int8, a given split) where the data has them; its
rows are de-duplicated (the last row of a pair kept) and sorted by ``row``. A training worker
``p`` of ``P`` reads ``part-p`` of every domain: its users' interactions, in both domains.

Loading a prepared folder gives the same ``Dataset`` as loading the raw folder: the rows in input
order (sorted by ``row``), each domain's user vocabulary cut to the users it has, the same
de-duplication counts and the raw input's fingerprint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from training.data.dataset import Dataset, DomainData, compact, stable_argsort
from training.errors import DataError

logger = logging.getLogger(__name__)

MANIFEST = "prepared.json"
FORMAT = "recsys-prepared"
FORMAT_VERSION = 1
USERS = "users.parquet"
ITEMS = "items.parquet"
TITLES = "titles.parquet"


def part_name(p: int) -> str:
    return f"part-{p:05d}.parquet"


def part_of(user_codes: np.ndarray, n_users: int, n_parts: int) -> np.ndarray:
    """The partition of every user code: contiguous code ranges, ``code * P // U``."""
    return (user_codes.astype(np.int64) * n_parts // max(1, n_users)).astype(np.int32)


def is_prepared(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: Path) -> dict[str, Any]:
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{file}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{file}: not a prepared data set manifest (format {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{file}: format_version {manifest.get('format_version')!r}, this loader reads "
            f"{FORMAT_VERSION}; prepare the data set again"
        )
    return manifest


def _ids(file: Path) -> pa.Array:
    try:
        column = pq.read_table(file, columns=["id"]).column("id")
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise DataError(f"{file}: unreadable vocabulary ({exc})") from None
    return column.combine_chunks()


def _domain(path: Path, name: str, info: dict[str, Any], users: pa.Array) -> DomainData:
    folder = path / name
    files = [folder / f for f in info["files"]]
    for f in files:
        if not f.is_file():
            raise DataError(f"{path}: missing partition {f} (listed in {MANIFEST})")
    columns = ["user", "item", "row", *info["columns"]]
    try:
        tables = [pq.read_table(f, columns=columns) for f in files]
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{folder}: unreadable partition ({exc})") from None
    schema = pa.schema(
        [
            ("user", pa.int32()),
            ("item", pa.int32()),
            ("row", pa.int64()),
            *[
                (c, {"rating": pa.float32(), "timestamp": pa.int64(), "split": pa.int8()}[c])
                for c in info["columns"]
            ],
        ]
    )
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    del tables
    order = stable_argsort(table.column("row").to_numpy())

    def col(c: str) -> np.ndarray:
        return table.column(c).to_numpy()[order]

    user_codes, user_vocab = compact(col("user"), users)
    titles: dict[str, str] = {}
    if (folder / TITLES).is_file():
        t = pq.read_table(folder / TITLES)
        titles = dict(zip(t.column("id").to_pylist(), t.column("title").to_pylist(), strict=True))
    return DomainData(
        name=name,
        ratings=col("rating") if "rating" in info["columns"] else None,
        timestamps=col("timestamp") if "timestamp" in info["columns"] else None,
        given_split=col("split") if "split" in info["columns"] else None,
        titles=titles,
        stats=dict(info["stats"]),
        user_codes=user_codes,
        user_vocab=user_vocab,
        item_codes=col("item"),
        item_vocab=_ids(folder / ITEMS),
    )


def load_prepared(path: Path) -> Dataset:
    """A prepared folder as the ``Dataset`` its raw input loads to."""
    path = Path(path)
    manifest = read_manifest(path)
    users = _ids(path / USERS)
    domains = {name: _domain(path, name, info, users) for name, info in manifest["domains"].items()}
    return Dataset(manifest["dataset"], path, domains, manifest["fingerprint"])
