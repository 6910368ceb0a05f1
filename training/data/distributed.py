"""Preparing a data set on Ray Data: Parquet or delimited text interactions in, a prepared
folder out.

``prepare`` reads every domain of a ``dataset.toml`` data set (Parquet: a file, or a folder of
files; CSV and other delimited text), cleans and checks the ids as the single-machine loader does,
maps them to
int32 codes, removes duplicate (user, item) rows (the last one kept, the same rule and counts as
``dataset.deduplicate``), applies an optional rating threshold and writes the layout of
training/data/prepared.py, partitioned by user code range. ``load_dataset`` reads the result.

What runs where:

* **Driver**, metadata only: the declaration, the Parquet footers (one work item per row group)
  and the text files' splits (one work item per ``split_bytes`` of a file, cut at a line end:
  the driver reads a line at each cut), numbered in input order; the input's fingerprint, the
  vocabularies, the manifest.
* **Ray tasks**, one per work item: reading, cleaning and checking (pass 1, which returns the
  item's distinct users and items and its row and line counts, or the error that names the file
  and row or line), then reading again and looking each id up in the vocabularies (pass 2, int32
  codes plus the row's position and its user partition).

A text split is read with the single-machine text reader on its bytes, after the file's header
(or, without one, after its first row, which fixes the number of fields and is dropped again), so
that every split is checked as the whole file would be; its errors name the line in the file
(the driver adds the lines of the splits before it). A line break inside a quoted field would be
cut: the distributed path reads one record per line.
* **Ray shuffle** (``groupby("part").map_groups``, sort-based): every partition's rows meet in one
  task, which de-duplicates them (the last row of a pair in input order wins), applies the
  threshold and writes ``part-p.parquet``; it returns only its counts.

The one global step is the vocabulary: the sorted distinct users (over all domains) and items
(per domain) are merged on the driver from the per-row-group uniques and then sent to the tasks
through the object store. Its memory grows with the number of distinct ids (their length plus 4
bytes each, held once on the driver and once per node's object store), not with the rows; the
per-row work grows with the rows and spreads over the cluster, a partition at a time per task
(about 20 bytes per row of the partition). The input and output folders must be reachable under
the same path from every node (a shared file system on a cluster), and every node needs this
package installed (the tasks are its functions).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from training.data import prepared as layout
from training.data.dataset import (
    BATCH_ROWS,
    TRAIN,
    DistinctIds,
    DomainSpec,
    _clean_parquet_batch,
    _fingerprint,
    _require,
    declared_specs,
    file_format,
    last_of_pairs,
    read_titles,
)
from training.errors import DataError, TrainingError

logger = logging.getLogger(__name__)

ROWS_PER_PART = 1 << 22  # the default partition size: rows of the largest domain per partition
SPLIT_BYTES = 1 << 26  # the default work item of a text file: 64 MiB (about 2 M rows of ids)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a domain name usable as a folder name
_USER, _ITEM, _ERROR, _COUNT = 0, 1, 2, 3  # the roles of pass 1's output rows


def _ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise TrainingError(
            "the distributed path needs Ray Data: pip install 'recsys-transfer[distributed]' "
            "(or '.[distributed]' in a checkout)"
        ) from None
    return ray


def connect(
    address: str | None = None, num_cpus: int | None = None, object_store_mib: int | None = None
) -> bool:
    """Join the Ray cluster at ``address``, or start a local one (``num_cpus``: all by default;
    ``object_store_mib``: Ray's default, 30 % of the memory, when None); nothing when this process
    is connected already. True when this call connected."""
    if num_cpus is not None and num_cpus < 1:
        raise TrainingError(f"--num-cpus must be at least 1, got {num_cpus}")
    if object_store_mib is not None and object_store_mib < 64:
        raise TrainingError(f"--object-store-mib must be at least 64, got {object_store_mib}")
    if address and (num_cpus is not None or object_store_mib is not None):
        raise TrainingError("--num-cpus and --object-store-mib size a local Ray, not --address")
    ray = _ray()
    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            store = None if object_store_mib is None else object_store_mib * 1024 * 1024
            ray.init(
                num_cpus=num_cpus,
                object_store_memory=store,
                include_dashboard=False,
                log_to_driver=False,
            )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"--address {address}" if address else "a local Ray instance"
        raise TrainingError(f"{where}: cannot start or reach Ray ({exc})") from None
    return True


def disconnect() -> None:
    _ray().shutdown()


# ----------------------------------------------------------------------------- the plan


def _columns(spec: DomainSpec) -> dict[str, str]:
    return {role: str(col) for role, col in spec.columns.items() if col is not None}


def _item(index: int, d: int, file: str, split: int, **where: int) -> dict[str, Any]:
    """A work item: a Parquet row group (``row_group`` >= 0, its first row in the file) or a split
    of a text file (``row_group`` -1: bytes ``start:stop``, read after the header or first row at
    ``head_start:head_stop``); ``row``, its first row in the domain, is set after pass 1."""
    keys = ("row_group", "file_row", "row", "start", "stop", "head_start", "head_stop")
    return {"index": index, "domain": d, "file": file, "split": split} | {
        k: where.get(k, 0) for k in keys
    }


def _head(file: Path, header: bool, delimiter: str) -> tuple[int, int]:
    """The byte range of the line each later split of a text file is read after: the header, or
    without one the first row with a field that is not blank (the row that fixes the width)."""
    with file.open("rb") as fh:
        start = 0
        while line := fh.readline():
            if header or line.strip(b" \t\r\n" + delimiter.encode()):
                return start, start + len(line)
            start += len(line)
    return 0, 0


def _text_splits(file: Path, split_bytes: int, head_stop: int) -> list[tuple[int, int]]:
    """The byte ranges of about ``split_bytes`` each that cut ``file`` at line ends, the first
    holding the head line whole. Reads one line per cut."""
    size = file.stat().st_size
    cuts = [0]
    with file.open("rb") as fh:
        pos = max(split_bytes, head_stop)
        while pos < size:
            fh.seek(pos - 1)  # a line that starts at pos makes pos itself the cut
            fh.readline()
            cut = fh.tell()
            if cut >= size:
                break
            cuts.append(cut)
            pos = cut + split_bytes
    cuts.append(size)
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _plan(specs: list[DomainSpec], decl: Path, split_bytes: int) -> list[list[dict[str, Any]]]:
    """Every domain's work items in input order: one per non-empty Parquet row group, one per
    split of a text file. Reads footers and one line per cut."""
    plans: list[list[dict[str, Any]]] = []
    index = 0
    for d, spec in enumerate(specs):
        if not _NAME.fullmatch(spec.name):
            raise DataError(
                f"{decl}: domain {spec.name!r}: a prepared data set names a folder after each "
                "domain; use letters, digits, '.', '_' and '-'"
            )
        items: list[dict[str, Any]] = []
        for part, code in spec.parts:
            split = TRAIN if code is None else code
            fmt = file_format(part, spec.fmt)
            if fmt != "parquet":
                _require(part)
                delimiter = spec.delimiter or ("," if fmt == "csv" else "\t")
                head_start, head_stop = _head(part, spec.header, delimiter)
                for start, stop in _text_splits(part, split_bytes, head_stop):
                    items.append(
                        _item(
                            index,
                            d,
                            str(part),
                            split,
                            row_group=-1,
                            start=start,
                            stop=stop,
                            head_start=head_start,
                            head_stop=head_stop,
                        )
                    )
                    index += 1
                continue
            spec.batches(part)  # checks the file exists and its columns and their types
            for file in pads.dataset(part, format="parquet").files:
                try:
                    meta = pq.ParquetFile(file).metadata
                except (pa.ArrowInvalid, OSError) as exc:
                    raise DataError(f"{file}: not a Parquet file ({exc})") from None
                file_row = 0
                for rg in range(meta.num_row_groups):
                    n = meta.row_group(rg).num_rows
                    if n:
                        items.append(_item(index, d, file, split, row_group=rg, file_row=file_row))
                        index += 1
                    file_row += n
        plans.append(items)
    return plans


# ----------------------------------------------------------------------------- in the tasks


def _read(item: dict[str, Any], spec: DomainSpec) -> tuple[pa.Table, int]:
    """One work item, cleaned and checked as the single-machine loader does (DataError naming
    the file and row, or for text the line counted within the split, the head line being line
    1 after the first split); columns user, item, [rating, timestamp]; and for text the number
    of line ends in the split."""
    if item["row_group"] < 0:
        return _read_text(item, spec)
    return _read_row_group(item, _columns(spec)), 0


def _read_text(item: dict[str, Any], spec: DomainSpec) -> tuple[pa.Table, int]:
    file = Path(item["file"])
    try:
        with file.open("rb") as fh:
            head = b""
            if item["start"]:
                fh.seek(item["head_start"])
                head = fh.read(item["head_stop"] - item["head_start"])
            fh.seek(item["start"])
            body = fh.read(item["stop"] - item["start"])
    except OSError as exc:
        raise DataError(f"{file}: unreadable ({exc})") from None
    batches = list(spec.batches_of(file, head + body)())
    table = pa.Table.from_batches(batches) if batches else _empty(spec)
    if head and not spec.header:
        table = table.slice(1)  # the first row of the file, read again for its width
    return table, body.count(b"\n")


def _empty(spec: DomainSpec) -> pa.Table:
    types = {"user": pa.string(), "item": pa.string()}
    types |= {"rating": pa.float32(), "timestamp": pa.int64()}
    return pa.table({r: pa.array([], t) for r, t in types.items() if r in _columns(spec)})


def _read_row_group(item: dict[str, Any], cols: dict[str, str]) -> pa.Table:
    file = Path(item["file"])
    try:
        table = pq.ParquetFile(file).read_row_group(
            item["row_group"], columns=sorted(set(cols.values()))
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(
            f"{file}: unreadable Parquet row group {item['row_group']} ({exc})"
        ) from None
    at = item["file_row"]
    out = []
    for b in table.to_batches(max_chunksize=BATCH_ROWS):
        out.append(_clean_parquet_batch(file, b, cols, at))
        at += b.num_rows
    return pa.Table.from_batches(out)


def _uniques(batch: pa.Table, specs: list[DomainSpec]) -> pa.Table:
    """Pass 1: the distinct users and items of each work item and its row and line counts (one
    row of role _COUNT), or its error (for a text split, ``count`` is the line it names counted
    from the split's first line, for the driver to make a line of the file; 0 otherwise)."""
    parts = []
    for item in batch.to_pylist():
        d = item["domain"]
        try:
            table, lines = _read(item, specs[d])
        except DataError as exc:
            message, line = str(exc), 0
            local = re.match(re.escape(item["file"]) + r":(\d+):", message)
            if item["start"] and local and int(local.group(1)) > 1:
                line = int(local.group(1)) - 1  # the head line is line 1
            values, roles = pa.array([message]), np.array([_ERROR], np.int8)
            counts = np.array([line], np.int64)
        else:
            u, i = (pc.unique(table.column(c)) for c in ("user", "item"))
            values = pa.concat_arrays([u, i, pa.array([str(lines)])])
            roles = np.r_[
                np.full(len(u), _USER, np.int8), np.full(len(i), _ITEM, np.int8), [_COUNT]
            ]
            counts = np.r_[np.zeros(len(u) + len(i), np.int64), [table.num_rows]]
        parts.append(
            pa.table(
                {
                    "index": np.full(len(values), item["index"], np.int64),
                    "domain": np.full(len(values), d, np.int32),
                    "role": roles,
                    "value": values,
                    "count": counts,
                }
            )
        )
    return pa.concat_tables(parts)


def _codes(ids: pa.ChunkedArray, vocab: pa.Array, file: str) -> np.ndarray:
    codes = pc.index_in(ids, value_set=vocab)
    if codes.null_count:
        raise DataError(f"{file}: an id not seen by the first pass; did the file change?")
    return codes.to_numpy().astype(np.int32, copy=False)


def _encode(
    batch: pa.Table,
    spec: DomainSpec,
    users_ref: Any,
    items_ref: Any,
    n_parts: int,
    has_split: bool,
) -> pa.Table:
    """Pass 2: each work item's rows as codes, with their position in the domain's input and
    their user partition."""
    import ray

    users, items = ray.get(users_ref), ray.get(items_ref)
    parts = []
    for item in batch.to_pylist():
        table, _ = _read(item, spec)
        n = table.num_rows
        user = _codes(table.column("user"), users, item["file"])
        out: dict[str, Any] = {
            "part": layout.part_of(user, len(users), n_parts),
            "user": user,
            "item": _codes(table.column("item"), items, item["file"]),
            "row": item["row"] + np.arange(n, dtype=np.int64),
        }
        for c in ("rating", "timestamp"):
            if c in table.column_names:
                out[c] = table.column(c)
        if has_split:
            out["split"] = np.full(n, item["split"], np.int8)
        parts.append(pa.table(out))
    return pa.concat_tables(parts)


def _write_part(
    group: pa.Table, folder: str, n_items: int, threshold: float | None, columns: list[str]
) -> pa.Table:
    """The rows of one user partition: de-duplicated (the last row of a pair in input order),
    filtered by the threshold, written sorted by input position; returns the counts."""
    p = int(group.column("part")[0].as_py())
    order = np.argsort(group.column("row").to_numpy(), kind="stable")
    col = {c: group.column(c).to_numpy()[order] for c in ("user", "item", "row", *columns)}
    del group, order
    ratings = col.get("rating")
    keep, conflicting = last_of_pairs(col["user"], col["item"], n_items, ratings)
    unique = int(keep.size)
    if threshold is not None and ratings is not None:
        keep = keep[ratings[keep] >= threshold]
    table = pa.table({c: v[keep] for c, v in col.items()})
    path = Path(folder) / layout.part_name(p)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # a task run again replaces the file whole
    return pa.table(
        {
            "part": [p],
            "rows": [len(col["user"])],
            "unique_pairs": [unique],
            "conflicting_pairs": [conflicting],
            "positives": [int(keep.size)],
        }
    )


# ----------------------------------------------------------------------------- on the driver


def _vocabularies(
    plans: list[list[dict[str, Any]]], specs: list[DomainSpec]
) -> tuple[pa.Array, list[pa.Array], list[int]]:
    """Pass 1 on Ray; the sorted users of every domain, each domain's sorted items and number of
    rows. Sets every work item's first row in its domain (``row``) from the counts."""
    ray = _ray()
    work = [item for items in plans for item in items]
    ds = ray.data.from_items(work, override_num_blocks=max(1, len(work)))
    out = ds.map_batches(_uniques, batch_size=1, batch_format="pyarrow", fn_kwargs={"specs": specs})
    users = DistinctIds()
    items = [DistinctIds() for _ in plans]
    errors: list[tuple[int, str, int]] = []
    rows: dict[int, int] = {}
    lines: dict[int, int] = {}
    for block in out.iter_batches(batch_size=None, batch_format="pyarrow"):
        role = block.column("role")
        bad = block.filter(pc.equal(role, _ERROR))
        errors += zip(
            *(bad.column(c).to_pylist() for c in ("index", "value", "count")), strict=True
        )
        counted = block.filter(pc.equal(role, _COUNT))
        for i, n, v in zip(
            *(counted.column(c).to_pylist() for c in ("index", "count", "value")), strict=True
        ):
            rows[i], lines[i] = n, int(v)
        users.add(block.filter(pc.equal(role, _USER)).column("value").combine_chunks())
        for d, merged in enumerate(items):
            mine = pc.and_(pc.equal(role, _ITEM), pc.equal(block.column("domain"), d))
            merged.add(block.filter(mine).column("value").combine_chunks())
    if errors:
        index, message, line = min(errors)  # the first problem in input order
        if line:  # a text split's line: count the line ends of the file's splits before it
            item = work[index]
            before = sum(
                lines[w["index"]]
                for w in work
                if w["file"] == item["file"] and w["start"] < item["start"]
            )
            message = message.replace(
                f"{item['file']}:{line + 1}:", f"{item['file']}:{before + line}:", 1
            )
        raise DataError(message)
    totals = []
    for plan in plans:
        row = 0
        for item in plan:
            item["row"] = row
            row += rows[item["index"]]
        totals.append(row)
    return users.sorted(), [m.sorted() for m in items], totals


def _domain(
    spec: DomainSpec,
    items: list[dict[str, Any]],
    users: Any,
    item_vocab: pa.Array,
    n_users: int,
    n_parts: int,
    threshold: float | None,
    folder: Path,
) -> tuple[list[str], dict[str, int], list[dict[str, int]]]:
    """Pass 2 and the shuffle of one domain; its columns, counts and per-partition counts."""
    ray = _ray()
    has_split = any(code is not None for _, code in spec.parts)
    columns = [c for c in ("rating", "timestamp") if spec.columns[c] is not None]
    columns += ["split"] if has_split else []
    folder.mkdir(parents=True, exist_ok=True)
    if not items:
        return (
            columns,
            {"rows": 0, "unique_pairs": 0, "duplicate_rows_removed": 0, "conflicting_pairs": 0},
            [],
        )
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    encoded = ds.map_batches(
        _encode,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={
            "spec": spec,
            "users_ref": users,
            "items_ref": ray.put(item_vocab),
            "n_parts": n_parts,
            "has_split": has_split,
        },
    )
    written = encoded.groupby("part").map_groups(
        _write_part,
        batch_format="pyarrow",
        fn_kwargs={
            "folder": str(folder),
            "n_items": len(item_vocab),
            "threshold": threshold,
            "columns": columns,
        },
    )
    parts = sorted(written.take_all(), key=lambda r: r["part"])
    total = {
        k: sum(int(r[k]) for r in parts) for k in ("rows", "unique_pairs", "conflicting_pairs")
    }
    stats = {
        "rows": total["rows"],
        "unique_pairs": total["unique_pairs"],
        "duplicate_rows_removed": total["rows"] - total["unique_pairs"],
        "conflicting_pairs": total["conflicting_pairs"],
    }
    if threshold is not None and "rating" in columns:
        stats["positives"] = sum(int(r["positives"]) for r in parts)
        if stats["unique_pairs"] and not stats["positives"]:
            raise DataError(
                f"domain {spec.name!r}: no rating reaches rating_threshold = {threshold:g}, so "
                "every row would be dropped; lower the threshold or prepare without one"
            )
    per_part = [{k: int(v) for k, v in r.items()} for r in parts]
    return columns, stats, per_part


def _write_ids(file: Path, ids: pa.Array, **extra: pa.Array) -> None:
    pq.write_table(pa.table({"id": ids, **extra}), file)


def default_partitions(rows: list[int]) -> int:
    """One partition per ``ROWS_PER_PART`` rows of the largest domain (at least one)."""
    return max(1, math.ceil(max(rows, default=0) / ROWS_PER_PART))


def prepare(
    dataset: Path,
    out: Path,
    partitions: int = 0,
    rating_threshold: float | None = None,
    split_bytes: int = SPLIT_BYTES,
) -> dict[str, Any]:
    """Prepare the ``dataset.toml`` data set in folder ``dataset`` into the new folder ``out``
    on the connected Ray cluster (a local one is started if there is none); ``partitions``: the
    number of user partitions (0: ``default_partitions``); ``split_bytes``: the size of a text
    file's work items. Returns the manifest."""
    ray = _ray()
    t0 = time.perf_counter()
    dataset, out = Path(dataset), Path(out)
    if not (dataset / "dataset.toml").is_file():
        raise DataError(
            f"{dataset}: no dataset.toml; the distributed path reads a declared data set "
            "(training/README.md documents dataset.toml)"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not an empty folder; choose a new output folder")
    if partitions < 0:
        raise DataError(f"partitions must be positive (or 0 for the default), got {partitions}")
    if split_bytes < 1:
        raise DataError(f"split_bytes must be positive, got {split_bytes}")
    name, specs = declared_specs(dataset)
    plans = _plan(specs, dataset / "dataset.toml", split_bytes)
    titles = [read_titles(s.titles, s.title_item) if s.titles is not None else None for s in specs]
    context = ray.data.DataContext.get_current()
    # the sort-based shuffle: no long-lived aggregator actors, and groups arrive whole
    context.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    users, item_vocabs, rows = _vocabularies(plans, specs)
    n_parts = partitions or default_partitions(rows)
    logger.info("vocabularies: %d users, items %s", len(users), [len(v) for v in item_vocabs])
    out.mkdir(parents=True, exist_ok=True)
    _write_ids(out / layout.USERS, users)
    users_ref = ray.put(users)
    domains: dict[str, Any] = {}
    for spec, items, vocab, title in zip(specs, plans, item_vocabs, titles, strict=True):
        folder = out / spec.name
        columns, stats, per_part = _domain(
            spec, items, users_ref, vocab, len(users), n_parts, rating_threshold, folder
        )
        _write_ids(folder / layout.ITEMS, vocab)
        if title is not None:
            keys = sorted(title)
            _write_ids(
                folder / layout.TITLES,
                pa.array(keys, pa.string()),
                title=pa.array([title[k] for k in keys], pa.string()),
            )
        domains[spec.name] = {
            "items": len(vocab),
            "columns": columns,
            "files": [layout.part_name(r["part"]) for r in per_part],
            "stats": stats,
            "partitions": per_part,
        }
        logger.info("domain %s: %s", spec.name, stats)
    manifest = {
        "format": layout.FORMAT,
        "format_version": layout.FORMAT_VERSION,
        "engine": "ray",
        "engine_version": ray.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset": name,
        "input": str(dataset.resolve()),
        "fingerprint": _fingerprint([f for s in specs for f, _ in s.parts]),
        "users": len(users),
        "partitions": n_parts,
        "partitioned_by": "user code range: partition = code * partitions // users",
        "rating_threshold": rating_threshold,
        "domains": domains,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    tmp = out / f".{layout.MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / layout.MANIFEST)  # last: the folder is complete
    return manifest
