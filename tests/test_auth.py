"""Token format and Authorization header parsing (no I/O)."""

from __future__ import annotations

import base64

import pytest

from app.access import tokens


def test_new_tokens_are_well_formed_and_distinct() -> None:
    """Tokens carry the prefix, 256 random bits and a valid checksum."""
    made = {tokens.new_token() for _ in range(200)}
    assert len(made) == 200
    assert all(t.startswith("oit_") and len(t) == tokens.TOKEN_LENGTH for t in made)
    assert all(tokens.is_well_formed(t) for t in made)


def test_a_typo_fails_the_checksum() -> None:
    """Changing one character is caught before any database lookup."""
    token = tokens.new_token()
    i = len(tokens.TOKEN_PREFIX) + 5
    typo = token[:i] + ("a" if token[i] != "a" else "b") + token[i + 1 :]
    assert not tokens.is_well_formed(typo)
    assert not tokens.is_well_formed(token[:-1])
    assert not tokens.is_well_formed("oit_" + "!" * 49)


def test_digest_is_sha256_hex_and_prefix_is_short() -> None:
    token = tokens.new_token()
    assert len(tokens.digest(token)) == 64
    assert tokens.digest(token) != tokens.digest(tokens.new_token())
    assert tokens.display_prefix(token) == token[:10]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("Bearer abc", tokens.Credentials(token="abc", site_name=None)),
        ("bearer   abc ", tokens.Credentials(token="abc", site_name=None)),
        (
            "Basic " + base64.b64encode(b"site-a:tok:en").decode(),
            tokens.Credentials(token="tok:en", site_name="site-a"),
        ),
        ("Basic " + base64.b64encode(b"no-colon").decode(), None),
        ("Basic !!!notbase64", None),
        ("Digest abc", None),
        ("Bearer", None),
    ],
)
def test_parse_authorization(header: str | None, expected: tokens.Credentials | None) -> None:
    assert tokens.parse_authorization(header) == expected
