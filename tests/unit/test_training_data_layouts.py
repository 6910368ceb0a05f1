"""Built-in layouts on pyarrow: the shared data sets load exactly as before, bad files are named."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from training.cli import main
from training.data.dataset import DomainData, load_dataset
from training.errors import DataError

# Digests of every domain of the shared data sets as the previous reader (a Python loop over the
# lines of each file) loaded them, recorded before the layouts moved to pyarrow.csv.
RECORDED = json.loads((Path(__file__).with_name("layout_digests.json")).read_text())

# The files each built-in folder reads (one missing: the folder's test is skipped, saying which).
FILES = {
    "movielens-1m-implicit": ["train.txt", "valid.txt", "test.txt"],
    "douban-book-music": ["douban_book_ratings.dat", "douban_music_ratings.dat"],
    "amazon-sport-cloth": [
        f"{p}/{f}" for p in ("sport_cloth", "cloth_sport") for f in ("train.txt", "test.txt")
    ],
    "movielens-100k": ["u.data", "u.item", "u.user", "u.genre"],
    "amazon-books-movies": ["Amazon-Books-Dense.inter", "Amazon-Movies-Dense.inter"],
}


def _h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def digest(d: DomainData) -> dict[str, Any]:
    """What identifies a loaded domain: sizes, the ids per row, the codes, every numeric column,
    the titles and the loader's counts."""
    return {
        "rows": len(d),
        "users": len(d.user_vocab),
        "items": len(d.item_vocab),
        "user_ids": _h("\n".join(d.users.tolist()).encode()),
        "item_ids": _h("\n".join(d.items.tolist()).encode()),
        "user_codes": _h(d.user_codes.astype("<i4").tobytes()),
        "item_codes": _h(d.item_codes.astype("<i4").tobytes()),
        "ratings": None if d.ratings is None else _h(d.ratings.astype("<f4").tobytes()),
        "timestamps": None if d.timestamps is None else _h(d.timestamps.astype("<i8").tobytes()),
        "given_split": None if d.given_split is None else _h(d.given_split.astype("i1").tobytes()),
        "titles": _h(json.dumps(sorted(d.titles.items())).encode()),
        "stats": d.stats,
    }


@pytest.mark.parametrize("folder", sorted(FILES))
def test_shared_layouts_load_as_the_line_reader_did(shared_data_dir: Path, folder: str) -> None:
    root = shared_data_dir / folder
    missing = [f for f in FILES[folder] if not (root / f).is_file()]
    if missing:
        pytest.skip(f"{root} lacks {', '.join(missing)}")
    ds = load_dataset(root)
    want = RECORDED[folder]
    assert ds.fingerprint == want["fingerprint"], "not the files the digests were recorded from"
    assert sorted(ds.domains) == sorted(want["domains"])
    for name, d in ds.domains.items():
        assert d.user_codes.dtype == np.int32 and d.item_codes.dtype == np.int32
        assert digest(d) == want["domains"][name], name


def test_digest_tells_a_changed_domain_apart(shared_data_dir: Path) -> None:
    root = shared_data_dir / "douban-book-music"
    if not (root / "douban_book_ratings.dat").is_file():
        pytest.skip(f"{root} lacks douban_book_ratings.dat")
    book = load_dataset(root).domain("book")
    assert book.ratings is not None
    book.ratings[0] += 1
    assert digest(book)["ratings"] != RECORDED["douban-book-music"]["domains"]["book"]["ratings"]


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


def _douban(root: Path, music: str | bytes) -> Path:
    _write(root / "douban_book_ratings.dat", "1\t10\t4\n2\t11\t5\n")
    _write(root / "douban_music_ratings.dat", music)
    return root


@pytest.mark.parametrize(
    ("music", "message"),
    [
        ("", r"douban_music_ratings\.dat: empty file"),
        ("\n \n\t\n", r"douban_music_ratings\.dat: empty file"),
        ("1\t7\t3\n\n\n2\t8\n", r"douban_music_ratings\.dat:4: expected 3 fields, got 2"),
        ("1\t7\n2\t8\n", r"douban_music_ratings\.dat:1: expected 3 fields, got 2"),
        ("1\t7\t3\t9\n", r"douban_music_ratings\.dat:1: expected 3 fields, got 4"),
        ("1\t7\t3\n  \n2\t8\tfive\n", r"\.dat:3: rating is not a number: 'five'"),
        ("1\t7\t3\n2\t8\tnan\n", r"\.dat:2: rating is not finite: 'nan'"),
        ("1\t7\t3\n2\t \t4\n", r"\.dat:2: empty item id"),
        (b"1\t7\t3\n2\t\xff\t4\n", r"\.dat:2: not utf-8 text"),
        ("1\t7\t3\n2\t8\x00\t4\n", r"\.dat:2: control character"),
    ],
)
def test_douban_bad_files_name_the_line(tmp_path: Path, music: str | bytes, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_dataset(_douban(tmp_path / "douban-book-music", music))


def test_douban_skips_blank_lines_and_reads_crlf(tmp_path: Path) -> None:
    root = _douban(tmp_path / "douban-book-music", "\n1\t7\t3\r\n \t \n\r\n2\t 8 \t5")
    music = load_dataset(root).domain("music")
    assert music.users.tolist() == ["1", "2"] and music.items.tolist() == ["7", "8"]
    assert music.ratings is not None and music.ratings.tolist() == [3.0, 5.0]


def test_bad_row_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _douban(tmp_path / "douban-book-music", "1\t7\t3\n2\t8\n")
    argv = ["train", f"--data-dir={tmp_path}", "--dataset=douban-book-music", "--source=book"]
    assert main([*argv, "--target=music", "--threads=1", f"--run-dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("error: ") and "douban_music_ratings.dat:2:" in err[0]
    )


def _ml100k(root: Path, data: str, item: str = "1|Toy Story (1995)|x||u|0|0|1\n") -> Path:
    _write(root / "u.data", data)
    _write(root / "u.genre", "unknown|0\nAction|1\nComedy|2\n\n")
    _write(root / "u.item", item)
    _write(root / "u.user", "1|24|M|technician|85711\n")
    return root


def test_movielens_100k_bad_rows(tmp_path: Path) -> None:
    root = tmp_path / "movielens-100k"
    with pytest.raises(DataError, match=r"u\.data:2: timestamp is not an integer: '8.5'"):
        load_dataset(_ml100k(root, "1\t1\t5\t881250949\n1\t2\t3\t8.5\n"))
    with pytest.raises(DataError, match=r"u\.data:1: expected 4 fields, got 3"):
        load_dataset(_ml100k(root, "1\t1\t5\n"))
    with pytest.raises(DataError, match=r"u\.item:1: expected at least 5 fields, got 3"):
        load_dataset(_ml100k(root, "1\t1\t5\t9\n", item="1|Toy Story|x\n"))
    with pytest.raises(DataError, match=r"u\.item:2: expected 8 fields, got 6"):
        load_dataset(_ml100k(root, "1\t1\t5\t9\n", item="1|A|x||u|0|0|1\n2|B|x||u|1\n"))
    latin = "1|Caf\xe9 (1995)|x||u|0|1|1\n".encode("latin-1")
    _write(root / "u.item", latin)
    movies = load_dataset(root).domain("movies")
    assert movies.titles == {"1": "Caf\xe9 (1995) [Action|Comedy]"}


def test_disencdr_and_adjacency_lists_name_the_line(tmp_path: Path) -> None:
    sc = tmp_path / "amazon-sport-cloth"
    for folder in ("sport_cloth", "cloth_sport"):
        _write(sc / folder / "train.txt", "0\t1\t1\n0 2\n")
        _write(sc / folder / "test.txt", "0\t3\t1\n\n1\t4\t1\t7\n")
    with pytest.raises(DataError, match=r"test\.txt:3: expected 2 or 3 fields, got 4"):
        load_dataset(sc)
    _write(sc / "cloth_sport" / "test.txt", "")
    _write(sc / "sport_cloth" / "test.txt", "")
    with pytest.raises(DataError, match=r"test\.txt: empty file"):
        load_dataset(sc)
    ml = tmp_path / "movielens-1m-implicit"
    _write(ml / "train.txt", "0 1 2\n\n  1   2\t3  \n2\n")
    _write(ml / "valid.txt", "0 4\n")
    _write(ml / "test.txt", "0 5\n\n\n1 4 x7\n")
    with pytest.raises(DataError, match=r"test\.txt:4: id is not a non-negative integer: 'x7'"):
        load_dataset(ml)
    _write(ml / "test.txt", "0 5\n")
    d = load_dataset(ml).domain("movies")
    got = list(zip(d.users.tolist(), d.items.tolist(), d.given_split.tolist(), strict=True))  # type: ignore[union-attr]
    assert got == [("0", "1", 0), ("0", "2", 0), ("1", "2", 0), ("1", "3", 0), ("0", "4", 1)] + [
        ("0", "5", 2)
    ]


def test_movielens_1m_release_with_double_colons(tmp_path: Path) -> None:
    root = tmp_path / "ml-1m"
    _write(
        root / "ratings.dat",
        "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n1::1193::2::978300761\n",
    )
    _write(
        root / "movies.dat",
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::James (1996)::Animation|Musical\n",
    )
    ds = load_dataset(root)
    d = ds.domain("movies")
    rows = sorted(zip(d.users.tolist(), d.items.tolist(), d.ratings.tolist(), strict=True))  # type: ignore[union-attr]
    assert rows == [("1", "1193", 2.0), ("1", "661", 3.0), ("2", "1193", 4.0)]  # last row wins
    assert d.timestamps is not None and sorted(d.timestamps.tolist()) == [
        978298413,
        978300761,
        978302109,
    ]
    assert d.stats["duplicate_rows_removed"] == 1 and d.stats["conflicting_pairs"] == 1
    assert d.titles["661"] == "James (1996) [Animation|Musical]"
    _write(root / "ratings.dat", "1::1193::5::978300760\n\n1::661::3\n")
    with pytest.raises(DataError, match=r"ratings\.dat:3: expected 4 '::' fields, got 3"):
        load_dataset(root)
    _write(root / "ratings.dat", "1::1193::5::978300760\n1::661::three::978302109\n")
    with pytest.raises(DataError, match=r"ratings\.dat:2: rating is not a number: 'three'"):
        load_dataset(root)
    _write(root / "ratings.dat", "")
    with pytest.raises(DataError, match=r"ratings\.dat: empty file"):
        load_dataset(root)
