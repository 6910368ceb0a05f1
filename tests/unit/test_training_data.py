"""Loaders: built-in layouts, the generic declared format, malformed, duplicate and missing input."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from training.data.dataset import DOMAIN_KEYS, TOP_KEYS, load_dataset, read_table
from training.data.splits import make_split
from training.data.synthetic import make_synthetic
from training.errors import DataError


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_douban_layout_reads_and_reports_malformed_line(tmp_path: Path) -> None:
    root = tmp_path / "douban-book-music"
    _write(root / "douban_book_ratings.dat", "1\t10\t4\n2\t11\t5\n")
    _write(root / "douban_music_ratings.dat", "1\t7\t3\n2\t8\tfive\n")
    with pytest.raises(DataError, match=r"douban_music_ratings\.dat:2: rating is not a number"):
        load_dataset(root)
    _write(root / "douban_music_ratings.dat", "1\t7\t3\n2\t8\n")
    with pytest.raises(DataError, match=r"douban_music_ratings\.dat:2: expected 3 fields, got 2"):
        load_dataset(root)
    _write(root / "douban_music_ratings.dat", "1\t7\t3\n2\t8\t5")  # no trailing newline
    ds = load_dataset(root)
    assert sorted(ds.domains) == ["book", "music"]
    assert ds.domain("music").items.tolist() == ["7", "8"]
    assert ds.domain("music").ratings is not None
    assert ds.domain("music").ratings.tolist() == [3.0, 5.0]


def test_missing_file_is_named(tmp_path: Path) -> None:
    root = tmp_path / "amazon-books-movies"
    _write(root / "Amazon-Books-Dense.inter", "user_id\titem_id\trating\na\tb\t5.0\n")
    with pytest.raises(DataError, match=r"expected .*Amazon-Movies-Dense\.inter"):
        load_dataset(root)
    with pytest.raises(DataError, match="missing data set folder"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="unknown data set layout"):
        load_dataset(tmp_path)


def test_duplicates_removed_deterministically_last_row_wins(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "x.inter",
        "user_id:token\titem_id:token\trating:float\n"
        "u1\ti1\t5.0\nu1\ti1\t5.0\nu2\ti1\t1.0\nu1\ti2\t3.0\nu2\ti1\t4.0\n",
    )
    d = read_table(f, "x", rating="rating")
    assert d.stats == {
        "rows": 5,
        "unique_pairs": 3,
        "duplicate_rows_removed": 2,
        "conflicting_pairs": 1,
    }
    got = sorted(zip(d.users.tolist(), d.items.tolist(), d.ratings.tolist(), strict=True))  # type: ignore[union-attr]
    assert got == [("u1", "i1", 5.0), ("u1", "i2", 3.0), ("u2", "i1", 4.0)]


def test_declared_folder_with_csv_and_inter(tmp_path: Path) -> None:
    _write(tmp_path / "a.csv", "user,item,stars,ts\nx,1,5,100\ny,2,3,200\n")
    _write(tmp_path / "b.inter", "user_id:token\titem_id:token\nx\tp\nz\tq\n")
    _write(tmp_path / "titles.csv", "item,title\n1,One\n2,Two\n")
    _write(
        tmp_path / "dataset.toml",
        'name = "mine"\n[domains.alpha]\nfile = "a.csv"\nuser = "user"\nitem = "item"\n'
        'rating = "stars"\ntimestamp = "ts"\ntitles = "titles.csv"\n'
        '[domains.beta]\nfile = "b.inter"\n',
    )
    ds = load_dataset(tmp_path)
    assert ds.name == "mine"
    assert ds.domain("alpha").timestamps is not None
    assert ds.domain("alpha").titles == {"1": "One", "2": "Two"}
    assert ds.domain("beta").users.tolist() == ["x", "z"]
    _write(tmp_path / "a.csv", "user,item,stars,ts\nx,1,5,100\ny,2,3\n")
    with pytest.raises(DataError, match=r"a\.csv:3: expected 4 fields, got 3"):
        load_dataset(tmp_path)
    _write(tmp_path / "dataset.toml", '[domains.alpha]\nfile = "a.csv"\nuser = "who"\n')
    with pytest.raises(DataError, match=r"a\.csv:1: no user column 'who'"):
        load_dataset(tmp_path)


def test_movielens_100k_layout(tmp_path: Path) -> None:
    root = tmp_path / "movielens-100k"
    _write(root / "u.data", "1\t1\t5\t881250949\n2\t1\t3\t881250950\n")
    _write(root / "u.genre", "unknown|0\nAction|1\nComedy|2\n\n")
    _write(root / "u.item", "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1\n")
    _write(root / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n")
    ds = load_dataset(root)
    movies = ds.domain("movies")
    assert movies.titles["1"] == "Toy Story (1995) [Comedy]"
    assert movies.timestamps is not None and movies.timestamps.tolist() == [881250949, 881250950]
    assert movies.stats["user_profiles"] == 2
    _write(root / "u.user", "1|24|M\n")
    with pytest.raises(DataError, match=r"u\.user:1: expected 5"):
        load_dataset(root)


def test_movielens_1m_and_sport_cloth_layouts(tmp_path: Path) -> None:
    ml = tmp_path / "movielens-1m-implicit"
    _write(ml / "train.txt", "0 1 2 3\n1 2 3\n")
    _write(ml / "valid.txt", "0 4\n")
    _write(ml / "test.txt", "0 5\n1 x\n")
    with pytest.raises(DataError, match=r"test\.txt:2: id is not a non-negative integer"):
        load_dataset(ml)
    _write(ml / "test.txt", "0 5\n1 4\n")
    d = load_dataset(ml).domain("movies")
    assert len(d) == 8 and np.bincount(d.given_split).tolist() == [5, 1, 2]  # type: ignore[arg-type]
    sc = tmp_path / "amazon-sport-cloth"
    for folder in ("sport_cloth", "cloth_sport"):
        _write(sc / folder / "train.txt", "0\t1\t1\n0\t2\t1\n1\t1\t1\n")
        _write(sc / folder / "test.txt", "0\t3\t1\n")
    ds = load_dataset(sc)
    assert ds.domain("cloth").given_split.tolist() == [0, 0, 0, 2]  # type: ignore[union-attr]


def test_synthetic_is_deterministic() -> None:
    a, b = make_synthetic(seed=3), make_synthetic(seed=3)
    for name in ("source", "target"):
        assert a.domain(name).users.tolist() == b.domain(name).users.tolist()
        assert a.domain(name).items.tolist() == b.domain(name).items.tolist()
    assert (
        make_synthetic(seed=4).domain("target").items.tolist() != a.domain("target").items.tolist()
    )


def test_real_amazon_duplicates_match_source_notes(shared_data_dir: Path) -> None:
    """SOURCE.txt: Books 31,504 unique pairs (919 conflicting), Movies 62,084 (276 conflicting)."""
    ds = load_dataset(shared_data_dir / "amazon-books-movies")
    books, movies = ds.domain("books").stats, ds.domain("movies").stats
    assert (books["rows"], books["unique_pairs"], books["conflicting_pairs"]) == (38149, 31504, 919)
    assert (movies["rows"], movies["unique_pairs"], movies["conflicting_pairs"]) == (
        68023,
        62084,
        276,
    )


def test_numeric_ids_that_concatenate_alike_are_not_duplicates(tmp_path: Path) -> None:
    # ("1", "23") and ("12", "3") are different pairs; so are ("1", "1") and ("11", "").
    root = tmp_path / "pair"
    _write(root / "a.csv", "user_id,item_id\n1,23\n12,3\n1,1\n11,1\n")
    _write(root / "dataset.toml", '[domains.a]\nfile = "a.csv"\n')
    a = load_dataset(root).domain("a")
    assert len(a) == 4
    assert a.stats["duplicate_rows_removed"] == 0


def test_real_data_sets_keep_every_pair(shared_data_dir: Path) -> None:
    """The verified counts of each SOURCE.txt: nothing is lost to de-duplication."""
    douban = load_dataset(shared_data_dir / "douban-book-music")
    assert (len(douban.domain("book")), len(douban.domain("music"))) == (96041, 69709)
    assert len(load_dataset(shared_data_dir / "movielens-1m-implicit").domain("movies")) == 836478
    ml100k = load_dataset(shared_data_dir / "movielens-100k")
    assert len(ml100k.domain("movies")) == 100000


def test_movielens_100k_genre_domains_share_users_not_items(shared_data_dir: Path) -> None:
    ds = load_dataset(shared_data_dir / "movielens-100k")
    comedy, drama = ds.domain("comedy"), ds.domain("drama")
    assert not set(comedy.items.tolist()) & set(drama.items.tolist())
    shared = set(comedy.users.tolist()) & set(drama.users.tolist())
    assert len(shared) > 900
    assert all(
        "Comedy" in comedy.titles[i] and "Drama" not in comedy.titles[i] for i in comedy.titles
    )
    assert len(comedy) + len(drama) < 100000


def _declare(folder: Path, text: str) -> None:
    _write(folder / "dataset.toml", text)


def test_titles_file_without_the_item_column_names_the_item_column(tmp_path: Path) -> None:
    _write(tmp_path / "a.csv", "user_id,item_id\nx,1\n")
    _write(tmp_path / "titles.csv", "item,title\n1,One\n")
    _declare(tmp_path, '[domains.a]\nfile = "a.csv"\ntitles = "titles.csv"\n')
    with pytest.raises(DataError, match=r"titles\.csv:1: no item column 'item_id' in header"):
        load_dataset(tmp_path)


def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_bytes(b"user_id,item_id\nx,1\ny,caf\xe9\n")
    _declare(tmp_path, '[domains.a]\nfile = "a.csv"\n')
    with pytest.raises(DataError, match=r"a\.csv:3: not utf-8 text \(byte 0xe9 at column 6\)"):
        load_dataset(tmp_path)


def test_binary_file_given_as_csv_is_a_data_error(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10"
    (tmp_path / "a.csv").write_bytes(png)
    _declare(tmp_path, '[domains.a]\nfile = "a.csv"\n')
    with pytest.raises(DataError, match=r"a\.csv:1: not utf-8 text .*binary file"):
        load_dataset(tmp_path)
    # NUL bytes in otherwise valid text: a binary file, or an id that cannot round-trip
    (tmp_path / "a.csv").write_bytes(b"user_id,item_id\nx,1\ny,i\x00\n")
    with pytest.raises(DataError, match=r"a\.csv:3: control character '\\x00' at column 4"):
        load_dataset(tmp_path)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[domains]\nbooks = 5\n", r"domains\.books must be a table .*got int 5"),
        ("[domains.books]\nfile = 5\n", r"domains\.books\.file must be a file name, got int 5"),
        ('[domains.books]\nfile = "a.csv"\nuser = 0\n', r"domains\.books\.user = 0: a column name"),
        ('[domains.books]\nfile = "a.csv"\nrating = "r"\nratings = "r"\n', "did you mean 'rating'"),
        ('nme = "x"\n[domains.books]\nfile = "a.csv"\n', r"unknown key 'nme'; did you mean 'name'"),
        ('[domains.books]\ntrain = "a.csv"\n', "a given split needs train and test"),
        ('[domains.books]\nfile = "a.csv"\ndelimiter = "::"\n', "delimiter must be one character"),
    ],
)
def test_malformed_dataset_toml_names_the_file_and_key(
    tmp_path: Path, toml: str, message: str
) -> None:
    _write(tmp_path / "a.csv", "user_id,item_id,r\nx,1,5\n")
    _declare(tmp_path, toml)
    with pytest.raises(DataError, match=message) as err:
        load_dataset(tmp_path)
    assert str(err.value).startswith(str(tmp_path / "dataset.toml"))


def test_one_long_id_costs_only_its_own_length(tmp_path: Path) -> None:
    rows = [f"u{n},i{n % 50}" for n in range(2000)] + ["u0," + "x" * 20_000]
    _write(tmp_path / "a.csv", "user_id,item_id\n" + "\n".join(rows) + "\n")
    _declare(tmp_path, '[domains.a]\nfile = "a.csv"\n')
    d = load_dataset(tmp_path).domain("a")
    assert len(d) == 2001 and max(len(i) for i in d.items.tolist()) == 20_000
    # a fixed-width array would hold 2001 x 20,000 characters (160 MB); ids are Python strings
    assert d.items.dtype == object and d.users.dtype == object
    assert d.items.nbytes + d.users.nbytes < 100_000


def test_disencdr_layout_is_read_from_any_folder_name(tmp_path: Path) -> None:
    root = tmp_path / "my-games"
    for folder in ("game_video", "video_game"):
        _write(root / folder / "train.txt", "0\t1\t1\n0\t2\t1\n1\t1\t1\n")
        _write(root / folder / "test.txt", "0\t3\t1\n1\t4\n")
    ds = load_dataset(root)
    assert ds.name == "my-games" and sorted(ds.domains) == ["game", "video"]
    assert ds.domain("video").given_split.tolist() == [0, 0, 0, 2, 2]  # type: ignore[union-attr]


def test_headerless_files_and_a_given_split_declared(tmp_path: Path) -> None:
    _write(tmp_path / "tr.tsv", "u1\ti1\t1\nu1\ti2\t1\nu2\ti1\t1\n")
    _write(tmp_path / "te.tsv", "u1\ti3\t1\nu2\ti2\t1\n")
    _declare(
        tmp_path,
        '[domains.a]\ntrain = "tr.tsv"\ntest = "te.tsv"\nheader = false\nuser = 0\nitem = 1\n',
    )
    d = load_dataset(tmp_path).domain("a")
    assert d.users.tolist() == ["u1", "u1", "u2", "u1", "u2"]
    assert d.given_split.tolist() == [0, 0, 0, 2, 2]  # type: ignore[union-attr]
    assert d.ratings is None
    _declare(
        tmp_path,
        '[domains.a]\ntrain = "tr.tsv"\ntest = "te.tsv"\nheader = false\nitem = 3\n',
    )
    with pytest.raises(DataError, match=r"tr\.tsv:1: item column 3 \(0-based\) but the row has 3"):
        load_dataset(tmp_path)


def test_implicit_column_of_ones_names_the_threshold_setting(tmp_path: Path) -> None:
    rows = [f"u{u}\ti{i}\t1" for u in range(5) for i in range(5)]
    _write(tmp_path / "a.tsv", "\n".join(rows) + "\n")
    _declare(tmp_path, '[domains.a]\nfile = "a.tsv"\nheader = false\nrating = 2\n')
    ds = load_dataset(tmp_path)
    with pytest.raises(DataError, match=r"rating_threshold = 4 .*implicit column of 1s needs"):
        make_split(ds, "a", None, rating_threshold=4.0)
    assert len(make_split(ds, "a", None, rating_threshold=1.0).train) > 0


def test_readme_documents_every_dataset_toml_key_and_its_example_loads(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "training" / "README.md").read_text()
    for key in [*TOP_KEYS, *DOMAIN_KEYS]:
        assert f"| `{key}`" in readme or f", `{key}`" in readme, key
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    decl = tomllib.loads(example)
    _write(tmp_path / "books.csv", "user_id,item_id,rating,ts\nu1,b1,5,1\nu2,b2,4,2\n")
    _write(tmp_path / "titles.csv", "item_id,title\nb1,One\n")
    for part in ("train", "valid", "test"):
        _write(tmp_path / "films" / f"{part}.txt", f"u1\t{part}1\nu2\t{part}2\n")
    _write(tmp_path / "dataset.toml", example)
    ds = load_dataset(tmp_path)
    assert ds.name == decl["name"] and sorted(ds.domains) == ["books", "films"]
    assert ds.domain("books").titles == {"b1": "One"}
    assert ds.domain("films").given_split.tolist() == [0, 0, 1, 1, 2, 2]  # type: ignore[union-attr]
