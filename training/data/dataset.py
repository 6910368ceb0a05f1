"""In-memory data set types and the loaders for every supported on-disk layout.

A data set is a folder plus a small declaration of its domains. The built-in folders of
``../shared/data`` are recognised by name; any other folder declares itself in ``dataset.toml``::

    name = "my-pair"
    [domains.books]
    file = "books.csv"        # .csv, .tsv, .txt or RecBole atomic .inter
    user = "user_id"          # column names (header required for csv/tsv/inter)
    item = "item_id"
    rating = "rating"         # optional
    timestamp = "timestamp"   # optional
    titles = "items.csv"      # optional: item,title file

Every loader reports a malformed line with its file and line number and never drops it silently.
Duplicate (user, item) rows are removed deterministically (the last row wins) and counted.
"""

from __future__ import annotations

import csv
import hashlib
import logging
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
    users: np.ndarray  # str, one per interaction
    items: np.ndarray  # str, one per interaction
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


def _lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    with _require(path).open(encoding=encoding, newline="") as fh:
        for lineno, line in enumerate(fh, start=1):
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
    # "\x1f" (unit separator) keeps ("1", "23") and ("12", "3") apart; NUL would not, since
    # numpy's fixed-width strings drop trailing NULs before the concatenation.
    pairs = np.char.add(np.char.add(domain.users.astype(str), "\x1f"), domain.items.astype(str))
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
            users=np.asarray(users, dtype=object).astype(str),
            items=np.asarray(items, dtype=object).astype(str),
            ratings=None if ratings is None else np.asarray(ratings, dtype=np.float32),
            timestamps=None if timestamps is None else np.asarray(timestamps, dtype=np.int64),
            given_split=None if given_split is None else np.asarray(given_split, dtype=np.int8),
            titles=titles or {},
        )
    )


# ----------------------------------------------------------------------------- table readers


def read_table(
    path: Path,
    domain: str,
    user: str = "user_id",
    item: str = "item_id",
    rating: str | None = None,
    timestamp: str | None = None,
    delimiter: str | None = None,
) -> DomainData:
    """Read a CSV/TSV with a header, or a RecBole atomic ``.inter`` file (``name:type`` headers)."""
    _require(path)
    if delimiter is None:
        delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = [h.split(":", 1)[0].strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{path}:1: empty file, expected a header line") from None
        cols: dict[str, int] = {}
        for role, col in (
            ("user", user),
            ("item", item),
            ("rating", rating),
            ("timestamp", timestamp),
        ):
            if col is None:
                continue
            if col not in header:
                raise DataError(f"{path}:1: no {role} column {col!r} in header {header}")
            cols[role] = header.index(col)
        users: list[str] = []
        items: list[str] = []
        ratings: list[float] = []
        stamps: list[int] = []
        width = len(header)
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != width:
                raise DataError(f"{path}:{lineno}: expected {width} fields, got {len(row)}")
            u, i = row[cols["user"]].strip(), row[cols["item"]].strip()
            if not u or not i:
                raise DataError(f"{path}:{lineno}: empty user or item id")
            users.append(u)
            items.append(i)
            if "rating" in cols:
                ratings.append(_float(row[cols["rating"]], path, lineno, "rating"))
            if "timestamp" in cols:
                stamps.append(_int(row[cols["timestamp"]], path, lineno, "timestamp"))
    return _make(
        domain,
        users,
        items,
        ratings if "rating" in cols else None,
        stamps if "timestamp" in cols else None,
    )


def read_triples(
    path: Path, domain: str, n_fields: int, has_rating: bool, split: int | None = None
) -> tuple[list[str], list[str], list[float], list[int]]:
    """Read a header-less whitespace/tab separated ``user item [rating [timestamp]]`` file."""
    users: list[str] = []
    items: list[str] = []
    ratings: list[float] = []
    stamps: list[int] = []
    for lineno, line in _lines(path):
        parts = line.split()
        if len(parts) != n_fields:
            raise DataError(f"{path}:{lineno}: expected {n_fields} fields, got {len(parts)}")
        users.append(parts[0])
        items.append(parts[1])
        if has_rating:
            ratings.append(_float(parts[2], path, lineno, "rating"))
        if n_fields >= 4:
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


def load_amazon_sport_cloth(path: Path) -> Dataset:
    """The DisenCDR split: ``X_Y/train.txt`` and ``X_Y/test.txt`` are domain X's given split."""
    domains = {}
    used: list[Path] = []
    for name, folder in (("sport", "sport_cloth"), ("cloth", "cloth_sport")):
        users: list[str] = []
        items: list[str] = []
        split: list[int] = []
        for fname, code in (("train.txt", TRAIN), ("test.txt", TEST)):
            f = path / folder / fname
            used.append(f)
            u, i, _, _ = read_triples(f, name, 3, has_rating=False)
            users += u
            items += i
            split += [code] * len(u)
        domains[name] = _make(name, users, items, given_split=split)
    return Dataset("amazon-sport-cloth", path, domains, _fingerprint(used))


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


def load_declared(path: Path) -> Dataset:
    decl_file = path / "dataset.toml"
    try:
        decl = tomllib.loads(decl_file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"{decl_file}: invalid TOML: {exc}") from None
    specs = decl.get("domains")
    if not isinstance(specs, dict) or not specs:
        raise DataError(f"{decl_file}: expected at least one [domains.<name>] table")
    domains = {}
    files = []
    for name, spec in specs.items():
        if "file" not in spec:
            raise DataError(f"{decl_file}: domains.{name}.file is required")
        f = path / spec["file"]
        files.append(f)
        domains[name] = read_table(
            f,
            name,
            user=spec.get("user", "user_id"),
            item=spec.get("item", "item_id"),
            rating=spec.get("rating"),
            timestamp=spec.get("timestamp"),
            delimiter=spec.get("delimiter"),
        )
        if "titles" in spec:
            tf = path / spec["titles"]
            table = read_table(tf, name, user=spec.get("item", "item_id"), item="title")
            domains[name].titles = dict(
                zip(table.users.tolist(), table.items.tolist(), strict=True)
            )
    return Dataset(str(decl.get("name", path.name)), path, domains, _fingerprint(files))


BUILTIN = {
    "amazon-books-movies": load_amazon_books_movies,
    "douban-book-music": load_douban_book_music,
    "amazon-sport-cloth": load_amazon_sport_cloth,
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
    else:
        raise DataError(
            f"{path}: unknown data set layout; expected a dataset.toml declaration or one of "
            f"{', '.join(sorted(BUILTIN))}"
        )
    for d in ds.domains.values():
        logger.info("data set %s domain %s: %s", ds.name, d.name, d.stats)
    return ds
