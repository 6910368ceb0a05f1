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

import csv
import difflib
import hashlib
import logging
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.errors import DataError

logger = logging.getLogger(__name__)

TRAIN, VALID, TEST = 0, 1, 2  # codes of a split given with the data


@dataclass
class DomainData:
    """All interactions of one domain, with raw (string) ids."""

    name: str
    users: np.ndarray  # str (object array of Python strings), one per interaction
    items: np.ndarray  # str (object array of Python strings), one per interaction
    ratings: np.ndarray | None = None  # float32, explicit feedback
    timestamps: np.ndarray | None = None  # int64
    given_split: np.ndarray | None = None  # int8 TRAIN/VALID/TEST when the data fixes the split
    titles: dict[str, str] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.users.shape[0])

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
        return DomainData(
            name=self.name,
            users=self.users[keep],
            items=self.items[keep],
            ratings=self.ratings[keep],
            timestamps=None if self.timestamps is None else self.timestamps[keep],
            given_split=None if self.given_split is None else self.given_split[keep],
            titles=self.titles,
            stats=dict(self.stats, positives=int(keep.sum())),
        )


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
    for p in sorted(paths):
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
    """Keep the last row of every (user, item) pair; record how many rows went and conflicted."""
    n = len(domain)
    # "\x1f" (unit separator, refused in ids) keeps ("1", "23") and ("12", "3") apart
    pairs = _ids(
        [f"{u}\x1f{i}" for u, i in zip(domain.users.tolist(), domain.items.tolist(), strict=True)]
    )
    # last occurrence: unique over the reversed array
    _, rev_first = np.unique(pairs[::-1], return_index=True)
    keep = np.sort(n - 1 - rev_first)
    conflicting = 0
    if domain.ratings is not None and keep.size < n:
        order = np.argsort(pairs, kind="stable")
        sp, sr = pairs[order], domain.ratings[order]
        starts = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1]])
        mins = np.minimum.reduceat(sr, starts)
        maxs = np.maximum.reduceat(sr, starts)
        conflicting = int((mins != maxs).sum())
    stats = dict(
        domain.stats,
        rows=n,
        unique_pairs=int(keep.size),
        duplicate_rows_removed=int(n - keep.size),
        conflicting_pairs=conflicting,
    )
    if keep.size < n:
        logger.info(
            "domain %s: removed %d duplicate rows (%d pairs with conflicting ratings; last row kept)",
            domain.name,
            n - keep.size,
            conflicting,
        )
    return DomainData(
        name=domain.name,
        users=domain.users[keep],
        items=domain.items[keep],
        ratings=None if domain.ratings is None else domain.ratings[keep],
        timestamps=None if domain.timestamps is None else domain.timestamps[keep],
        given_split=None if domain.given_split is None else domain.given_split[keep],
        titles=domain.titles,
        stats=stats,
    )


def _ids(values: list[str]) -> np.ndarray:
    """Ids as an object array of Python strings: each costs its own length.

    (A fixed-width numpy string array costs its longest id on every row: one 20,000-character id
    among 100,000 rows is 8 GB of ``<U20000``.)
    """
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _make(
    name: str,
    users: list[str],
    items: list[str],
    ratings: list[float] | None = None,
    timestamps: list[int] | None = None,
    given_split: list[int] | None = None,
    titles: dict[str, str] | None = None,
) -> DomainData:
    return deduplicate(
        DomainData(
            name=name,
            users=_ids(users),
            items=_ids(items),
            ratings=None if ratings is None else np.asarray(ratings, dtype=np.float32),
            timestamps=None if timestamps is None else np.asarray(timestamps, dtype=np.int64),
            given_split=None if given_split is None else np.asarray(given_split, dtype=np.int8),
            titles=titles or {},
        )
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


def read_table(
    path: Path,
    domain: str,
    user: Column = "user_id",
    item: Column = "item_id",
    rating: Column | None = None,
    timestamp: Column | None = None,
    delimiter: str | None = None,
    header: bool = True,
) -> DomainData:
    """Read a CSV/TSV with a header, or a RecBole atomic ``.inter`` file (``name:type`` headers).

    With ``header=False`` the columns are 0-based indices. The delimiter defaults to ``,`` for
    ``.csv`` files and a tab otherwise.
    """
    users, items, ratings, stamps = _read_rows(
        path, user, item, rating, timestamp, delimiter, header
    )
    return _make(domain, users, items, ratings, stamps)


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
    parts = [("file", None)] if "file" in spec else [(k, c) for k, c in SPLIT_FILES if k in spec]
    users: list[str] = []
    items: list[str] = []
    ratings: list[float] = []
    stamps: list[int] = []
    split: list[int] = []
    files = []
    for key, code in parts:
        f = path / str(spec[key])
        files.append(f)
        u, i, r, t = _read_rows(
            f,
            columns["user"],  # type: ignore[arg-type]
            columns["item"],  # type: ignore[arg-type]
            columns["rating"],
            columns["timestamp"],
            None if delimiter is None else str(delimiter),
            header,
        )
        users += u
        items += i
        ratings += r or []
        stamps += t or []
        if code is not None:
            split += [code] * len(u)
    titles: dict[str, str] = {}
    if "titles" in spec:
        tf = path / str(spec["titles"])
        item_col = columns["item"] if isinstance(columns["item"], str) else "item_id"
        titles = read_titles(tf, item_col)
    domain = _make(
        name,
        users,
        items,
        ratings if columns["rating"] is not None else None,
        stamps if columns["timestamp"] is not None else None,
        given_split=split or None,
        titles=titles,
    )
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
