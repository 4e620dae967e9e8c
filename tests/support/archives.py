"""ZIP archives for the tests, hostile ones included: built here, never downloaded."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

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


def quoted_overlap_zip(payload: bytes, copies: int = 3) -> bytes:
    """Entries that share one stored stream, hidden by their local headers: each entry's
    name is longer than the stream, so the headers stand further apart than a check of
    ``30 + compressed size`` sees, and each header's extra field quotes the later headers,
    so all of them start their data at the one stream after the last header."""
    crc = zlib.crc32(payload)
    names = [f"{i}-".encode() + b"n" * (len(payload) + 100) for i in range(copies)]
    offsets, at = [], 0
    for name in names:
        offsets.append(at)
        at += 30 + len(name)
    body = bytearray()
    for offset, name in zip(offsets, names, strict=True):
        extra = at - (offset + 30 + len(name))  # the later headers, up to the stream
        body += (
            struct.pack(
                "<4s5H3L2H",
                b"PK\x03\x04",
                20,
                0,
                0,
                0,
                0,
                crc,
                len(payload),
                len(payload),
                len(name),
                extra,
            )
            + name
        )
    body += payload
    directory = bytearray()
    for offset, name in zip(offsets, names, strict=True):
        directory += (
            struct.pack(
                "<4s6H3L5H2L",
                b"PK\x01\x02",
                20,
                20,
                0,
                0,
                0,
                0,
                crc,
                len(payload),
                len(payload),
                len(name),
                0,
                0,
                0,
                0,
                0,
                offset,
            )
            + name
        )
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, copies, copies, len(directory), len(body), 0)
    return bytes(body + directory + end)


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
