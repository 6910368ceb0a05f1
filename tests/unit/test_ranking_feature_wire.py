"""The ranker's decoding of a Rank request's feature values: `features` (repeated float) and
`features_f32` (little-endian float32 bytes), one of them, with sizes named in every refusal."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest

from recsys.rpc.errors import InvalidRequest
from recsys.v1 import ranking_pb2
from serving.ranking.checks import check_one_feature_form, feature_rows
from serving.ranking.engine import check_features
from serving.ranking.model import RankerModel

NAMES = ("a", "b", "c")
WHERE = "m version 1"


def _rows(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, len(NAMES))).astype(np.float32)


def _model() -> RankerModel:
    fake = SimpleNamespace(
        name="m", version=1, features_version="2", features_model="r", feature_names=NAMES
    )
    return cast(RankerModel, fake)


def test_both_forms_decode_to_the_same_rows() -> None:
    rows = _rows()
    from_floats = feature_rows(rows.ravel().tolist(), b"", 4, NAMES, WHERE)
    from_bytes = feature_rows((), rows.astype("<f4").tobytes(), 4, NAMES, WHERE)
    assert from_bytes.dtype == np.float32 and from_bytes.shape == (4, 3)
    np.testing.assert_array_equal(from_floats, rows)
    np.testing.assert_array_equal(from_bytes, rows)


def test_bytes_are_read_little_endian_whatever_the_sender_meant() -> None:
    rows = _rows()
    # Big-endian bytes are not an option: read as little-endian they are other numbers.
    swapped = feature_rows((), rows.astype(">f4").tobytes(), 4, NAMES, WHERE)
    assert not np.array_equal(swapped, rows)
    one = feature_rows((), bytes.fromhex("0000803f") * 3, 1, NAMES, WHERE)  # 1.0 little-endian
    np.testing.assert_array_equal(one, [[1.0, 1.0, 1.0]])


def test_fields_round_trip_through_the_proto() -> None:
    rows = _rows()
    request = ranking_pb2.RankRequest(features_f32=rows.astype("<f4").tobytes())
    wire = ranking_pb2.RankRequest.FromString(request.SerializeToString())
    assert len(wire.features) == 0
    np.testing.assert_array_equal(
        feature_rows(wire.features, wire.features_f32, 4, NAMES, ""), rows
    )


def test_both_set_is_refused() -> None:
    rows = _rows()
    with pytest.raises(InvalidRequest, match="set features or features_f32, not both"):
        feature_rows(rows.ravel().tolist(), rows.tobytes(), 4, NAMES, WHERE)
    with pytest.raises(InvalidRequest, match="not both"):
        check_one_feature_form([1.0], b"\0\0\0\0")
    check_one_feature_form([1.0], b"")
    check_one_feature_form((), b"\0\0\0\0")


@pytest.mark.parametrize(("size", "odd"), [(44, False), (52, False), (47, True), (1, True)])
def test_a_wrong_byte_length_names_the_expected_size(size: int, odd: bool) -> None:
    with pytest.raises(InvalidRequest) as err:
        feature_rows((), b"\0" * size, 4, NAMES, WHERE)
    text = str(err.value)
    assert "4 candidates need features_f32 of 12 little-endian float32 = 48 bytes" in text
    assert f"got {size} bytes" in text
    assert ("not a whole number of float32" in text) == odd
    assert "takes 3 features per candidate (a, b, c)" in text


def test_a_wrong_value_count_names_the_expected_count() -> None:
    with pytest.raises(InvalidRequest, match="4 candidates need 12 values, got 11"):
        feature_rows([0.0] * 11, b"", 4, NAMES, WHERE)
    with pytest.raises(InvalidRequest, match="need 12 values, got 0"):
        feature_rows((), b"", 4, NAMES, WHERE)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 2e6])
def test_bad_values_are_refused_the_same_way_in_both_forms(value: float) -> None:
    rows = _rows()
    rows[2, 1] = value
    messages = []
    for form in ({"features": rows.ravel().tolist()}, {"features_f32": rows.tobytes()}):
        kwargs: dict[str, Any] = {"features": (), **form}
        with pytest.raises(InvalidRequest) as err:
            check_features(_model(), kwargs["features"], 4, "2", kwargs.get("features_f32", b""))
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert "candidate 2 feature 'b'" in messages[0]


def test_check_features_takes_the_bytes_and_arrays() -> None:
    rows = _rows()
    got = check_features(_model(), (), 4, "2", rows.astype("<f4").tobytes())
    np.testing.assert_array_equal(got, rows)
    np.testing.assert_array_equal(check_features(_model(), rows, 4, "2"), rows)
