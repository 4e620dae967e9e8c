"""Read a DICOM Part 10 file (PS3.10 §7) within limits, and summarise it.

The Part 10 header and File Meta Information are checked here, the whole data set is
walked with the bounded scanner in ``app.dicom.scan``, and only then does pydicom
decode the handful of short top-level values the summary needs, so no upload can make
pydicom recurse, inflate or buffer without bound. Every failure is a ``BadUpload`` leaf
from ``app.errors``.

Only the validation workers import this module (through ``app.dicom.validation.read_summary``):
pydicom, and the numpy it imports whenever numpy is installed, stay out of the
serving process.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import struct
import warnings
from typing import BinaryIO

from pydicom.charset import decode_bytes, python_encoding
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID_dictionary  # type: ignore[attr-defined]  # no __all__ entry

from app.dicom.scan import LONG_VRS, SHORT_VRS, FileSource, InflateSource, Source, scan, tag_str
from app.dicom.summary import (
    MAX_IDENTIFIER_BYTES,
    UID_CHARS,
    Limits,
    Summary,
    bare_data_set_order,
    is_part10,
)
from app.errors import (
    DicomdirNotAnInstance,
    IdentifierTooLong,
    IntakeError,
    InvalidUid,
    MalformedDicom,
    MissingTag,
    NotDicom,
    UnsupportedTransferSyntax,
)

__all__ = ["read_summary"]

_PREAMBLE = 128
_MAGIC = b"DICM"
_DICOMDIR = "1.2.840.10008.1.3.10"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
# PS3.5 Annex A: these encode the data set as raw deflate of Explicit VR LE. pydicom
# only knows the first; the JPIP "Deflate" ones work the same way.
_DEFLATED = frozenset(
    {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205"}
)
# MIME and XML encodings are not binary data sets; Papyrus 3 is not a DICOM syntax.
_NOT_BINARY = frozenset({"1.2.840.10008.1.2.6.1", "1.2.840.10008.1.2.6.2", "1.2.840.10008.1.20"})
TRANSFER_SYNTAXES = (
    frozenset(uid for uid, entry in UID_dictionary.items() if entry[1] == "Transfer Syntax")
    - _NOT_BINARY
)

_META_TS = 0x00020010
_META_CLASS = 0x00020002
_META_INSTANCE = 0x00020003
_CHARSET = 0x00080005
_SOP_CLASS = 0x00080016
_SOP_INSTANCE = 0x00080018
_MODALITY = 0x00080060
_PATIENT_ID = 0x00100020
_STUDY = 0x0020000D
_SERIES = 0x0020000E
_WANTED = frozenset({_CHARSET, _SOP_CLASS, _SOP_INSTANCE, _MODALITY, _PATIENT_ID, _STUDY, _SERIES})
_NAMES = {
    _META_TS: "TransferSyntaxUID",
    _META_CLASS: "MediaStorageSOPClassUID",
    _META_INSTANCE: "MediaStorageSOPInstanceUID",
    _SOP_CLASS: "SOPClassUID",
    _SOP_INSTANCE: "SOPInstanceUID",
    _STUDY: "StudyInstanceUID",
    _SERIES: "SeriesInstanceUID",
}
# PS3.5 §9.1: components of digits, no leading zero unless the component is "0".
_UID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_MAX_META_VALUE = 1024

# Warnings on a row (app/dicom/summary.py Summary.warnings; docs/VALIDATION.md).
SOP_CLASS_MISSING = "sop_class_missing"
UID_NONCONFORMANT = "uid_nonconformant"
META_INCOMPLETE = "meta_incomplete"
META_MISMATCH = "meta_mismatch"
NO_PART10_HEADER = "no_part10_header"


def read_summary(path: str | os.PathLike[str], limits: Limits) -> Summary:
    """Validate the DICOM file at ``path`` within ``limits`` (a Part 10 file, or a bare
    data set as Orthanc takes one); summarise it or raise."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            return _read(f, size, limits)
        except IntakeError:
            raise
        except OSError:
            raise  # the disk failed, not the upload
        except Exception as exc:
            raise MalformedDicom(f"unreadable data set: {type(exc).__name__}: {exc}") from None


def _read(f: BinaryIO, size: int, limits: Limits) -> Summary:
    head = f.read(_PREAMBLE + 4)
    if is_part10(head):
        meta, start = _read_meta(f, size, limits.max_elements, _PREAMBLE + 4)
        return _read_data_set(f, size, limits, meta, start, [])
    order = bare_data_set_order(head)
    if order is None:
        raise NotDicom(
            f"no DICM prefix at offset {_PREAMBLE} and no data set at offset 0: not a DICOM "
            f"file ({size} bytes)"
        )
    # No PS3.10 §7.1 header: a bare data set, which Orthanc (DCMTK) stores. Its encoding is
    # read off its first element as DCMTK reads it; File Meta without a preamble is read too.
    explicit = head[4:6] in LONG_VRS or head[4:6] in SHORT_VRS
    if not explicit and order == "big":
        raise UnsupportedTransferSyntax(
            "a bare data set in implicit VR big endian, which is no DICOM transfer syntax"
        )
    try:
        if struct.unpack("<H", head[:2])[0] == 0x0002:
            meta, start = _read_meta(f, size, limits.max_elements, 0)
        else:
            ts = (_EXPLICIT_LE if order == "little" else _EXPLICIT_BE) if explicit else _IMPLICIT_LE
            meta, start = {_META_TS: ts}, 0
        return _read_data_set(f, size, limits, meta, start, [NO_PART10_HEADER])
    except MalformedDicom as exc:
        raise NotDicom(f"no DICM prefix at offset {_PREAMBLE}, and not a data set: {exc}") from None


def _read_data_set(
    f: BinaryIO, size: int, limits: Limits, meta: dict[int, str], start: int, warned: list[str]
) -> Summary:
    """The data set from ``start``, read with the File Meta's transfer syntax."""
    if not meta.get(_META_TS):
        raise MissingTag(
            f"{_NAMES[_META_TS]} {tag_str(_META_TS)} is missing or empty in the File Meta "
            "Information"
        )
    incomplete = not meta.get(_META_CLASS) or not meta.get(_META_INSTANCE)
    if incomplete and NO_PART10_HEADER not in warned:
        warned.append(META_INCOMPLETE)  # Orthanc reads the data set's own UIDs
    if meta.get(_META_CLASS) == _DICOMDIR:
        raise DicomdirNotAnInstance("a DICOMDIR is a media directory, not an instance")
    ts = meta[_META_TS]
    if ts not in TRANSFER_SYNTAXES:
        raise UnsupportedTransferSyntax(f"transfer syntax {ts!r} is unknown or private")

    source: Source
    if ts in _DEFLATED:
        source = InflateSource(f, start, limits.max_inflated_bytes)
    else:
        source = FileSource(f, start, size)
    implicit, little = ts == _IMPLICIT_LE, ts != _EXPLICIT_BE
    found = scan(
        source,
        implicit=implicit,
        little=little,
        max_depth=limits.max_depth,
        max_elements=limits.max_elements,
        wanted=_WANTED,
    )
    values = _decode(b"".join(found.wanted.values()), implicit=implicit, little=little)

    uids = {}
    for tag in (_SOP_CLASS, _SOP_INSTANCE, _STUDY, _SERIES):
        uid = values.get(tag, "")
        if not uid and tag == _SOP_CLASS:
            # Orthanc stores such files (its regression set has three, from bug reports).
            warned.append(SOP_CLASS_MISSING)
            uids[tag] = meta.get(_META_CLASS, "")
            continue
        if not uid:
            raise MissingTag(f"{_NAMES[tag]} {tag_str(tag)} is missing or empty")
        if _check_uid(_NAMES[tag], uid) and UID_NONCONFORMANT not in warned:
            warned.append(UID_NONCONFORMANT)
        uids[tag] = uid
    patient_id = values.get(_PATIENT_ID, "")
    named = (
        ("PatientID", patient_id),
        *((_NAMES[t], uids[t]) for t in (*_IDENTIFYING, _SOP_CLASS)),
    )
    for name, value in named:
        _check_identifier(name, value)
    for meta_tag, tag in ((_META_INSTANCE, _SOP_INSTANCE), (_META_CLASS, _SOP_CLASS)):
        # Orthanc stores such files (real RT plans and doses; pydicom's rtplan.dcm): it
        # reads the data set's UIDs, and so does every ID the intake computes.
        differs = meta.get(meta_tag) and uids[tag] and meta[meta_tag] != uids[tag]
        if differs and META_MISMATCH not in warned:
            warned.append(META_MISMATCH)
    return Summary(
        sop_class_uid=uids[_SOP_CLASS],
        sop_instance_uid=uids[_SOP_INSTANCE],
        series_instance_uid=uids[_SERIES],
        study_instance_uid=uids[_STUDY],
        patient_id=patient_id,
        transfer_syntax_uid=ts,
        modality=values.get(_MODALITY) or None,
        element_count=found.element_count,
        max_depth=found.max_depth,
        warnings=tuple(warned),
    )


def _read_meta(f: BinaryIO, size: int, max_elements: int, pos: int) -> tuple[dict[int, str], int]:
    """Walk group 0002 (always Explicit VR LE, PS3.10 §7.1) from ``pos`` without trusting
    its group length; the data set's offset follows."""
    values: dict[int, str] = {}
    count = 0
    while True:
        f.seek(pos)
        header = f.read(8)
        if len(header) < 8 or struct.unpack("<H", header[:2])[0] != 0x0002:
            break
        group, elem = struct.unpack("<HH", header[:4])
        tag = group << 16 | elem
        vr = header[4:6]
        if vr in LONG_VRS:
            extra = f.read(4)
            if len(extra) < 4:
                raise NotDicom(f"the File Meta Information is truncated at offset {pos}")
            (length,) = struct.unpack("<L", extra)
            value_at = pos + 12
        elif vr in SHORT_VRS:
            (length,) = struct.unpack("<H", header[6:8])
            value_at = pos + 8
        else:
            raise MalformedDicom(
                f"File Meta element {tag_str(tag)} at offset {pos} has no valid VR: the group"
                " must be Explicit VR Little Endian (PS3.10 §7.1)"
            )
        if value_at + length > size:
            raise MalformedDicom(
                f"File Meta element {tag_str(tag)} at offset {pos} declares {length} bytes,"
                " past the end of the file"
            )
        if tag in _NAMES:
            if length > _MAX_META_VALUE:
                raise MalformedDicom(f"{_NAMES[tag]} {tag_str(tag)} is {length} bytes long")
            raw = f.read(length)
            values[tag] = raw.decode("ascii", errors="replace").rstrip("\0 ")
        count += 1
        if count > max_elements:
            raise MalformedDicom(f"the File Meta Information has over {max_elements} elements")
        pos = value_at + length
    if count == 0:
        raise MalformedDicom("no File Meta Information group (0002,xxxx) after the DICM prefix")
    return values, pos


def _decode(encoded: bytes, *, implicit: bool, little: bool) -> dict[int, str]:
    """Let pydicom decode the few short top-level elements the scan lifted out."""
    with warnings.catch_warnings():
        # pydicom warns on odd but readable values; our own checks decide.
        warnings.simplefilter("ignore")
        ds: Dataset = read_dataset(io.BytesIO(encoded), implicit, little)
        values: dict[int, str] = {}
        for tag in _WANTED - {_CHARSET}:
            if tag not in ds:
                continue
            raw = ds.get_item(tag)
            if not implicit and getattr(raw, "VR", None) == "UN" and isinstance(raw.value, bytes):
                # Explicit VR "UN": Orthanc (DCMTK) hashes the value as stored, padding
                # included, where pydicom would re-type it by the dictionary and strip it.
                values[tag] = decode_bytes(raw.value, ds._character_set, set()).rstrip("\0")
                continue
            if tag == _PATIENT_ID and isinstance(raw.value, bytes):
                # Hashed into every Orthanc ID: decoded as Orthanc decodes it.
                values[tag] = orthanc_text(raw.value, _charsets(ds))
                continue
            # Values decode lazily, with (0008,0005) Specific Character Set.
            values[tag] = _text(tag, ds[tag].value)
    return values


def _charsets(ds: Dataset) -> list[str]:
    """(0008,0005) Specific Character Set as written, each value stripped."""
    raw = ds.get_item(_CHARSET) if _CHARSET in ds else None
    value = getattr(raw, "value", None)
    if isinstance(value, bytes):
        text = value.decode("ascii", "replace")
    elif isinstance(value, str | MultiValue | list):
        text = value if isinstance(value, str) else "\\".join(str(v) for v in value)
    else:
        return []
    return [part.strip(" \0") for part in text.split("\\")]


def orthanc_text(raw: bytes, charsets: list[str]) -> str:
    """A text value as Orthanc 1.10.1 reads it, measured against the real one
    (tests/test_identity.py): cut at the first NUL (DCMTK hands over a C string);
    under ISO_IR 192, invalid UTF-8 dropped as Boost.Locale's ``skip`` drops it; under a
    character set Orthanc does not know, only printable ASCII kept (its
    ``ConvertToAscii``); otherwise decoded with the character set; trailing spaces
    stripped."""
    raw = raw.split(b"\0", 1)[0]
    if any(c not in python_encoding for c in charsets):
        text = bytes(b for b in raw if 32 <= b < 127).decode("ascii")
    elif charsets and charsets[0] == "ISO_IR 192":
        text = _utf8_skipping_invalid(raw)
    else:
        text = decode_bytes(raw, charsets or [""], set())
    return text.rstrip(" ")


def _sequence_size(lead: int) -> int:
    """Bytes of the UTF-8 sequence a lead byte opens; 0 for an illegal lead (RFC 3629)."""
    if lead < 0xC2:
        return 0
    if lead < 0xE0:
        return 2
    if lead < 0xF0:
        return 3
    return 4 if lead <= 0xF4 else 0


def _utf8_skipping_invalid(raw: bytes) -> str:
    """UTF-8 with each invalid sequence dropped the way Boost.Locale's decoder consumes it:
    an illegal lead byte alone; a lead byte with every byte up to and including the first
    that is not a continuation byte."""
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        lead = raw[i]
        if lead < 0x80:
            out.append(lead)
            i += 1
            continue
        size = _sequence_size(lead)
        if size == 0:
            i += 1
            continue
        j, whole = i + 1, True
        while j < i + size:
            if j >= n:
                whole = False
                break
            trail = raw[j]
            j += 1
            if trail & 0xC0 != 0x80:
                whole = False
                break
        if whole:
            with contextlib.suppress(UnicodeDecodeError):  # overlong forms, surrogates
                raw[i:j].decode("utf-8")
                out += raw[i:j]
        i = j
    return out.decode("utf-8")


def _text(tag: int, value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value)
    if isinstance(value, str):
        return value.rstrip(" ")
    raise MalformedDicom(f"{tag_str(tag)} does not hold text (found {type(value).__name__})")


# What Orthanc indexes an instance by, each at most 256 bytes in UTF-8 (Orthanc 1.10.1,
# measured against the real one: tests/test_orthanc_limits.py). The SOP Class UID is held
# to the same bound: the database's UID columns are 256 characters wide.
_IDENTIFYING = (_STUDY, _SERIES, _SOP_INSTANCE)


def _check_identifier(name: str, value: str) -> None:
    size = len(value.encode("utf-8", "surrogateescape"))
    if size > MAX_IDENTIFIER_BYTES:
        raise IdentifierTooLong(
            f"{name} is {size} bytes in UTF-8; the private Orthanc refuses more than "
            f"{MAX_IDENTIFIER_BYTES}"
        )


def _check_uid(name: str, uid: str) -> bool:
    """Whether ``uid`` breaks PS3.5 §9.1 in a way Orthanc accepts (a warning, not a
    refusal): over 64 characters, a leading zero, characters other than digits and dots,
    as real devices write them. Refused (``invalid_uid``), for a security reason: a
    space, control character, backslash or non-ASCII character, which could not name
    the instance unambiguously in a URL, a multi-valued attribute or a log line."""
    if len(uid) <= 64 and _UID_RE.fullmatch(uid):
        return False
    if not UID_CHARS.fullmatch(uid):
        raise InvalidUid(
            f"{name} {uid[:80]!r} is not a UID: it holds a space, control character, "
            "backslash or non-ASCII character (see docs/VALIDATION.md)"
        )
    return True
