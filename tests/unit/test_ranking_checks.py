"""The request string checks of the ranker: versions, lengths and quoted prefixes."""

from __future__ import annotations

import pytest

from recsys.rpc.errors import InvalidRequest
from serving.ranking.checks import check_ids, check_length, parse_version, quote


@pytest.mark.parametrize(("text", "expected"), [("", None), (" ", None), ("3", 3), (" 12 ", 12)])
def test_parse_version_accepts_ascii_positive_integers(text: str, expected: int | None) -> None:
    assert parse_version(text) == expected


@pytest.mark.parametrize(
    "text", ["0", "-1", "+1", "1.0", "latest", "\u00b2", "\uff13", "\u0663", "1 2", "9" * 19]
)
def test_parse_version_refuses_everything_else(text: str) -> None:
    with pytest.raises(InvalidRequest, match="is not a positive integer"):
        parse_version(text)


def test_quote_escapes_and_cuts() -> None:
    assert quote("abc") == "'abc'"
    assert quote("a\nb\u00e9") == "'a\\nb\\xe9'"
    long = quote("y" * 10_000)
    assert long == f"'{'y' * 32}'... (10000 characters)"


def test_length_checks_name_the_field_and_the_index() -> None:
    check_length("user_id", "u" * 8, 8)
    with pytest.raises(InvalidRequest, match=r"user_id 'u{9}' is longer"):
        check_length("user_id", "u" * 9, 8)
    check_ids("item_ids", ["a", "b" * 8], 8)
    with pytest.raises(InvalidRequest, match=r"item_ids\[1\] .* limit of 8 characters"):
        check_ids("item_ids", ["a", "b" * 9, "c" * 20], 8)
