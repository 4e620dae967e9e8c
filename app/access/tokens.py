"""Site tokens: their format, their digest, and reading them from request headers.

A token is ``oit_`` + 43 base62 characters (256 random bits) + a 6-character
base62 CRC-32 of those 43, so a typo or a pasted fragment is refused before any
database lookup and secret scanners can recognise a leaked one. Only the SHA-256
of the whole token is stored: the token is a high-entropy secret, so a slow hash
would add ~90 ms per upload and no security.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import zlib
from dataclasses import dataclass

TOKEN_PREFIX = "oit_"  # noqa: S105 - a public marker for scanners, not a secret
ADMIN_TOKEN_PREFIX = "oia_"  # noqa: S105 - admin API tokens: same format, other marker
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BODY_LEN = 43  # ceil(256 / log2(62))
_CHECK_LEN = 6  # ceil(32 / log2(62))
TOKEN_LENGTH = len(TOKEN_PREFIX) + _BODY_LEN + _CHECK_LEN


def _base62(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, rem = divmod(number, 62)
        chars.append(_ALPHABET[rem])
    return "".join(reversed(chars))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), _CHECK_LEN)


def new_token(prefix: str = TOKEN_PREFIX) -> str:
    body = _base62(secrets.randbits(256), _BODY_LEN)
    return prefix + body + _checksum(body)


def is_well_formed(token: str, prefix: str = TOKEN_PREFIX) -> bool:
    """Whether ``token`` has the format and checksum of a token; any string may be asked
    (a header's non-ASCII characters included: compare_digest takes ASCII strings only)."""
    if len(token) != TOKEN_LENGTH or not token.startswith(prefix) or not token.isascii():
        return False
    body = token[len(prefix) : len(prefix) + _BODY_LEN]
    if any(c not in _ALPHABET for c in body):
        return False
    return secrets.compare_digest(token[-_CHECK_LEN:].encode(), _checksum(body).encode())


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def same(a: str, b: str) -> bool:
    """Constant-time string equality."""
    return secrets.compare_digest(a.encode(), b.encode())


def display_prefix(token: str) -> str:
    """Enough of the token to recognise it in a list, far too little to use it."""
    return token[: len(TOKEN_PREFIX) + 6]


@dataclass(frozen=True)
class Credentials:
    token: str
    site_name: str | None  # given with Basic; Bearer carries the token alone


def is_presented(header: str | None) -> bool:
    """Whether a request carries an ``Authorization`` header at all: one that is there but
    unusable is a failed authentication (throttled), not a request without credentials."""
    return bool(header and header.strip())


def parse_authorization(header: str | None) -> Credentials | None:
    """Credentials from an ``Authorization`` header, or None when there are none usable."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return Credentials(token=value, site_name=None)
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except ValueError:  # binascii.Error, UnicodeDecodeError, or a non-ASCII value
            return None
        name, sep, token = decoded.partition(":")
        if not sep:
            return None
        return Credentials(token=token, site_name=name)
    return None
