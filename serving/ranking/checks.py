"""Checks of the strings a request names (model, version, user and item ids) before anything is
looked up: bounded lengths, ASCII version numbers, and error messages that quote only a short,
escaped prefix of what the caller sent."""

from __future__ import annotations

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
