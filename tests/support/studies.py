"""Generated DICOM studies for tests: valid Part 10 CT files built locally, never downloaded.

Every call mints fresh UIDs (``pydicom.uid.generate_uid``), so two calls never collide
in an Orthanc that keeps the first copy of a SOP instance (``AlreadyStored``). ``seed``
only fixes the pixel content.
"""

from __future__ import annotations

import io
import random
import struct

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.tag import Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

__all__ = ["make_nested", "make_study"]

_PREAMBLE = b"\x00" * 128
_CONTENT_SEQUENCE = Tag(0x0040, 0xA730)
_PIXEL_DATA = Tag(0x7FE0, 0x0010)
# PS3.5 §7.5: undefined lengths and the item / delimitation tags of a sequence.
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM = b"\xfe\xff\x00\xe0"
_ITEM_DELIMITATION = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQUENCE_DELIMITATION = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
# The nested files carry a small image so the whole file stays near 2 KB.
_NESTED_IMAGE_SIDE = 24


def make_study(
    n_series: int = 3,
    per_series: int = 4,
    rows: int = 64,
    cols: int = 64,
    patient_id: str = "INTAKE-TEST",
    seed: int | None = None,
) -> list[bytes]:
    """Return ``n_series * per_series`` Part 10 CT instances of one new study.

    Explicit VR Little Endian, 16-bit unsigned MONOCHROME2 pixels with random content,
    a zeroed preamble and File Meta whose MediaStorage UIDs equal the dataset's.
    """
    if n_series < 1 or per_series < 1 or rows < 1 or cols < 1:
        raise ValueError("a study needs at least one series, one instance and one pixel")
    rng = random.Random(seed)  # noqa: S311 - test pixels, not cryptography
    study_uid = generate_uid()
    frame_of_reference_uid = generate_uid()
    files: list[bytes] = []
    for series_number in range(1, n_series + 1):
        series_uid = generate_uid()
        for instance_number in range(1, per_series + 1):
            ds = _ct_dataset(
                patient_id=patient_id,
                study_uid=study_uid,
                series_uid=series_uid,
                frame_of_reference_uid=frame_of_reference_uid,
                series_number=series_number,
                instance_number=instance_number,
                rows=rows,
                cols=cols,
            )
            ds.PixelData = rng.randbytes(rows * cols * 2)
            files.append(_to_part10(ds))
    return files


def make_nested(depth: int) -> bytes:
    """Return a valid ~2 KB CT Part 10 file holding a ContentSequence nested ``depth`` deep.

    Every sequence and item has undefined length (PS3.5 §7.5.2), each item holds the
    next ContentSequence, the innermost item a short TEXT value. ``depth == 0`` gives
    the file without any ContentSequence. The bytes are written iteratively, so any
    depth can be built without hitting Python's recursion limit.
    """
    if depth < 0:
        raise ValueError("depth must be zero or more")
    ds = _ct_dataset(
        patient_id="INTAKE-NESTED",
        study_uid=generate_uid(),
        series_uid=generate_uid(),
        frame_of_reference_uid=generate_uid(),
        series_number=1,
        instance_number=1,
        rows=_NESTED_IMAGE_SIDE,
        cols=_NESTED_IMAGE_SIDE,
    )
    # Everything in the header sorts before (0040,A730), so the sequence can be spliced
    # between the header and Pixel Data while keeping tags ascending (PS3.5 §7.1).
    assert max(ds.keys()) < _CONTENT_SEQUENCE
    pixels = bytes(_NESTED_IMAGE_SIDE * _NESTED_IMAGE_SIDE * 2)
    return _to_part10(ds) + _nested_content_sequence(depth) + _pixel_data_element(pixels)


def _ct_dataset(
    *,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    series_number: int,
    instance_number: int,
    rows: int,
    cols: int,
) -> Dataset:
    """Return the header of one CT image (PS3.3 §A.3), without Pixel Data."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate = "20240101"
    ds.SeriesDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "Orthanc Intake tests"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Generated test study"
    ds.SeriesDescription = f"Generated series {series_number}"
    ds.PatientName = "Test^Intake"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [0, 0, instance_number]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [1, 1]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    return ds


def _to_part10(ds: Dataset) -> bytes:
    """Encode ``ds`` as Part 10 (PS3.10 §7.1): zeroed preamble, DICM, File Meta, dataset."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.preamble = _PREAMBLE
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _nested_content_sequence(depth: int) -> bytes:
    """Encode ``depth`` nested undefined-length ContentSequences in Explicit VR LE."""
    if depth == 0:
        return b""
    opening = b"".join(
        (
            _explicit_vr_element(0x0040, 0xA010, b"CS", b"CONTAINS"),  # RelationshipType
            _explicit_vr_element(0x0040, 0xA040, b"CS", b"CONTAINER"),  # ValueType
            _sequence_header(),
        )
    )
    leaf = b"".join(
        (
            _explicit_vr_element(0x0040, 0xA010, b"CS", b"CONTAINS"),
            _explicit_vr_element(0x0040, 0xA040, b"CS", b"TEXT"),
            _explicit_vr_element(0x0040, 0xA160, b"UT", b"leaf"),  # TextValue
        )
    )
    closing = _ITEM_DELIMITATION + _SEQUENCE_DELIMITATION
    # Level 1 is the dataset's own ContentSequence; each further level sits in an item.
    return (
        _sequence_header()
        + (_item_header() + opening) * (depth - 1)
        + _item_header()
        + leaf
        + closing * depth
    )


def _sequence_header() -> bytes:
    return struct.pack("<HH2s2xI", 0x0040, 0xA730, b"SQ", _UNDEFINED_LENGTH)


def _item_header() -> bytes:
    return _ITEM + struct.pack("<I", _UNDEFINED_LENGTH)


def _explicit_vr_element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """Encode one short-form Explicit VR LE element, padding the value to even length."""
    if len(value) % 2:
        value += b" "
    if vr == b"UT":  # PS3.5 §7.1.2: UT (like OB, OW, SQ) has a 4-byte length
        return struct.pack("<HH2s2xI", group, element, vr, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _pixel_data_element(pixels: bytes) -> bytes:
    return struct.pack("<HH2s2xI", _PIXEL_DATA.group, _PIXEL_DATA.element, b"OW", len(pixels)) + (
        pixels
    )
