"""Columnar loading: Parquet input, the pyarrow readers' error paths, the codes, the generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.data import dataset as dataset_module
from training.data.dataset import load_dataset, read_table
from training.data.splits import make_split
from training.data.synthetic import ScaleSpec, main, write_synthetic
from training.errors import DataError


def _declare(folder: Path, text: str) -> None:
    (folder / "dataset.toml").write_text(text, encoding="utf-8")


def _parquet(path: Path, **cols: list[object]) -> Path:
    pq.write_table(pa.table(cols), path)
    return path


def test_parquet_reads_like_the_same_csv(tmp_path: Path) -> None:
    rows = [("u1", "i1", 5.0, 10), ("u2", "i1", 3.0, 11), ("u1", "i2", 4.0, 12)]
    rows += [("u1", "i1", 2.0, 13)]  # a duplicate pair with another rating: the last row wins
    csv_text = "user_id,item_id,rating,ts\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows)
    (tmp_path / "a.csv").write_text(csv_text, encoding="utf-8")
    _parquet(
        tmp_path / "a.parquet",
        user_id=[r[0] for r in rows],
        item_id=[r[1] for r in rows],
        rating=[r[2] for r in rows],
        ts=[r[3] for r in rows],
    )
    kw = {"rating": "rating", "timestamp": "ts"}
    a = read_table(tmp_path / "a.csv", "x", **kw)  # type: ignore[arg-type]
    b = read_table(tmp_path / "a.parquet", "x", **kw)  # type: ignore[arg-type]
    for d in (a, b):
        assert d.stats == {
            "rows": 4,
            "unique_pairs": 3,
            "duplicate_rows_removed": 1,
            "conflicting_pairs": 1,
        }
        got = sorted(
            zip(d.users.tolist(), d.items.tolist(), d.ratings.tolist(), strict=True)  # type: ignore[union-attr]
        )
        assert got == [("u1", "i1", 2.0), ("u1", "i2", 4.0), ("u2", "i1", 3.0)]
        assert d.timestamps is not None and sorted(d.timestamps.tolist()) == [11, 12, 13]
        # dictionary-encoded once: int32 codes into sorted vocabularies
        assert d.user_codes.dtype == np.int32 and d.user_vocab.to_pylist() == ["u1", "u2"]
        assert d.item_vocab.to_pylist() == ["i1", "i2"]


def test_parquet_integer_ids_are_strings_and_format_key_and_folder(tmp_path: Path) -> None:
    (tmp_path / "parts").mkdir()
    _parquet(tmp_path / "parts" / "0.parquet", user=[1, 2], item=[10, 20])
    _parquet(tmp_path / "parts" / "1.parquet", user=[3], item=[10])
    _parquet(tmp_path / "data.bin", user=[7], item=[70])
    _declare(
        tmp_path,
        '[domains.a]\nfile = "parts"\nuser = "user"\nitem = "item"\n'
        '[domains.b]\nfile = "data.bin"\nformat = "parquet"\nuser = "user"\nitem = "item"\n',
    )
    ds = load_dataset(tmp_path)
    assert sorted(ds.domain("a").users.tolist()) == ["1", "2", "3"]
    assert ds.domain("a").items.tolist().count("10") == 2
    assert ds.domain("b").items.tolist() == ["70"]
    _declare(tmp_path, '[domains.a]\nfile = "parts"\nformat = "feather"\n')
    with pytest.raises(DataError, match=r"domains\.a\.format must be one of csv, tsv, parquet"):
        load_dataset(tmp_path)


@pytest.mark.parametrize(
    ("cols", "message"),
    [
        ({"user_id": ["a", None, "c"], "item_id": ["1", "2", "3"]}, r"row 2: empty user id"),
        ({"user_id": ["a", "b", "c"], "item_id": ["1", "2", ""]}, r"row 3: empty item id"),
        ({"user_id": ["a", "b\x00", "c"], "item_id": ["1", "2", "3"]}, r"row 2: control char"),
        ({"user_id": ["a"], "item_id": ["1"], "rating": [float("nan")]}, r"row 1: rating is not"),
        ({"user_id": ["a"], "item_id": ["1"], "rating": ["x"]}, r"rating column .* not a number"),
        ({"user": ["a"], "item_id": ["1"]}, r"no user column 'user_id' .*did you mean 'user'"),
    ],
)
def test_parquet_bad_rows_name_the_file_and_row(
    tmp_path: Path, cols: dict[str, list[object]], message: str
) -> None:
    f = _parquet(tmp_path / "a.parquet", **cols)
    rating = "rating" if "rating" in cols else None
    with pytest.raises(DataError, match=message) as err:
        read_table(f, "x", rating=rating)
    assert str(err.value).startswith(str(f))


def test_parquet_row_numbers_count_across_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dataset_module, "BATCH_ROWS", 4)
    users: list[object] = [f"u{n}" for n in range(10)]
    users[9] = None
    f = _parquet(tmp_path / "a.parquet", user_id=users, item_id=[f"i{n}" for n in range(10)])
    with pytest.raises(DataError, match=r"a\.parquet: row 10: empty user id"):
        read_table(f, "x")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"b\.parquet: not a Parquet file"):
        read_table(tmp_path / "b.parquet", "x")
    with pytest.raises(DataError, match=r"missing data file: expected .*c\.parquet"):
        read_table(tmp_path / "c.parquet", "x")


def test_csv_errors_found_by_the_columnar_reader_name_the_line(tmp_path: Path) -> None:
    body = "".join(f"u{n},i{n % 7},{n % 5 + 1}\n" for n in range(5000))
    f = tmp_path / "a.csv"
    f.write_text("user_id,item_id,rating\n" + body + "u1,i2,lots\n" + body, encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.csv:5002: rating is not a number: 'lots'"):
        read_table(f, "x", rating="rating")
    f.write_text("user_id,item_id,rating\n" + body + "u1,,3\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.csv:5002: empty item id"):
        read_table(f, "x", rating="rating")
    f.write_text("user_id,item_id,rating\n" + body, encoding="utf-8")
    d = read_table(f, "x", rating="rating")
    assert d.stats["rows"] == 5000 and len(d) == 5000


def test_columnar_and_line_readers_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whitespace around fields, quoted fields and CRLF line ends read the same either way."""
    text = 'user_id,item_id,rating\r\n u1 ,"i,1", 4\r\nu2,i2,5\r\n\r\nu1,i3,1.5\r\n'
    (tmp_path / "a.csv").write_text(text, encoding="utf-8")
    with monkeypatch.context() as m:  # a clean file never reaches the line reader
        m.setattr(dataset_module, "_read_rows", None)
        fast = read_table(tmp_path / "a.csv", "x", rating="rating")
    assert fast.users.tolist() == ["u1", "u2", "u1"]
    assert fast.items.tolist() == ["i,1", "i2", "i3"]
    assert fast.ratings is not None and fast.ratings.tolist() == [4.0, 5.0, 1.5]
    cols, lines = dataset_module._columns(
        tmp_path / "a.csv", {"user": "user_id", "item": "item_id"}, True, ","
    )
    assert cols["item"] == fast.items.tolist() and lines == [2, 3, 5]


def test_generator_counts_determinism_and_shared_users(tmp_path: Path) -> None:
    spec = ScaleSpec(interactions=20_000, items=2_000, users=500, chunk_rows=3_000, seed=7)
    counts = write_synthetic(spec, tmp_path / "a")
    assert counts == {"source": 14_000, "target": 6_000}
    for name, rows in counts.items():
        meta = pq.ParquetFile(tmp_path / "a" / f"{name}.parquet").metadata
        assert meta.num_rows == rows and meta.num_row_groups == -(-rows // 3_000)
    write_synthetic(spec, tmp_path / "b")
    for name in counts:
        a = pq.read_table(tmp_path / "a" / f"{name}.parquet")
        assert a.equals(pq.read_table(tmp_path / "b" / f"{name}.parquet"))
    write_synthetic(ScaleSpec(**{**spec.__dict__, "seed": 8}), tmp_path / "c")
    assert not pq.read_table(tmp_path / "c" / "target.parquet").equals(
        pq.read_table(tmp_path / "a" / "target.parquet")
    )
    ds = load_dataset(tmp_path / "a")
    src, tgt = ds.domain("source"), ds.domain("target")
    assert src.stats["rows"] == 14_000 and tgt.stats["rows"] == 6_000
    shared = set(src.user_vocab.to_pylist()) & set(tgt.user_vocab.to_pylist())
    assert len(shared) == 400  # overlap 0.8 of 500 users
    assert not set(src.item_vocab.to_pylist()) & set(tgt.item_vocab.to_pylist())
    # power-law popularity: the most popular tenth of the items holds far more than a tenth of the
    # rows (Zipf with exponent 1 over 600 items: about 0.6; uniform popularity: 0.1)
    raw = pq.read_table(tmp_path / "a" / "target.parquet").column("item_id").to_pylist()
    counts_by_item = np.sort(np.unique(raw, return_counts=True)[1])[::-1]
    assert counts_by_item[: 600 // 10].sum() > 0.45 * len(raw)
    split = make_split(ds, "target", "source", cold_share=0.1)
    assert split.n_users == 500 and len(split.train) > 0 and split.cold_users.size > 0


def test_generator_cli_writes_a_loadable_folder_and_refuses_bad_sizes(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    assert main(["--interactions", "3000", "--items", "300", "--out", str(out)]) == 0
    assert sorted(load_dataset(out).domains) == ["source", "target"]
    assert main(["--interactions", "1", "--items", "300", "--out", str(tmp_path / "x")]) == 2
