"""Hostile and malformed uploads, generated here (never downloaded), and how to measure them.

The corpus of ``tests/test_hostile.py``: every case is a function of the site's
``Authorization`` header value returning a `Probe` (what to send) and an `Expect` (the
documented answer: status, the machine reason the intake counts in its metrics, the
per-file answers of a ZIP or STOW-RS body). Bombs are built without ever holding their
inflated size in memory: compressed streams of zeros are repeated, which zlib allows
after a full flush (raw deflate) or as concatenated members (gzip, RFC 1952 §2.2).

Also here: the processes' memory (``VmHWM``, reset per case through
``/proc/<pid>/clear_refs``), the intake's refusal counters from ``/metrics``, and the
seeds, mutations and promise check of the validator fuzzing (``tests/test_fuzz.py``,
``bench/fuzz.py``).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import socket
import struct
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import httpx
from hypothesis import strategies as st
from pydicom.data import get_testdata_files

from app.dicom.part10 import read_summary
from app.dicom.summary import Limits
from app.errors import (
    CorruptCompression,
    InflateLimitExceeded,
    IntakeError,
    InvalidUid,
    MalformedDicom,
    MissingTag,
    NestingTooDeep,
    NotDicom,
    TooManyElements,
    UnsupportedTransferSyntax,
)
from tests.dicom_samples import (
    DEFLATED,
    EXPLICIT_BE,
    IMPLICIT_LE,
    JPEG_BASELINE,
    SOP_INSTANCE_UID,
    delimiter,
    element,
    encode_dataset,
    item,
    make_dataset,
    make_encapsulated,
    make_instance,
    nested_sequence,
    part10,
)
from tests.support.archives import claims_entries, encrypted_zip, make_zip, overlapping_zip
from tests.support.intake import children, current_rss, peak_rss, reset_peak_rss
from tests.support.studies import make_nested, make_study

__all__ = [
    "CASES",
    "DOCUMENTED",
    "FORM",
    "MIB",
    "STOW",
    "Case",
    "Expect",
    "Probe",
    "form",
    "fuzz_seeds",
    "good_instance",
    "measure",
    "mutated",
    "raw_exchange",
    "rejections",
    "validate_once",
    "worker_pids",
    "zip_many_entries",
]

MIB = 1024 * 1024
_ZEROS = bytes(MIB)
_DICOMDIR = "1.2.840.10008.1.3.10"
_FORM_BOUNDARY = "hostile-form-boundary"
_STOW_BOUNDARY = "hostile-stow-boundary"
FORM = f"multipart/form-data; boundary={_FORM_BOUNDARY}"
STOW = f'multipart/related; type="application/dicom"; boundary={_STOW_BOUNDARY}'


# --- what a case sends and what it must get ---------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One request: a body for httpx, or ``raw`` bytes written to a socket as they are."""

    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    path: str = "/instances"
    raw: bytes | None = None


@dataclass(frozen=True)
class Expect:
    """The documented answer.

    ``reason``: the one refusal the intake counts (``intake_uploads_total`` with
    ``outcome="rejected"``), or None when nothing is counted (the request never
    reached the pipeline, or only per-file answers carry the reasons).
    ``items``: for a batch answer, each file's ``IntakeReason`` or "Success" (ZIP); for
    STOW-RS, each failed part's FailureReason in hex, then "Success" per stored one.
    ``details``: a substring of the error's ``Details``.
    ``counted``: for a batch, the refusals its files add to the metrics (entries Orthanc
    would skip, non-DICOM or DICOMDIR, are recorded as rows but not counted).
    """

    status: int
    reason: str | None
    items: tuple[str, ...] | None = None
    details: str = ""
    counted: tuple[str, ...] = ()  # batch answers: the refusals counted in the metrics


@dataclass(frozen=True)
class Case:
    id: str
    what: str  # one line for the results table
    build: Callable[[str], Probe]  # the site's Authorization header value -> the request
    expect: Expect


# --- valid instances --------------------------------------------------------------------


def good_instance() -> bytes:
    """A small valid CT instance with fresh UIDs (a new instance for Orthanc every call)."""
    return make_study(n_series=1, per_series=1, rows=16, cols=16)[0]


_VALID = make_instance()  # fixed UIDs: only ever refused, so they never reach Orthanc


# --- the Part 10 file -------------------------------------------------------------------


def garbage(size: int, seed: int = 6) -> bytes:
    return random.Random(seed).randbytes(size)  # noqa: S311 - test noise, not cryptography


def with_preamble(data: bytes, magic: bytes) -> bytes:
    return magic.ljust(128, b"\0") + data[128:]


def huge_meta_length() -> bytes:
    """(0002,0001) OB declaring 0xFFFFFFF0 bytes in a file of a few KB."""
    data = bytearray(_VALID)
    at = 132 + 12  # after DICM and the 12-byte (0002,0000) UL group length
    assert data[at : at + 6] == b"\x02\x00\x01\x00OB"
    struct.pack_into("<L", data, at + 8, 0xFFFFFFF0)
    return bytes(data)


def _dataset(**overrides: object) -> bytes:
    """The small CT data set without pixels (groups 0008 to 0020), as Explicit VR LE."""
    return encode_dataset(make_dataset(pixels=False, **overrides))


def huge_element_length() -> bytes:
    """A private OB element (0021,1010) declaring 0xFFFFFFF0 bytes, followed by 16."""
    header = struct.pack("<HH2s2xL", 0x0021, 0x1010, b"OB", 0xFFFFFFF0)
    return part10(_dataset() + header + bytes(16))


def huge_length_in_item() -> bytes:
    """Inside a defined-length item, an element that claims 2 GiB: past the item's end."""
    inner = struct.pack("<HH2s2xL", 0x0008, 0x0100, b"UT", 0x7FFFFFF0) + b"x" * 8
    sequence = element(0x0040A730, "SQ", item(inner))
    return part10(_dataset() + sequence)


def nested_in_un(depth: int) -> bytes:
    """Nesting hidden in a private undefined-length UN value (parsed as Implicit VR items)."""
    inner = item(nested_sequence(depth - 1, implicit=True), undefined=True)
    header = struct.pack("<HH2s2xL", 0x0021, 0x1010, b"UN", 0xFFFFFFFF)
    return part10(_dataset() + header + inner + delimiter(0xE0DD))


def many_elements(count: int) -> bytes:
    """``count`` empty private LO elements in the odd groups after 0020: 8 bytes each."""
    elements = bytearray()
    group = 0x0021
    for n in range(count):
        if n and n % 0xFFFF == 0:
            group += 2
        elements += struct.pack("<HH2sH", group, 1 + n % 0xFFFF, b"LO", 0)
    return part10(_dataset() + bytes(elements))


def many_items(count: int) -> bytes:
    """One undefined-length sequence of ``count`` empty items."""
    items = struct.pack("<HHL", 0xFFFE, 0xE000, 0) * count
    return part10(_dataset() + element(0x0040A730, "SQ", items, undefined=True))


def many_fragments(count: int) -> bytes:
    """Encapsulated Pixel Data of ``count`` empty fragments (after an empty offset table)."""
    fragments = struct.pack("<HHL", 0xFFFE, 0xE000, 0) * (count + 1) + delimiter(0xE0DD)
    pixels = element(0x7FE00010, "OB", fragments, undefined=True)
    return part10(_dataset() + pixels, JPEG_BASELINE)


def _deflate_zeros(prefix: bytes, zeros_mib: int) -> bytes:
    """Raw deflate of ``prefix`` + ``zeros_mib`` MiB of zeros, never holding the zeros."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(_ZEROS) + compressor.flush(zlib.Z_FULL_FLUSH)
    # After a full flush the compressor starts afresh: every further MiB is the same bytes.
    return head + block * zeros_mib + compressor.flush()


def deflate_bomb(inflated_mib: int) -> bytes:
    """Deflated Explicit VR LE whose data set inflates to ``inflated_mib`` MiB (an OB of zeros)."""
    dataset = _dataset()
    header = struct.pack("<HH2s2xL", 0x0042, 0x0011, b"OB", inflated_mib * MIB)
    return part10(dataset, DEFLATED, deflate=_deflate_zeros(dataset + header, inflated_mib))


def deflate_corrupt() -> bytes:
    return part10(b"", DEFLATED, deflate=b"\xff" + garbage(4096))


def meta_without_transfer_syntax() -> bytes:
    data = _VALID
    # Drop (0002,0010) from the File Meta; the group length then lies, which it may.
    at = data.index(b"\x02\x00\x10\x00UI")
    (length,) = struct.unpack_from("<H", data, at + 6)
    return data[:at] + data[at + 8 + length :]


def without_meta() -> bytes:
    return bytes(128) + b"DICM" + _dataset()


def repeated_tag() -> bytes:
    """A second SOPInstanceUID after the data set: a reader could show either value."""
    again = element(0x00080018, "UI", b"1.2.3.4.5.6\0")
    return part10(_dataset() + again)


# --- gzip bodies --------------------------------------------------------------------------


def gzip_bomb(inflated_mib: int, member_mib: int = 64) -> bytes:
    """Concatenated gzip members of zeros (RFC 1952 §2.2): ~1 KB of gzip per MiB."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    member = b"".join(compressor.compress(_ZEROS) for _ in range(member_mib)) + compressor.flush()
    return member * (inflated_mib // member_mib)


def gzip_of(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


# --- ZIP archives -------------------------------------------------------------------------


def zip_ratio_bomb(inflated_mib: int) -> bytes:
    """One entry of zeros at deflate level 9 (ratio ~1000), written as a stream."""
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive,
        archive.open("bomb.dcm", "w", force_zip64=False) as entry,
    ):
        for _ in range(inflated_mib):
            entry.write(_ZEROS)
    return buffer.getvalue()


def zip_many_entries(count: int) -> bytes:
    return make_zip([(f"{n}.txt", b"x") for n in range(count)], deflate=False)


def zip_declared_sizes(entries: int, declared: int) -> bytes:
    """Small entries whose central directory records claim ``declared`` bytes each."""
    data = bytearray(make_zip([(f"{n}.dcm", b"x" * 64) for n in range(entries)]))
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        struct.pack_into("<L", data, at + 24, declared)  # uncompressed size (APPNOTE 4.3.12)
        at = data.find(b"PK\x01\x02", at + 4)
    return bytes(data)


def zip_nested(levels: int) -> bytes:
    """A ZIP in a ZIP in a ZIP…, ``levels`` deep, four copies per level (42.zip style)."""
    data = make_zip([("leaf.dcm", _VALID)])
    for level in range(levels):
        data = make_zip([(f"level{level}-{n}.zip", data) for n in range(4)])
    return data


# --- multipart bodies ---------------------------------------------------------------------


def form(parts: Sequence[tuple[str, str | None, bytes]], *, close: bool = True) -> bytes:
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += (
            (
                f"--{_FORM_BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    return body + (f"--{_FORM_BOUNDARY}--\r\n".encode() if close else b"")


def form_with_part_headers(headers: list[str]) -> bytes:
    lines = "".join(f"{h}\r\n" for h in headers)
    return (
        (
            f'--{_FORM_BOUNDARY}\r\nContent-Disposition: form-data; name="f"; filename="a.dcm"\r\n'
            f"{lines}\r\n"
        ).encode()
        + _VALID
        + f"\r\n--{_FORM_BOUNDARY}--\r\n".encode()
    )


def form_gzip_bomb(inflated_mib: int) -> bytes:
    """A gzip form whose one plain field inflates to ``inflated_mib`` MiB of zeros."""
    head = f'--{_FORM_BOUNDARY}\r\nContent-Disposition: form-data; name="padding"\r\n\r\n'
    tail = f"\r\n--{_FORM_BOUNDARY}--\r\n"
    return gzip_of(head.encode()) + gzip_bomb(inflated_mib) + gzip_of(tail.encode())


def related(parts: list[bytes], content_type: str = "application/dicom") -> bytes:
    body = b""
    for data in parts:
        body += f"--{_STOW_BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode()
        body += data + b"\r\n"
    return body + f"--{_STOW_BOUNDARY}--\r\n".encode()


# --- raw HTTP -----------------------------------------------------------------------------


def _request_head(auth: str, *extra: str, content_length: int | str | None = 0) -> bytes:
    lines = ["POST /instances HTTP/1.1", "Host: intake", f"Authorization: {auth}", *extra]
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def raw_exchange(port: int, data: bytes, timeout: float = 60) -> tuple[int, bytes]:
    """Write ``data`` to a fresh connection; the answer's status and body (0 if none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close mid-send
            sock.sendall(data)
        answer = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            while found and len(body) < int(found.group(1)):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
            answer = head + b"\r\n\r\n" + body
    status = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
    return (int(status.group(1)) if status else 0), answer.partition(b"\r\n\r\n")[2]


# --- the corpus ---------------------------------------------------------------------------


def _body(data: bytes, **headers: str) -> Callable[[str], Probe]:
    return lambda _auth: Probe(data, {k.replace("_", "-"): v for k, v in headers.items()})


def _lazy(make: Callable[[], bytes], **headers: str) -> Callable[[str], Probe]:
    return lambda _auth: Probe(make(), {k.replace("_", "-"): v for k, v in headers.items()})


def _form_probe(make: Callable[[], bytes], **headers: str) -> Callable[[str], Probe]:
    extra = {k.replace("_", "-"): v for k, v in headers.items()}
    return lambda _auth: Probe(make(), {"Content-Type": FORM, **extra})


def _stow_probe(
    make: Callable[[], bytes], content_type: str = STOW, **headers: str
) -> Callable[[str], Probe]:
    extra = {k.replace("_", "-"): v for k, v in headers.items()}
    return lambda _auth: Probe(
        make(), {"Content-Type": content_type, **extra}, path="/dicom-web/studies"
    )


def _raw(make: Callable[[str], bytes]) -> Callable[[str], Probe]:
    return lambda auth: Probe(raw=make(auth))


CASES: list[Case] = [
    # Not DICOM at all.
    Case("empty", "empty body", _body(b""), Expect(400, "not_dicom", details="DICM")),
    Case("garbage", "64 KiB of random bytes", _body(garbage(64 * 1024)), Expect(400, "not_dicom")),
    Case(
        "bare-elf",
        "an ELF executable (no DICM)",
        _body(b"\x7fELF\x02\x01\x01" + garbage(8192)),
        Expect(400, "not_dicom"),
    ),
    # Truncated.
    Case("truncated-preamble", "first 100 bytes", _body(_VALID[:100]), Expect(400, "not_dicom")),
    # Cut inside a File Meta element header: the walk ends there, so the meta lacks its
    # TransferSyntaxUID (VALIDATION.md says `not_dicom` for a truncated File Meta).
    Case(
        "truncated-meta-header",
        "cut inside a File Meta element header",
        _body(_VALID[:150]),
        Expect(400, "missing_tag", details="TransferSyntaxUID"),
    ),
    Case(
        "truncated-meta-value",
        "cut inside a File Meta value",
        _body(_VALID[:170]),
        Expect(400, "malformed", details="past the end of the file"),
    ),
    Case(
        "truncated-dataset",
        "cut inside a data set element header",
        _body(_VALID[:403]),
        Expect(400, "malformed"),
    ),
    Case(
        "truncated-pixels",
        "last 1000 bytes of Pixel Data missing",
        _body(_VALID[:-1000]),
        Expect(400, "malformed", details="past the end"),
    ),
    # Lengths that lie.
    Case(
        "huge-length-meta",
        "File Meta element declaring 0xFFFFFFF0 bytes",
        _lazy(huge_meta_length),
        Expect(400, "malformed", details="past the end of the file"),
    ),
    Case(
        "huge-length-element",
        "data element declaring 0xFFFFFFF0 bytes",
        _lazy(huge_element_length),
        Expect(400, "malformed", details="past the end"),
    ),
    Case(
        "huge-length-in-item",
        "element in an item declaring 2 GiB",
        _lazy(huge_length_in_item),
        Expect(400, "malformed", details="past the end of an item"),
    ),
    # Nesting and counts.
    Case(
        "nesting-17",
        "sequences 17 deep (cap 16)",
        _lazy(lambda: make_nested(17)),
        Expect(400, "nesting_too_deep", details="cap is 16"),
    ),
    Case(
        "nesting-100000",
        "sequences 100,000 deep",
        _lazy(lambda: make_nested(100_000)),
        Expect(400, "nesting_too_deep"),
    ),
    Case(
        "nesting-implicit-64",
        "Implicit VR LE sequences 64 deep",
        _lazy(
            lambda: part10(_dataset_implicit() + nested_sequence(64, implicit=True), IMPLICIT_LE)
        ),
        Expect(400, "nesting_too_deep"),
    ),
    Case(
        "nesting-in-un-64",
        "64 levels hidden in an undefined-length UN",
        _lazy(lambda: nested_in_un(64)),
        Expect(400, "nesting_too_deep"),
    ),
    Case(
        "elements-200001",
        "200,001 data elements (cap 200,000)",
        _lazy(lambda: many_elements(200_001)),
        Expect(400, "too_many_elements"),
    ),
    Case(
        "items-200001",
        "one sequence of 200,001 items",
        _lazy(lambda: many_items(200_001)),
        Expect(400, "too_many_elements", details="items and fragments"),
    ),
    Case(
        "fragments-200001",
        "200,001 pixel data fragments",
        _lazy(lambda: many_fragments(200_001)),
        Expect(400, "too_many_elements", details="items and fragments"),
    ),
    # Compression.
    Case(
        "deflate-bomb-1g",
        "Deflated TS: ~1 MB inflating to 1 GiB (cap 256 MiB)",
        _lazy(lambda: deflate_bomb(1024)),
        Expect(400, "inflate_limit"),
    ),
    Case(
        "deflate-corrupt",
        "Deflated TS with a corrupt stream",
        _lazy(deflate_corrupt),
        Expect(400, "corrupt_compression"),
    ),
    Case(
        "gzip-bomb-1g",
        "gzip body: ~1 MB inflating to 1 GiB (cap 32 MiB)",
        _lazy(lambda: gzip_bomb(1024), Content_Encoding="gzip"),
        Expect(413, "too_large"),
    ),
    Case(
        "gzip-of-gzip",
        "a valid instance gzipped twice, sent with one gzip",
        _lazy(lambda: gzip_of(gzip_of(_VALID)), Content_Encoding="gzip"),
        Expect(400, "not_dicom"),
    ),
    Case(
        "gzip-corrupt",
        "gzip header then garbage",
        _body(b"\x1f\x8b\x08\x00" + garbage(4096), Content_Encoding="gzip"),
        Expect(400, "corrupt_compression"),
    ),
    Case(
        "gzip-truncated",
        "a gzip body cut short",
        _lazy(lambda: gzip_of(_VALID)[:-64], Content_Encoding="gzip"),
        Expect(400, "corrupt_compression"),
    ),
    Case(
        "encoding-br",
        "Content-Encoding: br",
        _body(_VALID, Content_Encoding="br"),
        Expect(415, "unsupported_encoding"),
    ),
    # Preambles (CVE-2019-11687).
    Case(
        "preamble-pe",
        "PE/MZ preamble on a valid file",
        _body(with_preamble(_VALID, b"MZ\x90\x00\x03\x00\x00\x00\x04")),
        Expect(400, "executable_preamble", details="PE/MZ"),
    ),
    Case(
        "preamble-elf",
        "ELF preamble on a valid file",
        _body(with_preamble(_VALID, b"\x7fELF\x02\x01\x01\x00")),
        Expect(400, "executable_preamble", details="ELF"),
    ),
    Case(
        "preamble-shebang",
        "#! preamble on a valid file",
        _body(with_preamble(_VALID, b"#!/bin/sh\nrm -rf /\n")),
        Expect(400, "executable_preamble", details="shebang"),
    ),
    Case(
        "preamble-zip",
        "ZIP local header as preamble",
        _body(with_preamble(_VALID, b"PK\x03\x04\x14\x00")),
        # DICM at 128: a Part 10 file with a ZIP polyglot preamble, not an archive.
        Expect(400, "executable_preamble"),
    ),
    # UIDs and File Meta.
    *(
        Case(
            f"uid-{label}",
            f"SeriesInstanceUID {shown}",
            _body(make_instance(SeriesInstanceUID=uid)),
            Expect(400, "invalid_uid", details="SeriesInstanceUID"),
        )
        # Non-conformant UIDs that Orthanc stores are taken with a warning
        # (tests/test_dicom.py); these cannot name an instance and are refused.
        for label, uid, shown in (
            ("space", "1.2 3", "`1.2 3`"),
            ("control", "1.2\x013", "with a control character"),
            ("backslash", "1.2\\3", "`1.2\\3` (two values)"),
        )
    ),
    Case(
        "missing-meta",
        "DICM followed by the data set, no group 0002",
        _lazy(without_meta),
        Expect(400, "malformed", details="no File Meta Information"),
    ),
    Case(
        "meta-no-transfer-syntax",
        "File Meta without TransferSyntaxUID",
        _lazy(meta_without_transfer_syntax),
        Expect(400, "missing_tag", details="TransferSyntaxUID"),
    ),
    Case(
        "missing-sop-instance-uid",
        "data set without SOPInstanceUID",
        _body(make_instance(SOPInstanceUID=None, meta_instance=SOP_INSTANCE_UID)),
        Expect(400, "missing_tag", details="SOPInstanceUID"),
    ),
    Case(
        "dicomdir",
        "a DICOMDIR (Media Storage Directory)",
        _body(part10(_dataset(), sop_class=_DICOMDIR)),
        Expect(400, "dicomdir"),
    ),
    Case(
        "private-transfer-syntax",
        "transfer syntax 1.2.826.0.1.3680043.8.498.999",
        _body(part10(_dataset(), "1.2.826.0.1.3680043.8.498.999")),
        Expect(400, "unsupported_transfer_syntax"),
    ),
    Case(
        "repeated-tag",
        "a second SOPInstanceUID after the data set",
        _lazy(repeated_tag),
        Expect(400, "malformed", details="tags must ascend"),
    ),
    # ZIP archives.
    Case(
        "zip-ratio-bomb",
        "ZIP entry of 256 MiB zeros (~250 KB)",
        _lazy(lambda: zip_ratio_bomb(256)),
        Expect(413, "archive_too_large", details="times its"),  # the archive's or the entry's
    ),
    Case(
        "zip-overlapping",
        "two entries sharing one stream",
        _lazy(lambda: overlapping_zip(_VALID)),
        Expect(400, "malformed_archive", details="overlap"),
    ),
    Case(
        "zip-claims-60000",
        "end record claiming 60,000 entries",
        _lazy(lambda: claims_entries(make_zip([("a.dcm", _VALID)]), 60_000)),
        Expect(413, "archive_too_large", details="60000 entries"),
    ),
    Case(
        "zip-10001-entries",
        "10,001 real entries (cap 10,000)",
        _lazy(lambda: zip_many_entries(10_001)),
        Expect(413, "archive_too_large", details="10001 entries"),
    ),
    Case(
        "zip-declared-sizes",
        "5 entries claiming 3.75 GiB each (16 GiB cap)",
        _lazy(lambda: zip_declared_sizes(5, 0xF0000000)),
        Expect(413, "archive_too_large", details="inflates to"),
    ),
    Case(
        "zip-truncated",
        "ZIP magic then zeros",
        _body(b"PK\x03\x04" + bytes(4000)),
        Expect(400, "malformed_archive", details="end-of-central-directory"),
    ),
    Case(
        "zip-nested-6",
        "ZIP in ZIP, 6 levels, 4 copies each",
        _lazy(lambda: zip_nested(6)),
        Expect(200, None, items=("nested_archive",) * 4, counted=("nested_archive",) * 4),
    ),
    Case(
        "zip-encrypted",
        "an entry flagged encrypted",
        _lazy(lambda: encrypted_zip(_VALID)),
        Expect(200, None, items=("malformed_archive",), counted=("malformed_archive",)),
    ),
    Case(
        "zip-mixed",
        "hostile entries beside a good one",
        lambda _auth: Probe(
            make_zip(
                [
                    ("nested.dcm", make_nested(64)),
                    ("deflate.dcm", deflate_bomb(300)),
                    ("pe.dcm", with_preamble(_VALID, b"MZ")),
                    ("noise.bin", garbage(2048)),
                    ("good.dcm", good_instance()),
                ]
            )
        ),
        Expect(
            200,
            None,
            items=("nesting_too_deep", "inflate_limit", "executable_preamble", "Success"),
            counted=("nesting_too_deep", "inflate_limit", "executable_preamble"),
        ),
    ),
    # multipart/form-data.
    Case(
        "form-no-closing-boundary",
        "form body cut before its closing boundary",
        _form_probe(lambda: form([("f", "a.dcm", _VALID)], close=False)),
        Expect(400, "malformed_multipart", details="closing boundary"),
    ),
    Case(
        "form-20k-part-header",
        "a 20 KB part header line",
        _form_probe(lambda: form_with_part_headers([f"X-Padding: {'a' * 20_000}"])),
        Expect(400, "malformed_multipart"),
    ),
    Case(
        "form-17-part-headers",
        "17 headers in one part (cap 16)",
        _form_probe(lambda: form_with_part_headers([f"X-H{n}: v" for n in range(17)])),
        Expect(400, "malformed_multipart"),
    ),
    Case(
        "form-no-boundary",
        "multipart/form-data without a boundary",
        lambda _auth: Probe(b"x", {"Content-Type": "multipart/form-data"}),
        Expect(415, None, details="boundary"),
    ),
    Case(
        "form-boundary-257",
        "a 257-character boundary (cap 256)",
        lambda _auth: Probe(b"x", {"Content-Type": f"multipart/form-data; boundary={'b' * 257}"}),
        Expect(415, None, details="boundary"),
    ),
    Case(
        "form-10001-parts",
        "10,001 file parts (cap 10,000)",
        _form_probe(lambda: form([(f"f{n}", f"{n}.dcm", b"x") for n in range(10_001)])),
        Expect(413, "too_many_parts"),
    ),
    Case(
        "form-gzip-bomb",
        "gzip form inflating to 1 GiB (cap 64 MiB)",
        _form_probe(lambda: form_gzip_bomb(1024), Content_Encoding="gzip"),
        Expect(413, "too_large", details="inflates past"),
    ),
    Case(
        "form-garbage",
        "random bytes labelled form-data",
        _form_probe(lambda: garbage(32 * 1024)),
        Expect(400, "malformed_multipart"),
    ),
    Case(
        "form-no-file",
        "a form with only a plain field",
        _form_probe(lambda: form([("note", None, b"hello")])),
        Expect(400, None, details="no file part"),
    ),
    # DICOMweb STOW-RS.
    Case(
        "stow-json-type",
        'multipart/related; type="application/dicom+json"',
        _stow_probe(
            lambda: related([b"{}"], "application/dicom+json"),
            f'multipart/related; type="application/dicom+json"; boundary={_STOW_BOUNDARY}',
        ),
        Expect(415, None, details="metadata"),
    ),
    Case(
        "stow-bad-accept",
        "Accept: application/dicom+xml",
        _stow_probe(lambda: related([_VALID]), Accept="application/dicom+xml"),
        Expect(406, None),
    ),
    Case(
        "stow-no-closing-boundary",
        "STOW-RS body cut before its closing boundary",
        _stow_probe(lambda: related([_VALID])[:-30]),
        Expect(400, "malformed_multipart"),
    ),
    Case(
        "stow-mixed",
        "STOW-RS: hostile parts beside a good one",
        _stow_probe(
            lambda: related([make_nested(64), deflate_bomb(300), garbage(4096), good_instance()])
        ),
        Expect(
            202,
            None,
            items=("0xC000", "0xC000", "0xC000", "Success"),
            counted=("nesting_too_deep", "inflate_limit", "not_dicom"),
        ),
    ),
    # HTTP itself.
    Case(
        "content-length-10tb",
        "Content-Length: 10^13, no body",
        _raw(lambda auth: _request_head(auth, content_length=10**13)),
        Expect(413, "too_large", details="Content-Length"),
    ),
    Case(
        "content-length-negative",
        "Content-Length: -1",
        _raw(lambda auth: _request_head(auth, content_length=-1)),
        Expect(400, None),
    ),
    Case(
        "request-line-garbage",
        "random bytes instead of a request",
        _raw(lambda _auth: garbage(4096, seed=9) + b"\r\n\r\n"),
        Expect(400, None),
    ),
]


def _dataset_implicit() -> bytes:
    return encode_dataset(make_dataset(pixels=False), IMPLICIT_LE)


assert len({case.id for case in CASES}) == len(CASES), "case ids must be unique"


# --- measuring ----------------------------------------------------------------------------


def worker_pids(pid: int) -> list[int]:
    """The intake's validation workers: its children started by multiprocessing's spawn."""
    workers = []
    for child in children(pid):
        with contextlib.suppress(OSError), open(f"/proc/{child}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                workers.append(child)
    return workers


@dataclass
class Memory:
    """Peak RSS during one case: the intake's growth above its RSS at the start, and the
    highest peak of any validation worker (and its growth above its RSS at the start).
    ``reset`` is False when the kernel did not let us reset the high-water marks: the
    peaks are then those since the processes began, so the growths are upper bounds."""

    intake_growth: int = 0
    worker_peak: int = 0
    worker_growth: int = 0
    reset: bool = True


@contextlib.contextmanager
def measure(pid: int) -> Iterator[Memory]:
    memory = Memory()
    workers = worker_pids(pid)
    for process in (pid, *workers):
        memory.reset = reset_peak_rss(process) and memory.reset
    # After a reset VmHWM equals VmRSS; without one, growth above VmRSS is an upper bound.
    start = current_rss(pid)
    worker_start = max((current_rss(w) for w in workers), default=0)
    yield memory
    memory.intake_growth = peak_rss(pid) - start
    memory.worker_peak = max((_peak_or_zero(w) for w in worker_pids(pid)), default=0)
    memory.worker_growth = max(0, memory.worker_peak - worker_start)


def _peak_or_zero(pid: int) -> int:
    try:
        return peak_rss(pid)
    except (OSError, AssertionError):
        return 0  # a worker that left meanwhile


_SAMPLE = re.compile(r"^intake_uploads_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$", re.M)


def rejections(admin_url: str, site: str) -> Counter[str]:
    """The intake's refusal counters for ``site``, by reason (from ``/metrics``)."""
    text = httpx.get(f"{admin_url}/metrics", timeout=30).text
    counts: Counter[str] = Counter()
    for sample in _SAMPLE.finditer(text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', sample["labels"]))
        if labels.get("site") == site and labels.get("outcome") == "rejected":
            counts[labels["reason"]] += int(float(sample["value"]))
    return counts


# --- fuzzing the validator (tests/test_fuzz.py, bench/fuzz.py) -----------------------------

# What read_summary may raise: the BadUpload leaves of app.errors that concern one file.
DOCUMENTED: tuple[type[IntakeError], ...] = (
    NotDicom,  # DicomdirNotAnInstance is one
    MalformedDicom,
    MissingTag,
    InvalidUid,
    UnsupportedTransferSyntax,
    NestingTooDeep,
    TooManyElements,
    InflateLimitExceeded,
    CorruptCompression,
)
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_UID_CHARS = re.compile(r"[!-\[\]-~]+")  # printable ASCII but space and backslash
_VRS = (
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL"
    b" UN UR US UT UV"
)
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_HEADER = re.compile(
    rb"(?s)(?=..\x00\x00(" + b"|".join(_VRS.split()) + rb"))|(?=\xfe\xff[\x00\xdd\x0d]\xe0)"
)
_LENGTHS = (0, 1, 2, 3, 7, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF)


def fuzz_seeds(max_bytes: int = 512 * 1024) -> list[tuple[str, bytes]]:
    """Real files to mutate: generated instances of every encoding the intake takes, and
    pydicom's bundled test files (DICOM or not, valid or not)."""
    dataset = encode_dataset(make_dataset())
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    seeds = [
        ("generated/ct.dcm", good_instance()),
        ("generated/nested-8.dcm", make_nested(8)),
        ("generated/implicit.dcm", make_instance(IMPLICIT_LE)),
        ("generated/big-endian.dcm", make_instance(EXPLICIT_BE)),
        ("generated/encapsulated.dcm", make_encapsulated(3)),
        ("generated/un-nested.dcm", nested_in_un(4)),
        (
            "generated/deflated.dcm",
            part10(dataset, DEFLATED, deflate=compressor.compress(dataset) + compressor.flush()),
        ),
    ]
    for path in sorted(get_testdata_files()):
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) <= max_bytes:
            seeds.append((f"pydicom/{os.path.basename(path)}", data))
    return seeds


def length_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of what look like length fields: after an Explicit VR tag + VR,
    and after item and delimiter tags."""
    found = []
    for match in _HEADER.finditer(data):
        at = match.start()
        vr = match.group(1)
        if vr is None:
            found.append((at + 4, 4))
        elif vr in _LONG_VRS:
            found.append((at + 8, 4))
        else:
            found.append((at + 6, 2))
    return [(at, width) for at, width in found if at + width <= len(data)]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[tuple[str, bytes]]) -> tuple[str, bytes]:
    """A Part 10 seed after one to six mutations: byte flips, truncation, insertion,
    deletion, splices of another seed, and lengths replaced by extreme values."""
    part10_seeds = [(name, data) for name, data in seeds if data[128:132] == b"DICM"]
    name, data = draw(st.sampled_from(part10_seeds))
    buf = bytearray(data)
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "length", "splice"]))
        # Structure lives near the start: favour the File Meta and the first 2 KB after it.
        size = max(len(buf), 1)
        at = draw(st.one_of(st.integers(132, max(132, min(size, 2048))), st.integers(0, size)))
        if kind == "flip" and at < len(buf):
            buf[at] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del buf[at:]
        elif kind == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del buf[at : at + draw(st.integers(1, 64))]
        elif kind == "splice":
            other = draw(st.sampled_from(seeds))[1]
            start = draw(st.integers(0, max(0, len(other) - 1)))
            buf[at:at] = other[start : start + draw(st.integers(1, 512))]
        elif kind == "length":
            fields = length_fields(bytes(buf))
            if not fields:
                continue
            offset, width = draw(st.sampled_from(fields))
            value = draw(st.sampled_from([*_LENGTHS, len(buf), len(buf) - offset]))
            value = draw(st.one_of(st.just(value), st.integers(0, 0xFFFFFFFF)))
            mask = 0xFFFF if width == 2 else 0xFFFFFFFF
            buf[offset : offset + width] = (value & mask).to_bytes(width, "little")
        steps.append(kind)
    return f"{name} <- {'+'.join(steps) or 'unchanged'}", bytes(buf)


def validate_once(path: str, limits: Limits) -> str:
    """Run the validator on ``path``: its outcome label, or an AssertionError when it broke
    a promise (an undocumented exception, an inconsistent Summary, an unbounded detail)."""
    refusal: IntakeError | None = None
    try:
        summary = read_summary(path, limits)
    except IntakeError as exc:
        refusal = exc
    if refusal is not None:
        name = type(refusal).__name__
        assert isinstance(refusal, DOCUMENTED), f"undocumented {name}: {refusal.detail}"
        assert refusal.detail, f"{name} without a detail"
        assert len(refusal.detail) < 4096, f"a {len(refusal.detail)}-character detail"
        if refusal.detail.startswith("unreadable data set:"):  # read_summary's catch-all
            return f"{refusal.reason} (pydicom {refusal.detail.split(':')[1].strip()})"
        return refusal.reason
    for uid in (
        summary.sop_class_uid,
        summary.sop_instance_uid,
        summary.study_instance_uid,
        summary.series_instance_uid,
    ):
        if not uid:  # only the SOP Class UID may be missing, and then it says so
            assert "sop_class_missing" in summary.warnings, "an empty UID without a warning"
            continue
        assert len(uid.encode()) <= 256, f"accepted a {len(uid)}-character UID"
        assert _UID_CHARS.fullmatch(uid), f"accepted a UID that cannot name it {uid!r}"
        conformant = len(uid) <= 64 and _UID.fullmatch(uid)
        assert conformant or "uid_nonconformant" in summary.warnings, (
            f"accepted a non-conformant UID {uid!r} without a warning"
        )
    assert summary.max_depth <= limits.max_depth
    assert summary.element_count <= limits.max_elements
    return "accepted"
