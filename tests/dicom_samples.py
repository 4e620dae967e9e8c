"""Generate DICOM Part 10 files for tests: valid instances and precise breakages.

Valid files come from pydicom's writer; malformed ones are assembled byte by byte
with ``part10`` and the ``element``/``sequence`` helpers, so each test says exactly
which bytes are wrong.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

from pydicom.config import disable_value_validation
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

__all__ = [
    "CT_IMAGE_STORAGE",
    "DEFLATED",
    "EXPLICIT_BE",
    "EXPLICIT_LE",
    "IMPLICIT_LE",
    "JPEG_BASELINE",
    "SOP_INSTANCE_UID",
    "delimiter",
    "element",
    "encode_dataset",
    "item",
    "make_dataset",
    "make_deflate_bomb",
    "make_encapsulated",
    "make_instance",
    "make_nested",
    "nested_sequence",
    "part10",
    "write",
]

EXPLICIT_LE = str(ExplicitVRLittleEndian)
IMPLICIT_LE = str(ImplicitVRLittleEndian)
EXPLICIT_BE = str(ExplicitVRBigEndian)
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_BASELINE = str(JPEGBaseline8Bit)
CT_IMAGE_STORAGE = str(CTImageStorage)
SOP_INSTANCE_UID = "1.2.826.0.1.3680043.8.498.1001"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1002"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1003"

_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def make_dataset(*, pixels: bool = True, **overrides: Any) -> Dataset:
    """A small CT-like data set; keyword overrides set attributes, ``None`` deletes one."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = SOP_INSTANCE_UID
    ds.Modality = "CT"
    ds.PatientName = "Test^Patient"
    ds.PatientID = "PID-001"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.InstanceNumber = 1
    if pixels:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = 64
        ds.Columns = 64
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = bytes(range(256)) * 32  # 64 x 64 x 2 bytes
    # Tests need invalid values too; pydicom would refuse or warn on them.
    with disable_value_validation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in overrides.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
    return ds


def make_instance(
    transfer_syntax: str = EXPLICIT_LE,
    *,
    meta_class: str | None = None,
    meta_instance: str | None = None,
    **overrides: Any,
) -> bytes:
    """A whole Part 10 file: data set encoded by pydicom, File Meta by ``part10``.

    ``meta_class``/``meta_instance`` default to the data set's own UIDs.
    """
    ds = make_dataset(**overrides)
    return part10(
        encode_dataset(ds, transfer_syntax),
        transfer_syntax,
        sop_class=meta_class or str(ds.get("SOPClassUID") or CT_IMAGE_STORAGE),
        sop_instance=meta_instance or str(ds.get("SOPInstanceUID") or SOP_INSTANCE_UID),
    )


def make_encapsulated(frames: int = 2) -> bytes:
    """JPEG Baseline instance with fake fragments and a basic offset table item (PS3.5 §A.4)."""
    fragments = [b"\xff\xd8" + bytes([i]) * 100 + b"\xff\xd9" for i in range(frames)]
    offsets, at = [], 0
    for fragment in fragments:
        offsets.append(at)
        at += 8 + len(fragment)
    value = item(struct.pack(f"<{frames}L", *offsets))
    value += b"".join(item(f) for f in fragments) + delimiter(0xE0DD)
    ds = make_dataset(pixels=False, NumberOfFrames=frames)
    body = encode_dataset(ds) + element(0x7FE00010, "OB", value, undefined=True)
    return part10(body, JPEG_BASELINE)


def make_nested(depth: int, *, transfer_syntax: str = EXPLICIT_LE) -> bytes:
    """A valid instance followed by ContentSequence items nested ``depth`` deep.

    Built by hand because pydicom's writer recurses once per level.
    """
    nested = nested_sequence(depth, implicit=transfer_syntax == IMPLICIT_LE)
    ds = make_dataset(pixels=False)
    return part10(encode_dataset(ds, transfer_syntax) + nested, transfer_syntax)


def nested_sequence(depth: int, *, implicit: bool = False) -> bytes:
    """ContentSequence (0040,A730) of undefined length, one item per level, ``depth`` deep."""
    inner = b""
    for _ in range(depth):
        level = item(inner, undefined=True)
        inner = element(0x0040A730, "SQ", level, undefined=True, implicit=implicit)
    return inner


def make_deflate_bomb(inflated_bytes: int) -> bytes:
    """A Deflated Explicit VR LE file whose data set inflates to over ``inflated_bytes``."""
    body = encode_dataset(make_dataset(pixels=False))
    body += element(0x00420011, "OB", bytes(inflated_bytes))  # Encapsulated Document
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return part10(body, DEFLATED, deflate=compressor.compress(body) + compressor.flush())


def element(
    tag: int,
    vr: str,
    value: bytes,
    *,
    undefined: bool = False,
    implicit: bool = False,
    little: bool = True,
) -> bytes:
    """One encoded data element; ``undefined`` writes 0xFFFFFFFF and appends a delimiter
    only for SQ (callers supply fragment delimiters themselves)."""
    order = "<" if little else ">"
    length = 0xFFFFFFFF if undefined else len(value)
    tail = delimiter(0xE0DD) if undefined and vr == "SQ" else b""
    head = struct.pack(f"{order}HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack(f"{order}L", length) + value + tail
    if vr in _LONG_VRS:
        return head + vr.encode() + b"\0\0" + struct.pack(f"{order}L", length) + value + tail
    return head + vr.encode() + struct.pack(f"{order}H", length) + value + tail


def item(value: bytes, *, undefined: bool = False) -> bytes:
    if undefined:
        return struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + value + delimiter(0xE00D)
    return struct.pack("<HHL", 0xFFFE, 0xE000, len(value)) + value


def delimiter(elem: int) -> bytes:
    return struct.pack("<HHL", 0xFFFE, elem, 0)


def encode_dataset(ds: Dataset, transfer_syntax: str = EXPLICIT_LE) -> bytes:
    """The data set alone (no preamble or meta) as pydicom encodes it in ``transfer_syntax``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
    meta.MediaStorageSOPInstanceUID = UID(SOP_INSTANCE_UID)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta = meta
    out = io.BytesIO()
    # Tests need invalid values too; pydicom would refuse or warn on them.
    with disable_value_validation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcmwrite(out, ds, enforce_file_format=True)
    whole = out.getvalue()
    meta_end = 144 + struct.unpack("<L", whole[140:144])[0]  # (0002,0000) holds the rest
    return whole[meta_end:]


def part10(
    dataset: bytes,
    transfer_syntax: str = EXPLICIT_LE,
    *,
    sop_class: str = CT_IMAGE_STORAGE,
    sop_instance: str = SOP_INSTANCE_UID,
    deflate: bytes | None = None,
    preamble: bytes = bytes(128),
) -> bytes:
    """Preamble + DICM + File Meta (PS3.10 §7.1) + ``dataset`` (or its ``deflate``d form)."""

    def ui(value: str) -> bytes:
        raw = value.encode()
        return raw + b"\0" if len(raw) % 2 else raw

    meta = element(0x00020001, "OB", b"\0\1")
    meta += element(0x00020002, "UI", ui(sop_class))
    meta += element(0x00020003, "UI", ui(sop_instance))
    meta += element(0x00020010, "UI", ui(transfer_syntax))
    meta += element(0x00020012, "UI", ui("1.2.826.0.1.3680043.8.498.1"))
    group_length = element(0x00020000, "UL", struct.pack("<L", len(meta)))
    return preamble + b"DICM" + group_length + meta + (dataset if deflate is None else deflate)


def write(tmp_path: Path, data: bytes, name: str = "instance.dcm") -> Path:
    """Write ``data`` under ``tmp_path`` and return the file's path."""
    path = tmp_path / name
    path.write_bytes(data)
    return path
