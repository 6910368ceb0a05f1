"""The `dataset.toml` and titles file that training/README.md documents load as it says they do."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from training.data.dataset import load_dataset
from training.errors import DataError

README = Path(__file__).resolve().parents[2] / "training" / "README.md"


def _block(lang: str, contains: str) -> str:
    blocks = re.findall(rf"^ *```{lang}\n(.*?)^ *```", README.read_text(), re.M | re.S)
    found = [b for b in blocks if contains in b]
    assert len(found) == 1, f"expected one ```{lang} block with {contains!r} in {README}"
    lines = found[0].splitlines()
    indent = min(len(ln) - len(ln.lstrip()) for ln in lines if ln.strip())
    return "\n".join(ln[indent:] for ln in lines) + "\n"


@pytest.fixture
def declared(tmp_path: Path) -> Path:
    """The README's example data set: its dataset.toml and titles file, and interactions files
    written in the formats it describes."""
    folder = tmp_path / "my-pair"
    folder.mkdir()
    (folder / "dataset.toml").write_text(_block("toml", "book_titles.csv"))
    (folder / "book_titles.csv").write_text(_block("csv", "item_id,title"))
    (folder / "books.csv").write_text(
        "user_id;item_id;rating;ts;shelf\n"
        'alice;0441172717;5;100;"sci-fi; classics"\n'
        "alice;0345391802;3;101;humour\n"
        "bob;0345391802;4;102;humour\n"
    )
    (folder / "movies.tsv").write_text("user_id\titem_id\nalice\ttt0087182\nbob\ttt0371724\n")
    return folder


def test_the_documented_declaration_loads(declared: Path) -> None:
    ds = load_dataset(declared)
    assert ds.name == "my-pair"
    books, movies = ds.domain("books"), ds.domain("movies")
    # `delimiter = ";"` splits books.csv, a quoted field may hold it; movies.tsv is tab-separated.
    assert books.users.tolist() == ["alice", "alice", "bob"]
    assert books.items.tolist() == ["0441172717", "0345391802", "0345391802"]
    assert books.ratings is not None and books.ratings.tolist() == [5.0, 3.0, 4.0]
    assert books.timestamps is not None and books.timestamps.tolist() == [100, 101, 102]
    assert movies.items.tolist() == ["tt0087182", "tt0371724"]
    assert movies.ratings is None  # no rating column: every row is a positive
    # Titles: a header with the item column and `title`; a quoted title keeps its comma.
    assert books.titles == {
        "0441172717": "Dune",
        "0345391802": "Hitchhiker's Guide to the Galaxy, The",
    }
    assert movies.titles == {}


def test_the_delimiter_applies_to_the_interactions_file_only(declared: Path) -> None:
    (declared / "book_titles.csv").write_text("item_id;title\n0441172717;Dune\n")
    with pytest.raises(DataError, match="book_titles.csv:1"):
        load_dataset(declared)


def test_without_a_delimiter_a_csv_file_is_comma_separated(declared: Path) -> None:
    toml = (declared / "dataset.toml").read_text()
    (declared / "dataset.toml").write_text(re.sub(r'^delimiter = ";".*\n', "", toml, flags=re.M))
    (declared / "books.csv").write_text("user_id,item_id,rating,ts\nalice,0441172717,5,100\n")
    assert load_dataset(declared).domain("books").items.tolist() == ["0441172717"]
