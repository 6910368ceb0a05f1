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
import hashlib
import logging
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

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


def _decoded(path: Path, encoding: str = "utf-8") -> Iterator[str]:
    """The lines of ``path`` (newlines kept), each decoded on its own so that an error names it.

    Bytes that are not ``encoding`` text, and control characters such as NUL (a binary file, or an
    id a database padded), are refused with the file and line.
    """
    with _require(path).open("rb") as fh:
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


def _lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    for lineno, line in enumerate(_decoded(path, encoding), start=1):
        line = line.rstrip("\r\n")
        if line.strip():
            yield lineno, line


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


def deduplicate(domain: DomainData) -> DomainData:
    """Keep the last row of every (user, item) pair; record how many rows went and conflicted.

    Vectorised over the int32 codes: one stable sort of the int64 pair keys.
    """
    n = len(domain)
    pairs = domain.user_codes.astype(np.int64) * max(1, len(domain.item_vocab)) + domain.item_codes
    order, sp = _radix(pairs)
    del pairs
    starts = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1]]) if n else np.zeros(0, np.int64)
    del sp
    # the last row of each group of equal keys (the sort is stable: original order within a group)
    last = np.r_[starts[1:] - 1, n - 1] if n else starts
    conflicting = 0
    if domain.ratings is not None and starts.size < n:
        sr = domain.ratings[order]
        mins = np.minimum.reduceat(sr, starts)
        maxs = np.maximum.reduceat(sr, starts)
        conflicting = int((mins != maxs).sum())
        del sr
    keep = np.sort(order[last])
    del order
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


def _make(
    name: str,
    users: list[str],
    items: list[str],
    ratings: list[float] | None = None,
    timestamps: list[int] | None = None,
    given_split: list[int] | None = None,
    titles: dict[str, str] | None = None,
) -> DomainData:
    """A de-duplicated domain from Python lists (the small built-in text layouts)."""
    b = _batch(users, items, ratings, timestamps)
    d = _encode(name, [(lambda: iter([b]), None)], ratings is not None, timestamps is not None)
    if given_split is not None:
        d.given_split = np.asarray(given_split, dtype=np.int8)
    d.titles = titles or {}
    return deduplicate(d)


# ----------------------------------------------------------------------------- encoding

# A source of cleaned record batches (columns user, item: string; rating: float32; timestamp:
# int64), callable more than once: the encoder reads it twice (vocabulary, then codes).
Batches = Callable[[], Iterator[pa.RecordBatch]]

ENCODE_CHUNK_ROWS = 1 << 23  # rows looked up against the vocabulary in one call


def _vocab_pass(parts: list[tuple[Batches, int | None]]) -> tuple[pa.Array, pa.Array, int]:
    """First pass: the sorted distinct users and items, and the number of rows."""
    seen: dict[str, list[pa.Array]] = {"user": [], "item": []}
    held = {"user": 0, "item": 0}
    n = 0
    for batches, _ in parts:
        for b in batches():
            n += b.num_rows
            for col in ("user", "item"):
                u = pc.unique(b.column(col))
                seen[col].append(u)
                held[col] += len(u)
                if held[col] > ENCODE_CHUNK_ROWS and len(seen[col]) > 1:  # bound what is held
                    merged = pc.unique(pa.chunked_array(seen[col], type=pa.string()))
                    seen[col], held[col] = [merged], len(merged)
    vocabs = [sorted_unique(pa.chunked_array(seen[c], type=pa.string())) for c in ("user", "item")]
    return vocabs[0], vocabs[1], n


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
    path: Path, wanted: dict[str, Column | None], header: bool, delimiter: str | None
) -> tuple[dict[str, list[str]], list[int]]:
    """The ``wanted`` columns of a delimited text file, by role; with their line numbers."""
    if delimiter is None:
        delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    reader = csv.reader(_decoded(path), delimiter=delimiter)
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
) -> tuple[list[str], list[str], list[float] | None, list[int] | None]:
    wanted = {"user": user, "item": item, "rating": rating, "timestamp": timestamp}
    cols, lines = _columns(path, wanted, header, delimiter)
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
) -> Batches:
    """The cleaned record batches of one interactions table (any supported format)."""
    if file_format(path, fmt) == "parquet":
        return _parquet_batches(path, wanted, header)
    if delimiter is None:
        delimiter = "," if file_format(path, fmt) == "csv" else "\t"
    batches = _arrow_text(_require(path), wanted, header, delimiter)
    if batches is None:  # the exact reader: names the line of the first problem, or reads it
        u, i, r, t = _read_rows(
            path,
            wanted["user"] if wanted["user"] is not None else "user_id",
            wanted["item"] if wanted["item"] is not None else "item_id",
            wanted["rating"],
            wanted["timestamp"],
            delimiter,
            header,
        )
        batches = [_batch(u, i, r, t)]
    return lambda: iter(batches)


class _Refused(Exception):
    """The columnar text reader cannot vouch for this file: the exact line reader decides."""


def _text_is_clean(path: Path) -> bool:
    """Whether the whole file is UTF-8 without control characters (tab, CR, LF allowed)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    allowed = np.zeros(256, dtype=bool)
    allowed[32:] = True
    allowed[[9, 10, 13]] = True
    with path.open("rb") as fh:
        while chunk := fh.read(SCAN_BYTES):
            if not allowed[np.frombuffer(chunk, dtype=np.uint8)].all():
                return False
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
    path: Path, wanted: dict[str, Column | None], header: bool, delimiter: str
) -> list[pa.RecordBatch] | None:
    """A delimited text file parsed by pyarrow.csv, or None when any line needs the exact reader
    (bad bytes, wrong field count, empty id, a number that does not parse, blank-looking rows)."""
    if not _text_is_clean(path):
        return None
    with path.open("rb") as fh:
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
            path,
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


def read_triples(
    path: Path, domain: str, n_fields: int | tuple[int, ...], has_rating: bool
) -> tuple[list[str], list[str], list[float], list[int]]:
    """Read a header-less whitespace/tab separated ``user item [rating [timestamp]]`` file."""
    users: list[str] = []
    items: list[str] = []
    ratings: list[float] = []
    stamps: list[int] = []
    allowed = (n_fields,) if isinstance(n_fields, int) else n_fields
    for lineno, line in _lines(path):
        parts = line.split()
        if len(parts) not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise DataError(f"{path}:{lineno}: expected {want} fields, got {len(parts)}")
        users.append(parts[0])
        items.append(parts[1])
        if has_rating:
            ratings.append(_float(parts[2], path, lineno, "rating"))
        if len(parts) >= 4:
            stamps.append(_int(parts[3], path, lineno, "timestamp"))
    return users, items, ratings, stamps


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
        u, i, r, _ = read_triples(f, name, 3, has_rating=True)
        domains[name] = _make(name, u, i, r)
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
    domain X's given split (header-less ``user item [1]`` lines, ids shared between the domains)."""
    folders = disencdr_folders(path)
    if not folders:
        raise DataError(f"{path}: no X_Y/ folder with train.txt and test.txt (DisenCDR layout)")
    domains = {}
    used: list[Path] = []
    for name, folder in folders.items():
        users: list[str] = []
        items: list[str] = []
        split: list[int] = []
        for fname, code in (("train.txt", TRAIN), ("test.txt", TEST)):
            f = folder / fname
            used.append(f)
            u, i, _, _ = read_triples(f, name, (2, 3), has_rating=False)
            users += u
            items += i
            split += [code] * len(u)
        domains[name] = _make(name, users, items, given_split=split)
    return Dataset(path.name, path, domains, _fingerprint(used))


def load_movielens_100k(path: Path) -> Dataset:
    data = path / "u.data"
    u, i, r, t = read_triples(data, "movies", 4, has_rating=True)
    titles: dict[str, str] = {}
    item_genres: dict[str, set[str]] = {}
    genres: list[str] = []
    genre_file = path / "u.genre"
    if genre_file.is_file():
        genres = [line.split("|")[0] for _, line in _lines(genre_file, "latin-1")]
    item_file = path / "u.item"
    for lineno, line in _lines(item_file, "latin-1"):
        parts = line.split("|")
        if len(parts) < 5:
            raise DataError(
                f"{item_file}:{lineno}: expected at least 5 '|' fields, got {len(parts)}"
            )
        flags = parts[5:]
        names = [g for g, flag in zip(genres, flags, strict=False) if flag == "1"]
        titles[parts[0]] = parts[1] + (f" [{'|'.join(names)}]" if names else "")
        item_genres[parts[0]] = set(names)
    user_file = path / "u.user"
    n_users = 0
    for lineno, line in _lines(user_file):
        if len(line.split("|")) != 5:
            raise DataError(
                f"{user_file}:{lineno}: expected 5 '|' fields 'id|age|gender|occupation|zip'"
            )
        n_users += 1
    domain = _make("movies", u, i, r, t, titles=titles)
    domain.stats["user_profiles"] = n_users
    domains = {"movies": domain}
    # Two genre domains with disjoint items and shared users, for a cross-domain pair that can be
    # downloaded: comedies that are not dramas, and dramas that are not comedies.
    for name, keep, drop in (("comedy", "Comedy", "Drama"), ("drama", "Drama", "Comedy")):
        rows = [
            n
            for n, item in enumerate(i)
            if keep in item_genres.get(item, ()) and drop not in item_genres.get(item, ())
        ]
        domains[name] = _make(
            name,
            [u[n] for n in rows],
            [i[n] for n in rows],
            [r[n] for n in rows],
            [t[n] for n in rows],
            titles={item: titles[item] for item in {i[n] for n in rows}},
        )
    return Dataset("movielens-100k", path, domains, _fingerprint([data, item_file, user_file]))


def load_movielens_1m_implicit(path: Path) -> Dataset:
    """LightGCN-style adjacency lists; the given files are kept as the given split."""
    users: list[str] = []
    items: list[str] = []
    split: list[int] = []
    files = []
    for fname, code in (("train.txt", TRAIN), ("valid.txt", VALID), ("test.txt", TEST)):
        f = path / fname
        files.append(f)
        for lineno, line in _lines(f):
            parts = line.split()
            for p in parts:
                if not p.isdigit():
                    raise DataError(f"{f}:{lineno}: id is not a non-negative integer: {p!r}")
            users += [parts[0]] * (len(parts) - 1)
            items += parts[1:]
            split += [code] * (len(parts) - 1)
    domain = _make("movies", users, items, given_split=split)
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


def _declared_domain(
    path: Path, decl_file: Path, name: str, spec: dict[str, object]
) -> tuple[DomainData, list[Path]]:
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
    parts = [("file", None)] if "file" in spec else [(k, c) for k, c in SPLIT_FILES if k in spec]
    sources: list[tuple[Batches, int | None]] = []
    files = []
    for key, code in parts:
        f = path / str(spec[key])
        files.append(f)
        sources.append(
            (
                table_batches(
                    f,
                    columns,
                    header,
                    None if delimiter is None else str(delimiter),
                    None if fmt is None else str(fmt),
                ),
                code,
            )
        )
    titles: dict[str, str] = {}
    if "titles" in spec:
        tf = path / str(spec["titles"])
        item_col = columns["item"] if isinstance(columns["item"], str) else "item_id"
        titles = read_titles(tf, item_col)
    encoded = _encode(
        name, sources, columns["rating"] is not None, columns["timestamp"] is not None
    )
    encoded.titles = titles
    domain = deduplicate(encoded)
    return domain, files


def load_declared(path: Path) -> Dataset:
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
    domains = {}
    files: list[Path] = []
    for name, spec in specs.items():
        if not isinstance(spec, dict):
            raise DataError(
                f"{decl_file}: domains.{name} must be a table ([domains.{name}] with file = ...), "
                f"got {type(spec).__name__} {spec!r}"
            )
        domains[name], used = _declared_domain(path, decl_file, name, spec)
        files += used
    return Dataset(str(decl.get("name", path.name)), path, domains, _fingerprint(files))


BUILTIN = {
    "amazon-books-movies": load_amazon_books_movies,
    "douban-book-music": load_douban_book_music,
    "amazon-sport-cloth": load_disencdr,
    "movielens-100k": load_movielens_100k,
    "movielens-1m-implicit": load_movielens_1m_implicit,
}


def load_dataset(path: Path) -> Dataset:
    """Load the data set in folder ``path`` (a built-in layout or one with ``dataset.toml``)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"missing data set folder: expected {path}")
    if (path / "dataset.toml").is_file():
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
