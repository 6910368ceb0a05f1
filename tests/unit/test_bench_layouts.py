"""bench.layouts: the two '::' parsers agree with the loader, across stream block boundaries."""

from __future__ import annotations

import io
from pathlib import Path

from bench.layouts import _Replacing, parse_byte_transform, parse_split_pattern, write_ratings_dat
from training.data.dataset import load_dataset


def test_colon_parsers_agree_with_the_loader(tmp_path: Path) -> None:
    ratings = write_ratings_dat(tmp_path / "ml-1m", 5000, seed=1)
    a, b = parse_split_pattern(ratings), parse_byte_transform(ratings)
    assert all(x.equals(y) for x, y in zip(a, b, strict=True))
    assert len(a[0]) == 5000
    d = load_dataset(ratings.parent).domain("movies")
    assert d.stats["rows"] == 5000 and d.ratings is not None
    assert set(d.ratings.tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def test_replacing_stream_splits_a_separator_across_blocks(tmp_path: Path) -> None:
    f = tmp_path / "r.dat"
    f.write_bytes(b"1::22::3\n4::5::6\n")
    for block in range(1, 8):  # every block size puts some "::" across a boundary
        with io.BufferedReader(_Replacing(f, block=block)) as stream:
            assert stream.read() == b"1\x1f22\x1f3\n4\x1f5\x1f6\n", block
