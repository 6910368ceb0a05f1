"""Checks of the strings a request names (model, version, user and item ids) before anything is
looked up: bounded lengths, ASCII version numbers, and error messages that quote only a short,
escaped prefix of what the caller sent; and the decoding of a Rank request's feature values."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recsys.repository.layout import parse_version_name
from recsys.rpc.errors import InvalidRequest

# Characters of a caller's string quoted in an error message.
QUOTE_CHARS = 32
# A version is a positive integer of at most this many ASCII digits (fits in int64).
MAX_VERSION_DIGITS = 18


def quote(text: str, limit: int = QUOTE_CHARS) -> str:
    """`text` as an escaped (ASCII-only) literal, cut to `limit` characters with its length."""
    if len(text) <= limit:
        return ascii(text)
    return f"{ascii(text[:limit])}... ({len(text)} characters)"


def parse_version(text: str) -> int | None:
    """'' -> None (the latest served); '3' -> 3; anything that is not a version directory's name
    (signs, spaces inside, leading zeros, Unicode digits such as '²' or '３', numbers past int64)
    is an invalid request."""
    text = text.strip()
    if not text:
        return None
    version = parse_version_name(text) if len(text) <= MAX_VERSION_DIGITS else None
    if version is None:
        raise InvalidRequest(f"model_version {quote(text)} is not a positive integer")
    return version


def check_length(what: str, text: str, limit: int) -> None:
    """INVALID_ARGUMENT for a string longer than `limit` characters."""
    if len(text) > limit:
        raise InvalidRequest(
            f"{what} {quote(text)} is longer than this server's limit of {limit} characters "
            "(RANKING_MAX_ID_LENGTH)"
        )


def check_ids(what: str, ids: list[str], limit: int) -> None:
    """INVALID_ARGUMENT naming the first id longer than `limit` characters."""
    if ids and max(map(len, ids)) > limit:
        index = next(i for i, item in enumerate(ids) if len(item) > limit)
        raise InvalidRequest(
            f"{what}[{index}] {quote(ids[index])} is longer than this server's limit of {limit} "
            "characters (RANKING_MAX_ID_LENGTH)"
        )


# RankRequest.features_f32: little-endian IEEE-754 float32, whatever this host's byte order.
WIRE_FLOAT32 = np.dtype("<f4")


def check_one_feature_form(features: Sequence[float] | np.ndarray, features_f32: bytes) -> None:
    """INVALID_ARGUMENT when a request sets both `features` and `features_f32`."""
    if features_f32 and len(features):
        raise InvalidRequest(
            f"set features or features_f32, not both (got {len(features)} float values and "
            f"{len(features_f32)} bytes)"
        )


def feature_rows(
    features: Sequence[float] | np.ndarray,
    features_f32: bytes,
    n: int,
    names: Sequence[str],
    where: str,
) -> np.ndarray:
    """The FP32 [n, F] rows of a Rank request (F = len(names)), from `features_f32` (read in
    place, no per-value work) or else from `features`; INVALID_ARGUMENT for both set or a size
    other than n * F values (n * F * 4 bytes), naming the expected size. Values are not checked
    here (NaN, range)."""
    check_one_feature_form(features, features_f32)
    width = len(names)
    need = n * width
    takes = f"{where} takes {width} features per candidate ({', '.join(names)})"
    if features_f32:
        size = len(features_f32)
        if size != need * WIRE_FLOAT32.itemsize:
            odd = ", not a whole number of float32" if size % WIRE_FLOAT32.itemsize else ""
            raise InvalidRequest(
                f"{takes}: {n} candidates need features_f32 of {need} little-endian float32 = "
                f"{need * WIRE_FLOAT32.itemsize} bytes, got {size} bytes{odd}"
            )
        flat = np.frombuffer(features_f32, dtype=WIRE_FLOAT32)
    else:
        if len(features) != need:
            raise InvalidRequest(f"{takes}: {n} candidates need {need} values, got {len(features)}")
        flat = np.asarray(features, dtype=np.float32)
    # A no-op on little-endian hosts; converts to the native order elsewhere.
    return flat.astype(np.float32, copy=False).reshape(n, width)
