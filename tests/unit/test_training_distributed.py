"""The distributed preparation on Ray Data (a local two-CPU Ray instance): the prepared folder
loads to the same data set as the raw files (Parquet and delimited text), bad input is refused
naming the file and row or line, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from training.cli import main
from training.data import prepared
from training.data.dataset import Dataset, DomainData, load_dataset
from training.data.distributed import prepare
from training.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]

DECLARATION = """name = "mixed"
[domains.books]
file = "books"
rating = "stars"
timestamp = "ts"
titles = "titles.csv"
[domains.films]
file = "films.parquet"
[domains.music]
train = "music-train.parquet"
test = "music-test.parquet"
rating = "stars"
"""


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=128 * 1024 * 1024,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def _table(rng: np.random.Generator, n: int, users: int, items: int, prefix: str) -> pa.Table:
    """Rows with many repeated (user, item) pairs, their ratings often different."""
    return pa.table(
        {
            "user_id": [f"u{x}" for x in rng.integers(0, users, n)],
            "item_id": [f"{prefix}{x}" for x in rng.integers(0, items, n)],
            "stars": rng.integers(1, 6, n).astype(np.float64),
            "ts": rng.integers(0, 10**9, n),
        }
    )


def _raw(folder: Path) -> Path:
    """Three domains: a folder of two Parquet files with several row groups each (ratings,
    timestamps, titles), one implicit file, and a given train/test split."""
    rng = np.random.default_rng(7)
    folder.mkdir()
    (folder / "books").mkdir()
    for k in range(2):
        t = _table(rng, 700, 120, 60, "b")
        pq.write_table(t, folder / "books" / f"chunk-{k}.parquet", row_group_size=300)
    pq.write_table(
        _table(rng, 500, 150, 40, "f").select(["user_id", "item_id"]), folder / "films.parquet"
    )
    for part in ("train", "test"):
        pq.write_table(_table(rng, 200, 90, 30, "m"), folder / f"music-{part}.parquet")
    titles = "item_id,title\n" + "".join(f"b{i},Book {i}\n" for i in range(60))
    (folder / "titles.csv").write_text(titles, encoding="utf-8")
    (folder / "dataset.toml").write_text(DECLARATION, encoding="utf-8")
    return folder


def _assert_same_domain(a: DomainData, b: DomainData) -> None:
    assert a.user_vocab.equals(b.user_vocab) and a.item_vocab.equals(b.item_vocab)
    np.testing.assert_array_equal(a.user_codes, b.user_codes)
    np.testing.assert_array_equal(a.item_codes, b.item_codes)
    for x, y in ((a.ratings, b.ratings), (a.timestamps, b.timestamps)):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype  # type: ignore[union-attr]
            np.testing.assert_array_equal(x, y)  # type: ignore[arg-type]
    assert (a.given_split is None) == (b.given_split is None)
    if a.given_split is not None:
        np.testing.assert_array_equal(a.given_split, b.given_split)  # type: ignore[arg-type]
    assert a.stats == b.stats
    assert a.titles == b.titles


def _assert_same(a: Dataset, b: Dataset) -> None:
    assert a.name == b.name and a.fingerprint == b.fingerprint
    assert list(a.domains) == list(b.domains)
    for name in a.domains:
        _assert_same_domain(a.domains[name], b.domains[name])


def test_prepared_folder_loads_to_the_same_data_set_as_the_raw_files(
    tmp_path: Path, local_ray: None
) -> None:
    raw = _raw(tmp_path / "raw")
    out = tmp_path / "prepared"
    manifest = prepare(raw, out, partitions=3)
    expected = load_dataset(raw)
    # the fixture is not trivial: duplicates in every domain, conflicting ratings where rated
    for name, d in expected.domains.items():
        assert d.stats["duplicate_rows_removed"] > 0, name
    assert expected.domain("books").stats["conflicting_pairs"] > 0
    assert expected.domain("music").given_split is not None
    got = load_dataset(out)
    assert prepared.is_prepared(out) and got.path == out
    _assert_same(got, expected)

    on_disk = json.loads((out / prepared.MANIFEST).read_text())
    assert on_disk["engine"] == "ray" and on_disk["engine_version"] == ray.__version__
    assert on_disk == manifest and manifest["partitions"] == 3
    # every partition holds the users of its code range, the same range in every domain
    users = pq.read_table(out / prepared.USERS).column("id").to_pylist()
    assert users == sorted(set().union(*(d.user_vocab.to_pylist() for d in got.domains.values())))
    for name, info in manifest["domains"].items():
        assert len(info["files"]) == 3, name
        rows = 0
        for p, f in enumerate(info["files"]):
            t = pq.read_table(out / name / f)
            assert (
                t.schema.field("user").type == pa.int32()
                and t.schema.field("item").type == pa.int32()
            )
            part = prepared.part_of(t.column("user").to_numpy(), len(users), 3)
            assert (part == p).all(), (name, f)
            assert np.all(np.diff(t.column("row").to_numpy()) > 0)  # input order within a file
            rows += t.num_rows
        assert rows == len(got.domain(name)) == info["stats"]["unique_pairs"]


def test_rating_threshold_keeps_the_positives_the_loader_keeps(
    tmp_path: Path, local_ray: None
) -> None:
    raw = _raw(tmp_path / "raw")
    manifest = prepare(raw, tmp_path / "prepared", partitions=2, rating_threshold=4.0)
    got = load_dataset(tmp_path / "prepared")
    expected = load_dataset(raw)
    assert manifest["rating_threshold"] == 4.0
    for name in ("books", "music"):
        want = expected.domain(name).positives(4.0)
        have = got.domain(name)
        assert 0 < len(have) < expected.domain(name).stats["unique_pairs"]
        assert have.users.tolist() == want.users.tolist()
        assert have.items.tolist() == want.items.tolist()
        np.testing.assert_array_equal(have.ratings, want.ratings)  # type: ignore[arg-type]
        assert have.stats == want.stats
    _assert_same_domain(got.domain("films"), expected.domain("films"))  # implicit: all kept


def test_null_user_id_is_refused_naming_the_file_and_row(tmp_path: Path, local_ray: None) -> None:
    raw = _raw(tmp_path / "raw")
    bad = raw / "books" / "chunk-1.parquet"
    t = pq.read_table(bad)
    users = t.column("user_id").to_pylist()
    users[450] = None
    pq.write_table(
        t.set_column(0, "user_id", pa.array(users, pa.string())), bad, row_group_size=300
    )
    with pytest.raises(DataError, match=r"chunk-1\.parquet: row 451: empty user id") as exc:
        prepare(raw, tmp_path / "prepared")
    assert str(bad) in str(exc.value)
    assert not prepared.is_prepared(tmp_path / "prepared")


TEXT_DECLARATION = """name = "text"
[domains.books]
file = "books.csv"
rating = "stars"
timestamp = "ts"
[domains.films]
file = "films.tsv"
header = false
user = 1
item = 0
[domains.music]
train = "music-train.csv"
test = "music-test.csv"
rating = "stars"
"""


def _text_raw(folder: Path) -> Path:
    """The three kinds of domain as delimited text: a CSV with a header, blank lines, CRLF line
    ends and padded fields; a header-less TSV whose columns are given by position; a given split."""
    rng = np.random.default_rng(11)
    folder.mkdir()
    lines = ["user_id,item_id,stars,ts"]
    for k, r in enumerate(_table(rng, 900, 120, 60, "b").to_pylist()):
        lines.append(f" {r['user_id']} ,{r['item_id']},{r['stars']:g},{r['ts']}")
        if k % 97 == 5:
            lines.append("")  # blank lines are skipped, and counted in the line numbers
    (folder / "books.csv").write_bytes("\r\n".join(lines).encode() + b"\r\n")
    films = _table(rng, 700, 150, 40, "f")
    (folder / "films.tsv").write_text(
        "".join(f"{r['item_id']}\t{r['user_id']}\n" for r in films.to_pylist()), encoding="utf-8"
    )
    for part in ("train", "test"):
        rows = _table(rng, 300, 90, 30, "m").to_pylist()
        text = "user_id,item_id,stars\n" + "".join(
            f"{r['user_id']},{r['item_id']},{r['stars']:g}\n" for r in rows
        )
        (folder / f"music-{part}.csv").write_text(text, encoding="utf-8")
    (folder / "dataset.toml").write_text(TEXT_DECLARATION, encoding="utf-8")
    return folder


@pytest.mark.parametrize("split_bytes", [1500, 1 << 26])
def test_text_files_prepare_to_the_same_data_set_as_the_loader(
    tmp_path: Path, local_ray: None, split_bytes: int
) -> None:
    """Work items of 1,500 bytes (several per file, cut anywhere in a line), or whole files."""
    raw = _text_raw(tmp_path / "raw")
    manifest = prepare(raw, tmp_path / "prepared", partitions=2, split_bytes=split_bytes)
    expected = load_dataset(raw)
    for name, d in expected.domains.items():
        assert d.stats["duplicate_rows_removed"] > 0, name
    assert expected.domain("books").stats["conflicting_pairs"] > 0
    _assert_same(load_dataset(tmp_path / "prepared"), expected)
    assert manifest["domains"]["books"]["stats"]["rows"] == 900


def _rating_not_a_number(line: str) -> str:
    user, item, _, ts = line.split(",")
    return f"{user},{item},four,{ts}"


def _a_field_too_many(line: str) -> str:
    return line + "\tx"


@pytest.mark.parametrize(
    ("file", "line", "spoil"),
    [("books.csv", 800, _rating_not_a_number), ("films.tsv", 650, _a_field_too_many)],
)
def test_a_bad_line_in_a_text_split_is_named_as_the_loader_names_it(
    tmp_path: Path, local_ray: None, file: str, line: int, spoil: Callable[[str], str]
) -> None:
    """A line far into the file, in a later work item than the first: the same message, naming
    the same line, as the single-machine loader's."""
    raw = _text_raw(tmp_path / "raw")
    path = raw / file
    lines = path.read_bytes().decode().split("\n")
    lines[line - 1] = spoil(lines[line - 1])
    path.write_bytes("\n".join(lines).encode())
    with pytest.raises(DataError) as single:
        load_dataset(raw)
    assert f"{path}:{line}:" in str(single.value)
    with pytest.raises(DataError) as split:
        prepare(raw, tmp_path / "prepared", split_bytes=1500)
    assert str(split.value) == str(single.value)
    assert not prepared.is_prepared(tmp_path / "prepared")


def test_cli_prepares_and_refuses_bad_input_with_exit_2(
    tmp_path: Path, local_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = _raw(tmp_path / "raw")
    out = tmp_path / "prepared"
    argv = ["prepare", "--engine", "ray", "--dataset", str(raw), "--out", str(out)]
    assert main(argv) == 0
    assert "Prepared mixed" in capsys.readouterr().out
    assert ray.is_initialized()  # the CLI leaves a Ray instance it did not start alone
    _assert_same(load_dataset(out), load_dataset(raw))
    assert main(argv) == 2  # the output folder exists
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {out}: exists and is not an empty folder; choose a new output folder"]
    (raw / "films.csv").write_text("user_id,item_id\nu1,f1\nu2,\n", encoding="utf-8")
    toml = (raw / "dataset.toml").read_text().replace('"films.parquet"', '"films.csv"')
    (raw / "dataset.toml").write_text(toml, encoding="utf-8")
    assert main([*argv[:-1], str(tmp_path / "other")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"error: {raw / 'films.csv'}:3: empty item id"
    assert not (tmp_path / "other").exists()


def test_training_imports_no_ray_until_the_distributed_path_runs() -> None:
    code = (
        "import sys, training.cli, training.run, training.data.dataset, training.data.prepared, "
        "training.data.distributed; print('ray' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_cli_refuses_a_local_ray_without_cpus(
    local_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["prepare", "--dataset", "x", "--out", "y", "--num-cpus", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --num-cpus must be at least 1, got 0"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--object-store-mib", "8"], "--object-store-mib must be at least 64, got 8"),
        (
            ["--address", "ray://head:10001", "--num-cpus", "2"],
            "--num-cpus and --object-store-mib size a local Ray, not --address",
        ),
    ],
)
def test_cli_refuses_a_local_ray_sizing_it_cannot_use(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["prepare", "--dataset", "x", "--out", "y", *extra]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_training_runs_on_a_prepared_folder_given_as_an_absolute_dataset(
    tmp_path: Path, local_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the Kubernetes Jobs do: prepare under /prepared, then train with
    --dataset=/prepared/<name> while --data-dir points elsewhere."""
    rng = np.random.default_rng(3)
    raw = tmp_path / "raw"
    raw.mkdir()
    for domain, items in (("films", 60), ("books", 40)):
        users = rng.integers(0, 150, 2400)
        table = pa.table(
            {
                "user_id": [f"u{u}" for u in users],
                # planted tastes: a user's items cluster by user id, so transfer has signal
                "item_id": [
                    f"{domain[0]}{(u * 3 + int(x)) % items}"
                    for u, x in zip(users, rng.integers(0, 8, len(users)), strict=True)
                ],
            }
        )
        pq.write_table(table, raw / f"{domain}.parquet", row_group_size=800)
    (raw / "dataset.toml").write_text(
        'name = "pair"\n[domains.films]\nfile = "films.parquet"\n'
        '[domains.books]\nfile = "books.parquet"\n',
        encoding="utf-8",
    )
    out = tmp_path / "prepared" / "pair"
    assert main(["prepare", "--dataset", str(raw), "--out", str(out), "--partitions", "2"]) == 0
    repo, run_dir = tmp_path / "repo", tmp_path / "run"
    argv = [
        "train",
        f"--config={REPO_ROOT / 'training' / 'configs' / 'synthetic.toml'}",
        f"--data-dir={tmp_path / 'elsewhere'}",
        f"--dataset={out}",
        "--source=films",
        "--target=books",
        "--threads=1",
        "--epochs=2",
        "--source-epochs=2",
        "--strategies=finetune",
        "--ranker=dot",
        f"--repository={repo}",
        f"--run-dir={run_dir}",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    results = json.loads((run_dir / "results.json").read_text())
    assert results["fingerprint"] == load_dataset(raw).fingerprint
    assert results["published"]["models"] == ["books-ranker", "books-retrieval"]
