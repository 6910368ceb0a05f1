"""In-memory data set types and the loaders for every supported on-disk layout.

A data set is a folder plus a small declaration of its domains. The built-in folders of
``../shared/data`` are recognised by name, the DisenCDR layout (``X_Y/train.txt``, ``test.txt``)
under any name; any other folder declares itself in ``dataset.toml`` (keys in ``TOP_KEYS`` and
``DOMAIN_KEYS``, documented in training/README.md)::

    name = "my-pair"
    [domains.books]
    file = "books.csv"        # .csv, .tsv, .txt or RecBole atomic .inter
    user = "user_id"          # column names, or 0-based indices with header = false
    item = "item_id"
    rating = "rating"         # optional
    timestamp = "timestamp"   # optional
    titles = "items.csv"      # optional: a header with the item column and "title"

Every loader reports a malformed line with its file and line number and never drops it silently.
Duplicate (user, item) rows are removed deterministically (the last row wins) and counted.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import functools
import hashlib
import io
import logging
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads

from training.errors import DataError

logger = logging.getLogger(__name__)

TRAIN, VALID, TEST = 0, 1, 2  # codes of a split given with the data


Ids: TypeAlias = "np.ndarray | list[str] | pa.Array | pa.ChunkedArray"  # string ids


class DomainData:
    """All interactions of one domain. Ids are strings, held dictionary-encoded: ``user_codes`` and
    ``item_codes`` (int32, one per interaction) index the sorted, unique ``user_vocab`` and
    ``item_vocab`` (Arrow string arrays). ``users`` and ``items`` give the strings per interaction
    (an object array, built on demand: small data, tests and reports only)."""

    def __init__(
        self,
        name: str,
        users: Ids | None = None,
        items: Ids | None = None,
        ratings: np.ndarray | None = None,  # float32, explicit feedback
        timestamps: np.ndarray | None = None,  # int64
        given_split: np.ndarray | None = None,  # int8 TRAIN/VALID/TEST when the data fixes it
        titles: dict[str, str] | None = None,
        stats: dict[str, int] | None = None,
        *,
        user_codes: np.ndarray | None = None,
        user_vocab: pa.Array | None = None,
        item_codes: np.ndarray | None = None,
        item_vocab: pa.Array | None = None,
    ) -> None:
        if user_codes is None or user_vocab is None:
            if users is None:
                raise ValueError("DomainData needs users or user_codes and user_vocab")
            user_codes, user_vocab = encode_ids(users)
        if item_codes is None or item_vocab is None:
            if items is None:
                raise ValueError("DomainData needs items or item_codes and item_vocab")
            item_codes, item_vocab = encode_ids(items)
        self.name = name
        self.user_codes = np.asarray(user_codes, dtype=np.int32)
        self.item_codes = np.asarray(item_codes, dtype=np.int32)
        self.user_vocab = user_vocab
        self.item_vocab = item_vocab
        self.ratings = ratings
        self.timestamps = timestamps
        self.given_split = given_split
        self.titles = titles if titles is not None else {}
        self.stats = stats if stats is not None else {}

    def __len__(self) -> int:
        return int(self.user_codes.shape[0])

    def __repr__(self) -> str:
        return (
            f"DomainData({self.name!r}, {len(self)} interactions, {len(self.user_vocab)} users, "
            f"{len(self.item_vocab)} items)"
        )

    @property
    def users(self) -> np.ndarray:
        """The user id of every interaction (an object array of Python strings)."""
        return _strings(self.user_vocab)[self.user_codes]

    @property
    def items(self) -> np.ndarray:
        """The item id of every interaction (an object array of Python strings)."""
        return _strings(self.item_vocab)[self.item_codes]

    def take(self, keep: np.ndarray, **stats: int) -> DomainData:
        """The interactions selected by ``keep`` (a mask or indices), same vocabularies."""

        def cut(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[keep]

        return DomainData(
            name=self.name,
            ratings=cut(self.ratings),
            timestamps=cut(self.timestamps),
            given_split=cut(self.given_split),
            titles=self.titles,
            stats=dict(self.stats, **stats),
            user_codes=self.user_codes[keep],
            user_vocab=self.user_vocab,
            item_codes=self.item_codes[keep],
            item_vocab=self.item_vocab,
        )

    def positives(self, threshold: float | None) -> DomainData:
        """Interactions that count as positive feedback (rating >= threshold)."""
        if self.ratings is None or threshold is None:
            return self
        keep = self.ratings >= threshold
        if len(self) and not keep.any():
            low, high = float(self.ratings.min()), float(self.ratings.max())
            implicit = " (an implicit column of 1s needs rating_threshold = 1)" if high <= 1 else ""
            raise DataError(
                f"domain {self.name!r}: no rating reaches rating_threshold = {threshold:g} "
                f"(ratings {low:g} to {high:g}), so every row would be dropped{implicit}; set "
                "rating_threshold, or declare no rating column for implicit feedback"
            )
        return self.take(keep, positives=int(keep.sum()))


def _strings(vocab: pa.Array) -> np.ndarray:
    out = np.empty(len(vocab), dtype=object)
    out[:] = vocab.to_pylist()
    return out


def sorted_unique(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The distinct strings of ``values`` in code-point order (UTF-8 byte order is the same)."""
    uniq = pc.unique(values)
    if isinstance(uniq, pa.ChunkedArray):
        uniq = uniq.combine_chunks()
    return uniq.take(pc.array_sort_indices(uniq))


def encode_ids(values: Ids) -> tuple[np.ndarray, pa.Array]:
    """Dictionary-encode string ids: (int32 codes, the sorted unique ids they index)."""
    if isinstance(values, pa.Array | pa.ChunkedArray):
        arr = values
    else:
        arr = pa.array(np.asarray(values, dtype=object), type=pa.string())
    vocab = sorted_unique(arr)
    codes = pc.index_in(arr, value_set=vocab).to_numpy()
    return codes.astype(np.int32, copy=False), vocab


def stable_argsort(keys: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """The stable ``argsort`` of non-negative integer ``keys`` (of the rows in ``order``, when
    given: ties keep that order), as an LSD radix sort: one stable pass per 16 bits, each a
    linear-time counting sort in numpy instead of a comparison sort."""
    return _radix(keys, order)[0]


def _radix(keys: np.ndarray, order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``stable_argsort`` and the keys in that order."""
    index = np.int32 if keys.size < 1 << 31 else np.int64  # 4 bytes a row where they suffice
    order = np.arange(keys.size, dtype=index) if order is None else order.astype(index)
    if keys.size < 1 << 16:
        order = order[np.argsort(keys[order], kind="stable")]
        return order, keys[order]
    k = keys[order]
    top = int(k.max()) if k.size else 0
    if top < 1 << 31:
        k = k.astype(np.int32)
    shift = 0
    while shift == 0 or top >> shift:
        o = np.argsort(((k >> shift) & 0xFFFF).astype(np.uint16), kind="stable")
        order = order[o]
        k = k[o]
        del o
        shift += 16
    return order, k


def compact(codes: np.ndarray, vocab: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Drop the vocabulary entries no code uses (order kept); returns the new codes and vocab."""
    used = np.bincount(codes, minlength=len(vocab)) > 0
    if used.all():
        return codes, vocab
    new = (np.cumsum(used, dtype=np.int64) - 1).astype(np.int32)
    return new[codes], vocab.filter(pa.array(used))


def joint_codes(
    parts: list[tuple[np.ndarray, pa.Array]],
) -> tuple[pa.Array, list[np.ndarray]]:
    """One sorted vocabulary over several (codes, vocab) pairs, holding only the used ids, and
    every part's codes into it."""
    used = [compact(c, v) for c, v in parts]
    vocab = sorted_unique(pa.chunked_array([v for _, v in used], type=pa.string()))
    out = []
    for codes, v in used:
        remap = pc.index_in(v, value_set=vocab).to_numpy().astype(np.int32)
        out.append(remap[codes])
    return vocab, out


@dataclass
class Dataset:
    """A named set of domains read from one folder."""

    name: str
    path: Path
    domains: dict[str, DomainData]
    fingerprint: str = ""

    def domain(self, name: str) -> DomainData:
        if name not in self.domains:
            raise DataError(
                f"{self.path}: data set {self.name!r} has no domain {name!r}; "
                f"domains: {', '.join(sorted(self.domains))}"
            )
        return self.domains[name]


# ----------------------------------------------------------------------------- helpers


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"missing data file: expected {path}")
    return path


def _fingerprint(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    expanded = [q for p in paths for q in (sorted(p.rglob("*.parquet")) if p.is_dir() else [p])]
    for p in sorted(expanded):
        digest.update(p.name.encode())
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


# C0 control characters other than tab, CR and LF: never in a text table, always in a binary file
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _open_text(path: Path, data: bytes | None) -> BinaryIO:
    """``path`` opened for reading, or ``data`` (a part of it, read already) as a file."""
    return io.BytesIO(data) if data is not None else _require(path).open("rb")


def _decoded(path: Path, encoding: str = "utf-8", data: bytes | None = None) -> Iterator[str]:
    """The lines of ``path`` (newlines kept), each decoded on its own so that an error names it;
    ``data``: the bytes to read instead of the file, named as ``path``.

    Bytes that are not ``encoding`` text, and control characters such as NUL (a binary file, or an
    id a database padded), are refused with the file and line.
    """
    with _open_text(path, data) as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: not {encoding} text (byte 0x{raw[exc.start]:02x} at column "
                    f"{exc.start + 1}); is it a binary file?"
                ) from None
            bad = _CONTROL.search(line)
            if bad:
                raise DataError(
                    f"{path}:{lineno}: control character {bad.group()!r} at column "
                    f"{bad.start() + 1} (a binary file, or an id with a NUL byte)"
                )
            yield line


def _float(value: str, path: Path, lineno: int, what: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise DataError(f"{path}:{lineno}: {what} is not a number: {value!r}") from None
    if not np.isfinite(out):
        raise DataError(f"{path}:{lineno}: {what} is not finite: {value!r}")
    return out


def _int(value: str, path: Path, lineno: int, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{path}:{lineno}: {what} is not an integer: {value!r}") from None


def last_of_pairs(
    user_codes: np.ndarray, item_codes: np.ndarray, n_items: int, ratings: np.ndarray | None
) -> tuple[np.ndarray, int]:
    """The rows to keep so that every (user, item) pair has one, its last (sorted row indices),
    and how many pairs had conflicting ratings. One stable radix sort of the int64 pair keys."""
    n = int(user_codes.shape[0])
    pairs = user_codes.astype(np.int64) * max(1, n_items) + item_codes
    order, sp = _radix(pairs)
    del pairs
    starts = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1]]) if n else np.zeros(0, np.int64)
    del sp
    # the last row of each group of equal keys (the sort is stable: original order within a group)
    last = np.r_[starts[1:] - 1, n - 1] if n else starts
    conflicting = 0
    if ratings is not None and starts.size < n:
        sr = ratings[order]
        mins = np.minimum.reduceat(sr, starts)
        maxs = np.maximum.reduceat(sr, starts)
        conflicting = int((mins != maxs).sum())
        del sr
    return np.sort(order[last]), conflicting


def deduplicate(domain: DomainData) -> DomainData:
    """Keep the last row of every (user, item) pair; record how many rows went and conflicted.

    Vectorised over the int32 codes: one stable sort of the int64 pair keys.
    """
    n = len(domain)
    keep, conflicting = last_of_pairs(
        domain.user_codes, domain.item_codes, len(domain.item_vocab), domain.ratings
    )
    stats = dict(
        domain.stats,
        rows=n,
        unique_pairs=int(keep.size),
        duplicate_rows_removed=int(n - keep.size),
        conflicting_pairs=conflicting,
    )
    if keep.size == n:
        domain.stats = stats
        return domain
    logger.info(
        "domain %s: removed %d duplicate rows (%d pairs with conflicting ratings; last row kept)",
        domain.name,
        n - keep.size,
        conflicting,
    )
    out = domain.take(keep)
    out.stats = stats
    return out


def _batch(
    users: list[str],
    items: list[str],
    ratings: list[float] | None = None,
    timestamps: list[int] | None = None,
) -> pa.RecordBatch:
    cols = {"user": pa.array(users, pa.string()), "item": pa.array(items, pa.string())}
    if ratings is not None:
        cols["rating"] = pa.array(ratings, pa.float32())
    if timestamps is not None:
        cols["timestamp"] = pa.array(timestamps, pa.int64())
    return pa.RecordBatch.from_pydict(cols)


# ----------------------------------------------------------------------------- encoding

# A source of cleaned record batches (columns user, item: string; rating: float32; timestamp:
# int64), callable more than once: the encoder reads it twice (vocabulary, then codes).
Batches = Callable[[], Iterator[pa.RecordBatch]]

ENCODE_CHUNK_ROWS = 1 << 23  # rows looked up against the vocabulary in one call


class DistinctIds:
    """Distinct id strings gathered a batch at a time, merged whenever more than
    ENCODE_CHUNK_ROWS are held (so what is held stays bounded by the distinct ids)."""

    def __init__(self) -> None:
        self.parts: list[pa.Array] = []
        self.held = 0

    def add(self, values: pa.Array) -> None:
        self.parts.append(values)
        self.held += len(values)
        if self.held > ENCODE_CHUNK_ROWS and len(self.parts) > 1:
            merged = pc.unique(pa.chunked_array(self.parts, type=pa.string()))
            self.parts, self.held = [merged], len(merged)

    def sorted(self) -> pa.Array:
        return sorted_unique(pa.chunked_array(self.parts, type=pa.string()))


def _vocab_pass(parts: list[tuple[Batches, int | None]]) -> tuple[pa.Array, pa.Array, int]:
    """First pass: the sorted distinct users and items, and the number of rows."""
    seen = {"user": DistinctIds(), "item": DistinctIds()}
    n = 0
    for batches, _ in parts:
        for b in batches():
            n += b.num_rows
            for col in ("user", "item"):
                seen[col].add(pc.unique(b.column(col)))
    return seen["user"].sorted(), seen["item"].sorted(), n


def _encode(
    name: str,
    parts: list[tuple[Batches, int | None]],
    has_rating: bool,
    has_timestamp: bool,
) -> DomainData:
    """Dictionary-encode the batches of every part (a part code: its given split, or None) into
    one domain: two passes, holding only the vocabularies, the codes and the numeric columns."""
    user_vocab, item_vocab, n = _vocab_pass(parts)
    ucodes = np.empty(n, dtype=np.int32)
    icodes = np.empty(n, dtype=np.int32)
    ratings = np.empty(n, dtype=np.float32) if has_rating else None
    stamps = np.empty(n, dtype=np.int64) if has_timestamp else None
    split = np.empty(n, dtype=np.int8) if any(code is not None for _, code in parts) else None
    pos = 0
    pending: list[pa.RecordBatch] = []

    def flush() -> None:
        nonlocal pos
        if not pending:
            return
        rows = sum(b.num_rows for b in pending)
        for col, vocab, out in (("user", user_vocab, ucodes), ("item", item_vocab, icodes)):
            chunk = pa.chunked_array([b.column(col) for b in pending], type=pa.string())
            out[pos : pos + rows] = pc.index_in(chunk, value_set=vocab).to_numpy()
        for col, out_arr in (("rating", ratings), ("timestamp", stamps)):
            if out_arr is not None:
                out_arr[pos : pos + rows] = np.concatenate(
                    [b.column(col).to_numpy(zero_copy_only=False) for b in pending]
                )
        pos += rows
        pending.clear()

    for batches, code in parts:
        start = pos + sum(b.num_rows for b in pending)
        for b in batches():
            pending.append(b)
            if sum(x.num_rows for x in pending) >= ENCODE_CHUNK_ROWS:
                flush()
        flush()
        if split is not None:
            split[start:pos] = TRAIN if code is None else code
    return DomainData(
        name=name,
        ratings=ratings,
        timestamps=stamps,
        given_split=split,
        user_codes=ucodes,
        user_vocab=user_vocab,
        item_codes=icodes,
        item_vocab=item_vocab,
    )


# ----------------------------------------------------------------------------- table readers


Column = str | int  # a column: its header name, or its 0-based index in a header-less file


def _columns(
    path: Path,
    wanted: dict[str, Column | None],
    header: bool,
    delimiter: str | None,
    data: bytes | None = None,
) -> tuple[dict[str, list[str]], list[int]]:
    """The ``wanted`` columns of a delimited text file (or ``data``), by role; with their line
    numbers."""
    if delimiter is None:
        delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    reader = csv.reader(_decoded(path, data=data), delimiter=delimiter)
    cols: dict[str, int] = {}
    width: int | None = None
    try:
        if header:
            try:
                names = [h.split(":", 1)[0].strip() for h in next(reader)]
            except StopIteration:
                raise DataError(f"{path}:1: empty file, expected a header line") from None
            width = len(names)
            for role, col in wanted.items():
                if col is None:
                    continue
                if col not in names:
                    raise DataError(
                        f"{path}:1: no {role} column {col!r} in header {names}"
                        f"{_close(str(col), names)}"
                    )
                cols[role] = names.index(str(col))
        else:
            cols = {role: int(col) for role, col in wanted.items() if col is not None}
        out: dict[str, list[str]] = {role: [] for role in cols}
        lines: list[int] = []
        for row in reader:
            lineno = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if width is None:  # header-less: the first row fixes the width
                width = len(row)
                for role, index in cols.items():
                    if index >= width:
                        raise DataError(
                            f"{path}:{lineno}: {role} column {index} (0-based) but the row has "
                            f"{width} fields"
                        )
            if len(row) != width:
                raise DataError(f"{path}:{lineno}: expected {width} fields, got {len(row)}")
            for role, index in cols.items():
                out[role].append(row[index].strip())
            lines.append(lineno)
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: {exc}") from None
    return out, lines


def _close(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _read_rows(
    path: Path,
    user: Column,
    item: Column,
    rating: Column | None,
    timestamp: Column | None,
    delimiter: str | None,
    header: bool,
    data: bytes | None = None,
) -> tuple[list[str], list[str], list[float] | None, list[int] | None]:
    wanted = {"user": user, "item": item, "rating": rating, "timestamp": timestamp}
    cols, lines = _columns(path, wanted, header, delimiter, data)
    for role in ("user", "item"):
        for lineno, value in zip(lines, cols[role], strict=True):
            if not value:
                raise DataError(f"{path}:{lineno}: empty {role} id")
    ratings = stamps = None
    if "rating" in cols:
        ratings = [_float(v, path, n, "rating") for n, v in zip(lines, cols["rating"], strict=True)]
    if "timestamp" in cols:
        stamps = [
            _int(v, path, n, "timestamp") for n, v in zip(lines, cols["timestamp"], strict=True)
        ]
    return cols["user"], cols["item"], ratings, stamps


# ----------------------------------------------------------------------------- columnar readers

PARQUET_SUFFIXES = (".parquet", ".pq")
FORMATS = ("csv", "tsv", "parquet")
BATCH_ROWS = 1 << 20  # rows per record batch read from Parquet
SCAN_BYTES = 1 << 26  # bytes of a text file checked at a time for encoding and control characters


def file_format(path: Path, fmt: str | None) -> str:
    """``csv``, ``tsv`` (any other delimited text) or ``parquet``: given, or from the name."""
    if fmt is not None:
        return fmt
    if path.suffix.lower() in PARQUET_SUFFIXES or path.is_dir():
        return "parquet"
    return "csv" if path.suffix.lower() == ".csv" else "tsv"


def table_batches(
    path: Path,
    wanted: dict[str, Column | None],
    header: bool,
    delimiter: str | None,
    fmt: str | None = None,
    data: bytes | None = None,
) -> Batches:
    """The cleaned record batches of one interactions table (any supported format); for a text
    table, ``data`` holds the bytes to read instead of the file (a part of it: the distributed
    path), named as ``path`` in errors."""
    if file_format(path, fmt) == "parquet":
        return _parquet_batches(path, wanted, header)
    if delimiter is None:
        delimiter = "," if file_format(path, fmt) == "csv" else "\t"
    batches = _arrow_text(path, wanted, header, delimiter, data)  # _open_text checks the file
    if batches is None:  # the exact reader: names the line of the first problem, or reads it
        u, i, r, t = _read_rows(
            path,
            wanted["user"] if wanted["user"] is not None else "user_id",
            wanted["item"] if wanted["item"] is not None else "item_id",
            wanted["rating"],
            wanted["timestamp"],
            delimiter,
            header,
            data,
        )
        batches = [_batch(u, i, r, t)]
    return lambda: iter(batches)


class _Refused(Exception):
    """The columnar text reader cannot vouch for this file: the exact line reader decides."""


_TEXT = bytes([9, 10, 13, *range(32, 256)])  # the bytes a text table may hold


def _text_is_clean(path: Path, encoding: str = "utf-8", data: bytes | None = None) -> bool:
    """Whether the whole file (or ``data``) is ``encoding`` text (UTF-8 checked; every byte is
    Latin-1) without control characters (tab, CR, LF allowed): C-speed byte scans, decoding only
    non-ASCII parts."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with _open_text(path, data) as fh:
        while chunk := fh.read(SCAN_BYTES):
            if chunk.translate(None, _TEXT):  # what is left are control characters
                return False
            if encoding != "utf-8" or chunk.isascii() and not decoder.getstate()[0]:
                continue
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError:
                return False
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
    return True


def _arrow_text(
    path: Path,
    wanted: dict[str, Column | None],
    header: bool,
    delimiter: str,
    data: bytes | None = None,
) -> list[pa.RecordBatch] | None:
    """A delimited text file (or ``data``) parsed by pyarrow.csv, or None when any line needs the
    exact reader (bad bytes, wrong field count, empty id, a number that does not parse,
    blank-looking rows)."""
    if not _text_is_clean(path, data=data):
        return None
    with _open_text(path, data) as fh:
        first = fh.readline().decode("utf-8")
    if not first.strip():
        return None
    try:
        fields = next(csv.reader([first], delimiter=delimiter))
    except (csv.Error, StopIteration):
        return None
    width = len(fields)
    if header:
        names = [h.split(":", 1)[0].strip() for h in fields]
        for role, col in wanted.items():
            if col is not None and col not in names:
                raise DataError(
                    f"{path}:1: no {role} column {col!r} in header {names}{_close(str(col), names)}"
                )
        index = {role: names.index(str(col)) for role, col in wanted.items() if col is not None}
    else:
        index = {role: int(col) for role, col in wanted.items() if col is not None}
        if any(i >= width for i in index.values()):
            return None
    generated = [f"c{i}" for i in range(width)]
    chosen = sorted(set(index.values()))
    try:
        reader = pacsv.open_csv(
            path if data is None else pa.BufferReader(data),
            read_options=pacsv.ReadOptions(
                column_names=generated, skip_rows=1 if header else 0, block_size=1 << 24
            ),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(
                include_columns=[generated[i] for i in chosen],
                column_types={generated[i]: pa.string() for i in chosen},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
        out = []
        for b in reader:
            out.append(_clean_text_batch(b, {r: generated[i] for r, i in index.items()}))
        return out
    except (pa.ArrowInvalid, _Refused):
        return None


def _clean_text_batch(b: pa.RecordBatch, cols: dict[str, str]) -> pa.RecordBatch:
    out: dict[str, pa.Array] = {}
    for role in ("user", "item"):
        ids = pc.utf8_trim_whitespace(b.column(cols[role]))
        if pc.any(pc.equal(pc.utf8_length(ids), 0)).as_py():
            raise _Refused(role)
        out[role] = ids
    if "rating" in cols:
        r = pc.cast(pc.utf8_trim_whitespace(b.column(cols["rating"])), pa.float64())
        if len(r) and not pc.all(pc.is_finite(r)).as_py():
            raise _Refused("rating")
        out["rating"] = pc.cast(r, pa.float32())
    if "timestamp" in cols:
        out["timestamp"] = pc.cast(pc.utf8_trim_whitespace(b.column(cols["timestamp"])), pa.int64())
    return pa.RecordBatch.from_pydict(out)


def _parquet_batches(path: Path, wanted: dict[str, Column | None], header: bool) -> Batches:
    """Batches streamed from a Parquet file, or a folder of them, read by pyarrow.dataset: only
    the wanted columns, ``BATCH_ROWS`` rows at a time; rows are counted from 1 in file order."""
    if not path.exists():
        raise DataError(f"missing data file: expected {path}")
    if not header:
        raise DataError(f"{path}: a Parquet file names its columns; header = false does not apply")
    try:
        ds = pads.dataset(path, format="parquet")
        names = ds.schema.names
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a Parquet file ({exc})") from None
    cols = {role: str(col) for role, col in wanted.items() if col is not None}
    for role, col in cols.items():
        if col not in names:
            raise DataError(
                f"{path}: no {role} column {col!r} in columns {names}{_close(col, names)}"
            )
    types = {role: ds.schema.field(col).type for role, col in cols.items()}
    for role in ("rating", "timestamp"):
        if role in types and not (
            pa.types.is_integer(types[role])
            or pa.types.is_floating(types[role])
            and role == "rating"
            or pa.types.is_timestamp(types[role])
            and role == "timestamp"
        ):
            raise DataError(f"{path}: {role} column {cols[role]!r} is {types[role]}, not a number")

    def batches() -> Iterator[pa.RecordBatch]:
        row = 0
        try:
            scan = ds.to_batches(columns=list(cols.values()), batch_size=BATCH_ROWS)
            for b in scan:
                yield _clean_parquet_batch(path, b, cols, row)
                row += b.num_rows
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{path}: unreadable Parquet data after row {row} ({exc})") from None

    return batches


def _first(mask: pa.Array) -> int:
    return int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])


_TEXT_BYTES = np.ones(256, dtype=bool)
_TEXT_BYTES[[*range(0, 9), 11, 12, *range(14, 32)]] = False


def _has_control(ids: pa.Array) -> bool:
    """Whether any string of ``ids`` holds a control character (other than tab, CR, LF): one
    vectorised look at its UTF-8 data buffer."""
    if pa.types.is_large_string(ids.type):
        ids = pc.cast(ids, pa.string())
    bufs = ids.buffers()
    if len(ids) == 0 or bufs[2] is None:
        return False
    offsets = np.frombuffer(bufs[1], dtype=np.int32)[ids.offset : ids.offset + len(ids) + 1]
    data = np.frombuffer(bufs[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return not bool(_TEXT_BYTES[data].all())


def _clean_parquet_batch(
    path: Path, b: pa.RecordBatch, cols: dict[str, str], row: int
) -> pa.RecordBatch:
    out: dict[str, pa.Array] = {}
    for role in ("user", "item"):
        ids = b.column(cols[role])
        if not pa.types.is_string(ids.type):
            ids = pc.cast(ids, pa.string())
        bad = pc.fill_null(pc.equal(pc.utf8_length(ids), 0), True)
        if pc.any(bad).as_py():
            raise DataError(f"{path}: row {row + _first(bad) + 1}: empty {role} id")
        if _has_control(ids):
            control = pc.match_substring_regex(ids, r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
            raise DataError(
                f"{path}: row {row + _first(control) + 1}: control character in the {role} id"
            )
        out[role] = ids
    if "rating" in cols:
        r = pc.cast(b.column(cols["rating"]), pa.float64())
        bad = pc.invert(pc.fill_null(pc.is_finite(r), False))
        if pc.any(bad).as_py():
            at = _first(bad)
            raise DataError(
                f"{path}: row {row + at + 1}: rating is not a finite number: {r[at].as_py()!r}"
            )
        out["rating"] = pc.cast(r, pa.float32())
    if "timestamp" in cols:
        t = b.column(cols["timestamp"])
        if pa.types.is_timestamp(t.type):
            t = pc.cast(pc.cast(t, pa.timestamp("s")), pa.int64())
        t = pc.cast(t, pa.int64())
        if t.null_count:
            raise DataError(f"{path}: row {row + _first(pc.is_null(t)) + 1}: empty timestamp")
        out["timestamp"] = t
    return pa.RecordBatch.from_pydict(out)


def read_table(
    path: Path,
    domain: str,
    user: Column = "user_id",
    item: Column = "item_id",
    rating: Column | None = None,
    timestamp: Column | None = None,
    delimiter: str | None = None,
    header: bool = True,
    fmt: str | None = None,
) -> DomainData:
    """Read a CSV/TSV with a header, a RecBole atomic ``.inter`` file (``name:type`` headers), or
    a Parquet file or folder of Parquet files (``fmt``, default from the extension).

    With ``header=False`` the columns are 0-based indices. The delimiter defaults to ``,`` for
    ``.csv`` files and a tab otherwise.
    """
    wanted = {"user": user, "item": item, "rating": rating, "timestamp": timestamp}
    batches = table_batches(path, wanted, header, delimiter, fmt)
    return deduplicate(
        _encode(domain, [(batches, None)], rating is not None, timestamp is not None)
    )


def read_titles(path: Path, item: str = "item_id", delimiter: str | None = None) -> dict[str, str]:
    """An item-title table with a header: the item column (``item``) and a ``title`` column."""
    cols, lines = _columns(path, {"item": item, "title": "title"}, True, delimiter)
    for lineno, value in zip(lines, cols["item"], strict=True):
        if not value:
            raise DataError(f"{path}:{lineno}: empty item id")
    return dict(zip(cols["item"], cols["title"], strict=True))


# ----------------------------------------------------------------------------- built-in text layouts

# The built-in folders are header-less text without quoting: pyarrow.csv parses them (every field
# a string, then ids trimmed and numbers cast column by column); a file with one record per line
# and its own separator (adjacency lists, MovieLens-1M's "::") is read as one column of lines
# (delimiter _LINE, which no accepted file holds: control characters are refused first) and split
# with pyarrow.compute. The line of a problem is found afterwards, vectorised over the file's bytes.
_LINE = "\x1f"
LAYOUT_BLOCK_BYTES = 1 << 24  # bytes pyarrow.csv parses per block (one thread each)
MAX_FIELDS = 64  # the widest built-in layout (MovieLens-100K u.item has 24 fields)


def _check_text(path: Path, encoding: str = "utf-8") -> None:
    """Refuse bytes that are not ``encoding`` text and control characters, naming the line."""
    if _text_is_clean(path, encoding):
        return
    for _ in _decoded(path, encoding):  # names the first bad line
        pass
    raise DataError(f"{path}: not {encoding} text without control characters")


def _line_bounds(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The file's bytes and the start and end offset of each of its lines (LF or CRLF)."""
    buf = np.fromfile(path, dtype=np.uint8)
    ends = np.flatnonzero(buf == 10)
    return buf, np.r_[0, ends + 1], np.r_[ends, buf.size]


def _per_line(mask: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """How many bytes of each line ``mask`` selects."""
    total = np.r_[0, np.cumsum(mask, dtype=np.int64)]
    return total[stops] - total[starts]


_SPACE = np.zeros(256, dtype=bool)
_SPACE[[9, 10, 11, 12, 13, 32]] = True


def _row_lines(path: Path) -> np.ndarray:
    """The 1-based line number of every record: each line with more than whitespace."""
    buf, starts, stops = _line_bounds(path)
    solid = _per_line(~_SPACE[buf], starts, stops)
    return np.flatnonzero(solid > 0) + 1


def _line_of(path: Path, row: int) -> int:
    return int(_row_lines(path)[row])


def _width_error(path: Path, delimiter: str, widths: tuple[int, ...], what: str) -> DataError:
    """The first record whose number of fields differs from the first record's (or the first
    record, when its number is not one of ``widths``); an empty file when there is no record."""
    buf, starts, stops = _line_bounds(path)
    solid = np.flatnonzero(_per_line(~_SPACE[buf], starts, stops) > 0)
    if not solid.size:
        return DataError(f"{path}: empty file, expected {what} lines")
    fields = _per_line(buf == ord(delimiter), starts, stops)[solid] + 1
    if int(fields[0]) not in widths:
        at = 0
        want = f"at least {widths[0]}" if len(widths) > 2 else " or ".join(map(str, widths))
    else:
        other = np.flatnonzero(fields != fields[0])
        at, want = (int(other[0]) if other.size else 0), str(int(fields[0]))
    return DataError(f"{path}:{solid[at] + 1}: expected {want} fields, got {int(fields[at])}")


def _read_layout(
    path: Path,
    widths: tuple[int, ...],
    delimiter: str,
    what: str,
    encoding: str = "utf-8",
) -> list[pa.ChunkedArray]:
    """The fields of a header-less delimited text file without quoting, as string columns (not
    trimmed): every record has the number of fields of the first, one of ``widths``. Lines of only
    whitespace are skipped. Bad bytes, an empty file or a record of another width: DataError
    naming the file and line."""
    _check_text(_require(path), encoding)

    def skip_blank(row: pacsv.InvalidRow) -> str:
        return "skip" if not row.text.strip() else "error"

    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(
                autogenerate_column_names=True, block_size=LAYOUT_BLOCK_BYTES, encoding=encoding
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter, quote_char=False, invalid_row_handler=skip_blank
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={f"f{k}": pa.string() for k in range(MAX_FIELDS)},
                strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        if delimiter == _LINE and "Empty CSV" not in str(exc):
            raise DataError(f"{path}: unreadable text ({exc})") from None
        raise _width_error(path, delimiter, widths, what) from None
    columns = table.columns
    if delimiter != _LINE and len(columns) not in widths:
        raise _width_error(path, delimiter, widths, what)
    blank = None
    for c in columns:
        empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(c)), 0)
        blank = empty if blank is None else pc.and_(blank, empty)
    if pc.any(blank).as_py():  # a record of empty fields only, like a line of tabs
        columns = [pc.filter(c, pc.invert(blank)) for c in columns]
    if not len(columns[0]):
        raise DataError(f"{path}: empty file, expected {what} lines")
    return columns


def _ids(path: Path, values: pa.ChunkedArray, role: str) -> pa.ChunkedArray:
    """Trimmed ids; an empty one is refused with its line."""
    ids = pc.utf8_trim_whitespace(values)
    empty = pc.equal(pc.utf8_length(ids), 0)
    if pc.any(empty).as_py():
        raise DataError(f"{path}:{_line_of(path, _first(empty))}: empty {role} id")
    return ids


def _first_failing(values: pa.ChunkedArray, to: pa.DataType) -> int:
    """The index of the first value that does not cast to ``to`` (the cast of all fails)."""
    lo, hi = 0, len(values)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            pc.cast(values.slice(lo, mid - lo), to)
            lo = mid
        except pa.ArrowInvalid:
            hi = mid
    return lo


def _numbers(path: Path, values: pa.ChunkedArray, what: str, to: pa.DataType) -> np.ndarray:
    """A numeric column: floats must be finite; one that does not parse is named with its line."""
    text = pc.utf8_trim_whitespace(values)
    kind = "an integer" if pa.types.is_integer(to) else "a number"
    try:
        out = pc.cast(text, pa.float64() if pa.types.is_floating(to) else to)
    except pa.ArrowInvalid:
        at = _first_failing(text, pa.float64() if pa.types.is_floating(to) else to)
        raise DataError(
            f"{path}:{_line_of(path, at)}: {what} is not {kind}: {values[at].as_py()!r}"
        ) from None
    if pa.types.is_floating(to):
        finite = pc.is_finite(out)
        if not pc.all(finite).as_py():
            at = _first(pc.invert(finite))
            raise DataError(
                f"{path}:{_line_of(path, at)}: {what} is not finite: {values[at].as_py()!r}"
            )
    return out.to_numpy().astype(to.to_pandas_dtype(), copy=False)


def _interactions(
    path: Path,
    user: pa.ChunkedArray,
    item: pa.ChunkedArray,
    rating: pa.ChunkedArray | None = None,
    timestamp: pa.ChunkedArray | None = None,
) -> pa.Table:
    """A cleaned table (columns user, item: string; rating: float32; timestamp: int64)."""
    cols: dict[str, pa.ChunkedArray | np.ndarray] = {
        "user": _ids(path, user, "user"),
        "item": _ids(path, item, "item"),
    }
    if rating is not None:
        cols["rating"] = _numbers(path, rating, "rating", pa.float32())
    if timestamp is not None:
        cols["timestamp"] = _numbers(path, timestamp, "timestamp", pa.int64())
    return pa.table(cols)


def _table_batches(table: pa.Table) -> Iterator[pa.RecordBatch]:
    return iter(table.to_batches())


def _domain(
    name: str, parts: list[tuple[pa.Table, int | None]], titles: dict[str, str] | None = None
) -> DomainData:
    """A de-duplicated domain from cleaned tables (a part code: its given split, or None)."""
    names = parts[0][0].column_names
    sources: list[tuple[Batches, int | None]] = [
        (functools.partial(_table_batches, t), code) for t, code in parts
    ]
    d = _encode(name, sources, "rating" in names, "timestamp" in names)
    d.titles = titles or {}
    return deduplicate(d)


def _split_lines(lines: pa.ChunkedArray, pattern: str | None) -> pa.ListArray:
    """Every record split into its fields: on ``pattern``, or on runs of whitespace."""
    if pattern is None:
        return pc.utf8_split_whitespace(pc.utf8_trim_whitespace(lines)).combine_chunks()
    return pc.split_pattern(lines, pattern).combine_chunks()


def _row_of_token(lists: pa.ListArray, token: int) -> int:
    offsets = lists.offsets.to_numpy()
    offsets = offsets - offsets[0]
    return int(np.searchsorted(offsets, token, side="right") - 1)


def _tokens_are_ids(path: Path, lists: pa.ListArray) -> None:
    """Every field a non-negative integer id (adjacency lists), or the line of the first that is not."""
    flat = lists.flatten()
    bad = pc.invert(pc.match_substring_regex(flat, r"^[0-9]+$"))
    if pc.any(bad).as_py():
        at = _first(bad)
        line = _line_of(path, _row_of_token(lists, at))
        raise DataError(f"{path}:{line}: id is not a non-negative integer: {flat[at].as_py()!r}")


# ----------------------------------------------------------------------------- built-in folders


def load_amazon_books_movies(path: Path) -> Dataset:
    files = {
        "books": path / "Amazon-Books-Dense.inter",
        "movies": path / "Amazon-Movies-Dense.inter",
    }
    domains = {
        name: read_table(f, name, "user_id", "item_id", rating="rating")
        for name, f in files.items()
    }
    return Dataset("amazon-books-movies", path, domains, _fingerprint(list(files.values())))


def load_douban_book_music(path: Path) -> Dataset:
    files = {"book": path / "douban_book_ratings.dat", "music": path / "douban_music_ratings.dat"}
    domains = {}
    for name, f in files.items():
        u, i, r = _read_layout(f, (3,), "\t", "'user<TAB>item<TAB>rating'")
        domains[name] = _domain(name, [(_interactions(f, u, i, rating=r), None)])
    return Dataset("douban-book-music", path, domains, _fingerprint(list(files.values())))


_DISENCDR_FOLDER = re.compile(r"([^_/]+)_([^_/]+)")


def disencdr_folders(path: Path) -> dict[str, Path]:
    """``{domain X: folder X_Y}`` for every ``X_Y`` subfolder holding ``train.txt`` and ``test.txt``."""
    out: dict[str, Path] = {}
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        m = _DISENCDR_FOLDER.fullmatch(sub.name)
        if not m or not (sub / "train.txt").is_file() or not (sub / "test.txt").is_file():
            continue
        name = m.group(1)
        if name in out:
            raise DataError(
                f"{path}: domain {name!r} is given twice, in {out[name].name}/ and {sub.name}/; "
                "keep one pair per folder"
            )
        out[name] = sub
    return out


def load_disencdr(path: Path) -> Dataset:
    """The DisenCDR layout, in a folder of any name: ``X_Y/train.txt`` and ``X_Y/test.txt`` are
    domain X's given split (header-less ``user item [1]`` lines, whitespace separated, ids shared
    between the domains)."""
    folders = disencdr_folders(path)
    if not folders:
        raise DataError(f"{path}: no X_Y/ folder with train.txt and test.txt (DisenCDR layout)")
    domains = {}
    used: list[Path] = []
    for name, folder in folders.items():
        parts: list[tuple[pa.Table, int | None]] = []
        for fname, code in (("train.txt", TRAIN), ("test.txt", TEST)):
            f = folder / fname
            used.append(f)
            (lines,) = _read_layout(f, (1,), _LINE, "'user<TAB>item[<TAB>1]'")
            fields = _split_lines(lines, None)
            _check_width(f, fields, (2, 3), "")
            user, item = (pc.list_element(fields, k) for k in range(2))
            parts.append((_interactions(f, user, item), code))
        domains[name] = _domain(name, parts)
    return Dataset(path.name, path, domains, _fingerprint(used))


def _movielens_items(
    item_file: Path, genre_file: Path
) -> tuple[pa.ChunkedArray, dict[str, str], np.ndarray, list[str]]:
    """MovieLens-100K's ``u.item``: the item ids, their titles with genres ("Title [A|B]"), the
    genre flags (items x genres) and the genre names (from ``u.genre`` when present)."""
    genres: list[str] = []
    if genre_file.is_file():
        genres = _read_layout(genre_file, (2,), "|", "'genre|id'", "latin-1")[0].to_pylist()
    cols = _read_layout(
        item_file, tuple(range(5, MAX_FIELDS + 1)), "|", "'id|title|...'", "latin-1"
    )
    ids = cols[0]
    flags = np.zeros((len(ids), len(genres)), dtype=bool)
    for g, col in enumerate(cols[5 : 5 + len(genres)]):
        flags[:, g] = pc.equal(col, "1").to_numpy(zero_copy_only=False)
    names = np.array(genres, dtype=object)
    titles = {
        item: title + (f" [{'|'.join(names[row])}]" if row.any() else "")
        for item, title, row in zip(ids.to_pylist(), cols[1].to_pylist(), flags, strict=True)
    }
    return ids, titles, flags, genres


def load_movielens_100k(path: Path) -> Dataset:
    data = path / "u.data"
    u, i, r, t = _read_layout(data, (4,), "\t", "'user<TAB>item<TAB>rating<TAB>timestamp'")
    table = _interactions(data, u, i, rating=r, timestamp=t)
    item_file = path / "u.item"
    ids, titles, flags, genres = _movielens_items(item_file, path / "u.genre")
    user_file = path / "u.user"
    n_users = len(_read_layout(user_file, (5,), "|", "'id|age|gender|occupation|zip'")[0])
    domain = _domain("movies", [(table, None)], titles=titles)
    domain.stats["user_profiles"] = n_users
    domains = {"movies": domain}
    # Two genre domains with disjoint items and shared users, for a cross-domain pair that can be
    # downloaded: comedies that are not dramas, and dramas that are not comedies.
    row = pc.fill_null(pc.index_in(table.column("item"), value_set=ids), -1).to_numpy()
    known = row >= 0
    row = np.where(known, row, 0)
    for name, keep, drop in (("comedy", "Comedy", "Drama"), ("drama", "Drama", "Comedy")):
        in_genre = np.zeros(len(ids), dtype=bool)
        if keep in genres:
            in_genre = flags[:, genres.index(keep)].copy()
            if drop in genres:
                in_genre &= ~flags[:, genres.index(drop)]
        part = table.filter(pa.array(known & in_genre[row]))
        kept = pc.unique(part.column("item")).to_pylist()
        domains[name] = _domain(name, [(part, None)], titles={x: titles[x] for x in kept})
    return Dataset("movielens-100k", path, domains, _fingerprint([data, item_file, user_file]))


def load_movielens_1m(path: Path) -> Dataset:
    """The MovieLens-1M release (``ratings.dat``: ``user::item::rating::timestamp``), titles and
    genres from ``movies.dat`` when present."""
    data = path / "ratings.dat"
    (lines,) = _read_layout(data, (1,), _LINE, "'user::item::rating::timestamp'")
    fields = _split_lines(lines, "::")
    _check_width(data, fields, (4,), "'::' ")
    u, i, r, t = (pc.list_element(fields, k) for k in range(4))
    table = _interactions(data, u, i, rating=r, timestamp=t)
    titles: dict[str, str] = {}
    files = [data]
    movies = path / "movies.dat"
    if movies.is_file():
        files.append(movies)
        (mlines,) = _read_layout(movies, (1,), _LINE, "'id::title::genres'", "latin-1")
        mfields = _split_lines(mlines, "::")
        _check_width(movies, mfields, (3,), "'::' ")
        ids, names, genres = (pc.list_element(mfields, k).to_pylist() for k in range(3))
        titles = {
            x: n + (f" [{g}]" if g else "") for x, n, g in zip(ids, names, genres, strict=True)
        }
    domain = _domain("movies", [(table, None)], titles=titles)
    return Dataset("ml-1m", path, {"movies": domain}, _fingerprint(files))


def _check_width(path: Path, fields: pa.ListArray, widths: tuple[int, ...], sep: str) -> None:
    """Every record has one of ``widths`` fields, or the line of the first that has not."""
    lengths = pc.list_value_length(fields)
    bad = pc.invert(pc.is_in(lengths, value_set=pa.array(widths, lengths.type)))
    if pc.any(bad).as_py():
        at = _first(bad)
        want = " or ".join(str(w) for w in widths)
        raise DataError(
            f"{path}:{_line_of(path, at)}: expected {want} {sep}fields, got {lengths[at].as_py()}"
        )


def load_movielens_1m_implicit(path: Path) -> Dataset:
    """LightGCN-style adjacency lists (``user item item ...`` per line, space separated); the
    given files are kept as the given split."""
    parts: list[tuple[pa.Table, int | None]] = []
    files = []
    for fname, code in (("train.txt", TRAIN), ("valid.txt", VALID), ("test.txt", TEST)):
        f = path / fname
        files.append(f)
        (lines,) = _read_layout(f, (1,), _LINE, "'user item item ...'")
        lists = _split_lines(lines, None)
        _tokens_are_ids(f, lists)
        lengths = pc.list_value_length(lists).to_numpy() - 1
        users = pc.list_element(lists, 0).take(pa.array(np.repeat(np.arange(len(lists)), lengths)))
        items = pc.list_flatten(pc.list_slice(lists, 1))
        parts.append((pa.table({"user": users, "item": items}), code))
    domain = _domain("movies", parts)
    return Dataset("movielens-1m-implicit", path, {"movies": domain}, _fingerprint(files))


# The keys of dataset.toml (training/README.md documents them): key -> (types, what it holds)
TOP_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "name": ((str,), "a string"),
    "domains": ((dict,), "a table of [domains.<name>] tables"),
}
DOMAIN_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "file": ((str,), "a file name"),
    "train": ((str,), "a file name"),
    "valid": ((str,), "a file name"),
    "test": ((str,), "a file name"),
    "header": ((bool,), "true or false"),
    "delimiter": ((str,), "one character"),
    "user": ((str, int), "a column name, or a 0-based index when header = false"),
    "item": ((str, int), "a column name, or a 0-based index when header = false"),
    "rating": ((str, int), "a column name, or a 0-based index when header = false"),
    "timestamp": ((str, int), "a column name, or a 0-based index when header = false"),
    "titles": ((str,), "a file name"),
    "format": ((str,), '"csv", "tsv" or "parquet"'),
}
SPLIT_FILES = (("train", TRAIN), ("valid", VALID), ("test", TEST))


def _check_keys(
    where: Path,
    table: str,
    values: dict[str, object],
    keys: dict[str, tuple[tuple[type, ...], str]],
) -> None:
    for key, value in values.items():
        if key not in keys:
            close = difflib.get_close_matches(key, list(keys), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(keys)}"
            place = f" in [{table}]" if table else ""
            raise DataError(f"{where}: unknown key {key!r}{place}; {hint}")
        types, what = keys[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            name = f"{table}.{key}" if table else key
            raise DataError(f"{where}: {name} must be {what}, got {type(value).__name__} {value!r}")


@dataclass
class DomainSpec:
    """One ``[domains.<name>]`` table of a dataset.toml, checked: what to read and how."""

    name: str
    columns: dict[str, Column | None]  # role (user, item, rating, timestamp) -> column
    header: bool
    delimiter: str | None
    fmt: str | None
    parts: list[tuple[Path, int | None]]  # (file, its given split code or None)
    titles: Path | None
    title_item: str  # the item column of the titles file

    def batches(self, path: Path) -> Batches:
        """The cleaned batches of one of the parts' files."""
        return table_batches(path, self.columns, self.header, self.delimiter, self.fmt)

    def batches_of(self, path: Path, data: bytes) -> Batches:
        """The cleaned batches of ``data``, a part of the text file ``path`` (named in errors)."""
        return table_batches(path, self.columns, self.header, self.delimiter, self.fmt, data)


def _domain_spec(path: Path, decl_file: Path, name: str, spec: dict[str, object]) -> DomainSpec:
    where = f"domains.{name}."
    _check_keys(decl_file, f"domains.{name}", spec, DOMAIN_KEYS)
    header = bool(spec.get("header", True))
    default_user: Column = "user_id" if header else 0
    default_item: Column = "item_id" if header else 1
    columns: dict[str, Column | None] = {
        "user": spec.get("user", default_user),  # type: ignore[dict-item]
        "item": spec.get("item", default_item),  # type: ignore[dict-item]
        "rating": spec.get("rating"),  # type: ignore[dict-item]
        "timestamp": spec.get("timestamp"),  # type: ignore[dict-item]
    }
    for role, col in columns.items():
        if col is None:
            continue
        if header and not isinstance(col, str):
            raise DataError(
                f"{decl_file}: {where}{role} = {col!r}: a column name (the file has a header; "
                "set header = false for 0-based column indices)"
            )
        if not header and (not isinstance(col, int) or col < 0):
            raise DataError(f"{decl_file}: {where}{role} = {col!r}: a 0-based column index")
    delimiter = spec.get("delimiter")
    if delimiter is not None and len(str(delimiter)) != 1:
        raise DataError(f"{decl_file}: {where}delimiter must be one character, got {delimiter!r}")
    split_keys = [k for k, _ in SPLIT_FILES if k in spec]
    if ("file" in spec) == bool(split_keys):
        raise DataError(
            f"{decl_file}: [domains.{name}] needs either file = ... or a given split "
            "(train = ... and test = ..., valid = ... optional)"
        )
    if split_keys and not {"train", "test"} <= set(split_keys):
        raise DataError(f"{decl_file}: [domains.{name}] a given split needs train and test")
    fmt = spec.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise DataError(
            f"{decl_file}: {where}format must be one of {', '.join(FORMATS)}, got {fmt!r}"
        )
    keys = [("file", None)] if "file" in spec else [(k, c) for k, c in SPLIT_FILES if k in spec]
    return DomainSpec(
        name=name,
        columns=columns,
        header=header,
        delimiter=None if delimiter is None else str(delimiter),
        fmt=None if fmt is None else str(fmt),
        parts=[(path / str(spec[key]), code) for key, code in keys],
        titles=path / str(spec["titles"]) if "titles" in spec else None,
        title_item=columns["item"] if isinstance(columns["item"], str) else "item_id",
    )


def _declared_domain(spec: DomainSpec) -> DomainData:
    sources: list[tuple[Batches, int | None]] = [(spec.batches(f), c) for f, c in spec.parts]
    titles = read_titles(spec.titles, spec.title_item) if spec.titles is not None else {}
    encoded = _encode(
        spec.name,
        sources,
        spec.columns["rating"] is not None,
        spec.columns["timestamp"] is not None,
    )
    encoded.titles = titles
    return deduplicate(encoded)


def declared_specs(path: Path) -> tuple[str, list[DomainSpec]]:
    """The name and the checked domain tables of the ``dataset.toml`` in folder ``path``."""
    decl_file = path / "dataset.toml"
    try:
        decl = tomllib.loads(decl_file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"{decl_file}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{decl_file}: not UTF-8 text ({exc.reason})") from None
    _check_keys(decl_file, "", decl, TOP_KEYS)
    specs = decl.get("domains")
    if not isinstance(specs, dict) or not specs:
        raise DataError(f"{decl_file}: expected at least one [domains.<name>] table")
    out = []
    for name, spec in specs.items():
        if not isinstance(spec, dict):
            raise DataError(
                f"{decl_file}: domains.{name} must be a table ([domains.{name}] with file = ...), "
                f"got {type(spec).__name__} {spec!r}"
            )
        out.append(_domain_spec(path, decl_file, name, spec))
    return str(decl.get("name", path.name)), out


def load_declared(path: Path) -> Dataset:
    name, specs = declared_specs(path)
    domains = {spec.name: _declared_domain(spec) for spec in specs}
    files = [f for spec in specs for f, _ in spec.parts]
    return Dataset(name, path, domains, _fingerprint(files))


BUILTIN = {
    "amazon-books-movies": load_amazon_books_movies,
    "ml-100k": load_movielens_100k,  # the folder `python -m training download` writes
    "ml-1m": load_movielens_1m,
    "douban-book-music": load_douban_book_music,
    "amazon-sport-cloth": load_disencdr,
    "movielens-100k": load_movielens_100k,
    "movielens-1m-implicit": load_movielens_1m_implicit,
}


def load_dataset(path: Path) -> Dataset:
    """Load the data set in folder ``path``: a prepared folder (``prepared.json``, see
    training/data/prepared.py), one with ``dataset.toml``, or a built-in layout."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"missing data set folder: expected {path}")
    from training.data import prepared  # it imports this module

    if prepared.is_prepared(path):
        ds = prepared.load_prepared(path)
    elif (path / "dataset.toml").is_file():
        ds = load_declared(path)
    elif path.name in BUILTIN:
        ds = BUILTIN[path.name](path)
    elif disencdr_folders(path):
        ds = load_disencdr(path)
    else:
        raise DataError(
            f"{path}: unknown data set layout; expected a dataset.toml declaration, X_Y/train.txt "
            f"and X_Y/test.txt folders (DisenCDR), or one of {', '.join(sorted(BUILTIN))}"
        )
    for d in ds.domains.values():
        logger.info("data set %s domain %s: %s", ds.name, d.name, d.stats)
    return ds
