"""ZIP archives for the tests, hostile ones included: built here, never downloaded."""

from __future__ import annotations

import io
import struct
import zipfile

_CENTRAL = b"PK\x01\x02"
_END = b"PK\x05\x06"


def make_zip(entries: list[tuple[str, bytes]], *, deflate: bool = True) -> bytes:
    buffer = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def empty_zip() -> bytes:
    return make_zip([])


def _central_records(data: bytes) -> list[int]:
    offsets, at = [], data.find(_CENTRAL)
    while at >= 0:
        offsets.append(at)
        at = data.find(_CENTRAL, at + 4)
    return offsets


def overlapping_zip(payload: bytes) -> bytes:
    """Two central entries pointing at the same local entry (the overlapping-entries bomb)."""
    data = bytearray(make_zip([("a.dcm", payload), ("b.dcm", payload)]))
    first, second = _central_records(bytes(data))[:2]
    (offset,) = struct.unpack_from("<L", data, first + 42)
    struct.pack_into("<L", data, second + 42, offset)
    return bytes(data)


def encrypted_zip(payload: bytes) -> bytes:
    """An entry whose flags say "encrypted" (APPNOTE 4.4.4 bit 0)."""
    data = bytearray(make_zip([("secret.dcm", payload)], deflate=False))
    central = _central_records(bytes(data))[0]
    struct.pack_into("<H", data, central + 8, 1)
    struct.pack_into("<H", data, 6, 1)  # the local header's flags too
    return bytes(data)


def claims_entries(data: bytes, count: int) -> bytes:
    """The same archive, its end record claiming ``count`` entries."""
    patched = bytearray(data)
    end = bytes(patched).rfind(_END)
    struct.pack_into("<HH", patched, end + 8, count, count)
    return bytes(patched)


def corrupt_crc(data: bytes) -> bytes:
    """Flip one stored byte of the first entry's data: its CRC-32 no longer matches."""
    patched = bytearray(data)
    (name_len, extra_len) = struct.unpack_from("<HH", patched, 26)
    patched[30 + name_len + extra_len + 200] ^= 0xFF
    return bytes(patched)
