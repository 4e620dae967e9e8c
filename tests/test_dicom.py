"""Tests for app.dicom.summary: bounded validation of real Part 10 files, Orthanc IDs, preambles."""

from __future__ import annotations

import os
import pickle
import re
import struct
import time
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import pydicom.data
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.dicom.part10 import read_summary
from app.dicom.summary import (
    Limits,
    Summary,
    classify_preamble,
    orthanc_hash,
    orthanc_ids,
)
from app.errors import (
    BadUpload,
    CorruptCompression,
    InflateLimitExceeded,
    InvalidUid,
    MalformedDicom,
    MissingTag,
    NestingTooDeep,
    NotDicom,
    TooManyElements,
    UnsupportedTransferSyntax,
)
from tests import dicom_samples as samples

LIMITS = Limits()


def summarise(tmp_path: Path, data: bytes, limits: Limits = LIMITS) -> Summary:
    return read_summary(samples.write(tmp_path, data), limits)


def outcome(path: Path | str, limits: Limits = LIMITS) -> Summary | BadUpload:
    try:
        return read_summary(path, limits)
    except BadUpload as exc:
        return exc


# --- valid files -------------------------------------------------------------


def test_explicit_little_endian_instance_is_summarised(tmp_path: Path) -> None:
    """A small CT written by pydicom gives every summary field."""
    summary = summarise(tmp_path, samples.make_instance())
    assert summary == Summary(
        sop_class_uid=samples.CT_IMAGE_STORAGE,
        sop_instance_uid=samples.SOP_INSTANCE_UID,
        series_instance_uid=samples.SERIES_UID,
        study_instance_uid=samples.STUDY_UID,
        patient_id="PID-001",
        transfer_syntax_uid=samples.EXPLICIT_LE,
        modality="CT",
        element_count=18,
        max_depth=0,
    )


@pytest.mark.parametrize(
    "transfer_syntax",
    [samples.IMPLICIT_LE, samples.EXPLICIT_BE, samples.DEFLATED],
    ids=["implicit-le", "explicit-be", "deflated"],
)
def test_other_transfer_syntaxes_are_summarised(tmp_path: Path, transfer_syntax: str) -> None:
    """Implicit LE, Explicit BE and Deflated data sets decode to the same values."""
    summary = summarise(tmp_path, samples.make_instance(transfer_syntax))
    assert summary.transfer_syntax_uid == transfer_syntax
    assert summary.sop_instance_uid == samples.SOP_INSTANCE_UID
    assert summary.patient_id == "PID-001"
    assert summary.element_count == 18


def test_encapsulated_pixel_data_is_skipped_by_fragments(tmp_path: Path) -> None:
    """JPEG fragments after a basic offset table are walked, not read."""
    summary = summarise(tmp_path, samples.make_encapsulated(frames=3))
    assert summary.transfer_syntax_uid == samples.JPEG_BASELINE
    assert summary.modality == "CT"


def test_non_ascii_patient_id_is_decoded_with_the_character_set(tmp_path: Path) -> None:
    """ISO_IR 100 bytes become the right text, and feed Orthanc's patient ID."""
    data = samples.make_instance(PatientID="Müller^X")
    assert b"M\xfcller^X" in data
    summary = summarise(tmp_path, data)
    assert summary.patient_id == "Müller^X"
    assert orthanc_ids(summary.patient_id, "", "", "").patient == orthanc_hash("Müller^X")


def test_patient_id_keeps_leading_spaces_and_drops_trailing_ones(tmp_path: Path) -> None:
    """Orthanc strips trailing padding only."""
    assert summarise(tmp_path, samples.make_instance(PatientID=" 42  ")).patient_id == " 42"


def test_missing_patient_id_and_modality_are_empty(tmp_path: Path) -> None:
    """PatientID is optional (Orthanc hashes ""); Modality becomes None."""
    summary = summarise(tmp_path, samples.make_instance(PatientID=None, Modality=None))
    assert summary.patient_id == ""
    assert summary.modality is None


def test_huge_pixel_data_is_never_read(tmp_path: Path) -> None:
    """A 1 GiB (sparse) native Pixel Data value costs a seek, not memory."""
    body = samples.encode_dataset(samples.make_dataset(pixels=False))
    head = samples.part10(body + samples.element(0x7FE00010, "OW", b""))
    size = 1 << 30
    head = head[:-4] + struct.pack("<L", size)
    path = samples.write(tmp_path, head)
    with path.open("r+b") as f:
        f.truncate(len(head) + size)
    tracemalloc.start()
    try:
        started = time.monotonic()
        summary = read_summary(path, LIMITS)
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary.sop_instance_uid == samples.SOP_INSTANCE_UID
    assert peak < 1 << 20
    assert elapsed < 2


def test_deflated_data_set_is_inflated_in_bounded_memory(tmp_path: Path) -> None:
    """32 MiB of inflated data under the cap passes with a small memory peak."""
    path = samples.write(tmp_path, samples.make_deflate_bomb(32 << 20))
    tracemalloc.start()
    try:
        summary = read_summary(path, LIMITS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary.transfer_syntax_uid == samples.DEFLATED
    assert peak < 4 << 20


# --- nesting and element caps --------------------------------------------------


def test_nesting_at_the_cap_is_accepted(tmp_path: Path) -> None:
    """Items nested exactly max_depth deep pass and report that depth."""
    summary = summarise(tmp_path, samples.make_nested(16))
    assert summary.max_depth == 16


def test_nesting_one_past_the_cap_is_refused(tmp_path: Path) -> None:
    """One level more is NestingTooDeep, naming the depth found and the cap."""
    with pytest.raises(NestingTooDeep, match=r"17 deep .* cap is 16"):
        summarise(tmp_path, samples.make_nested(17))


def test_implicit_vr_nesting_is_counted(tmp_path: Path) -> None:
    """Implicit VR sequences (no VR on the wire) are nested too."""
    data = samples.make_nested(5, transfer_syntax=samples.IMPLICIT_LE)
    assert summarise(tmp_path, data).max_depth == 5
    with pytest.raises(NestingTooDeep):
        summarise(tmp_path, data, Limits(max_depth=4))


@pytest.mark.parametrize("depth", [60, 1000])
def test_deep_nesting_is_refused_quickly(tmp_path: Path, depth: int) -> None:
    """The nesting that kills Orthanc 1.10.1 (50+ levels) is stopped at the cap."""
    started = time.monotonic()
    with pytest.raises(NestingTooDeep):
        summarise(tmp_path, samples.make_nested(depth))
    assert time.monotonic() - started < 1


def test_thousand_levels_walk_without_recursion(tmp_path: Path) -> None:
    """With a raised cap, 1000 levels are walked with no RecursionError anywhere."""
    summary = summarise(tmp_path, samples.make_nested(1000), Limits(max_depth=5000))
    assert summary.max_depth == 1000


def test_nesting_inside_an_undefined_length_un_is_counted(tmp_path: Path) -> None:
    """A UN of undefined length holds an Implicit VR LE sequence (PS3.5 §6.2.2)."""
    content = samples.item(samples.nested_sequence(20, implicit=True), undefined=True)
    un = samples.element(0x00411010, "UN", content + samples.delimiter(0xE0DD), undefined=True)
    body = samples.encode_dataset(samples.make_dataset(pixels=False)) + un
    with pytest.raises(NestingTooDeep):
        summarise(tmp_path, samples.part10(body))


def _defined_length_nesting(depth: int, tag: int) -> bytes:
    """Implicit VR LE items and sequences that all carry defined lengths."""
    inner = b""
    for _ in range(depth):
        inner = samples.element(tag, "SQ", samples.item(inner), implicit=True)
    return inner


@pytest.mark.parametrize("tag", [0x0040A730, 0x00411010], ids=["content-sq", "private"])
def test_defined_length_implicit_nesting_is_counted(tmp_path: Path, tag: int) -> None:
    """Sequences known only from the dictionary, or seen by their items, count too."""
    body = samples.encode_dataset(samples.make_dataset(pixels=False), samples.IMPLICIT_LE)
    data = samples.part10(body + _defined_length_nesting(5, tag), samples.IMPLICIT_LE)
    assert summarise(tmp_path, data).max_depth == 5
    with pytest.raises(NestingTooDeep):
        summarise(tmp_path, data, Limits(max_depth=4))


def test_too_many_elements_are_refused(tmp_path: Path) -> None:
    """Element count over the cap stops the walk."""
    with pytest.raises(TooManyElements, match="10"):
        summarise(tmp_path, samples.make_instance(), Limits(max_elements=10))


def test_elements_inside_items_are_counted(tmp_path: Path) -> None:
    """Each nested SQ counts as a data element."""
    flat = summarise(tmp_path, samples.make_nested(0)).element_count
    assert summarise(tmp_path, samples.make_nested(7)).element_count == flat + 7


# --- broken structure ----------------------------------------------------------


def test_defined_length_past_the_end_is_malformed(tmp_path: Path) -> None:
    """An element declaring more bytes than the file holds names its tag and offset."""
    body = samples.encode_dataset(samples.make_dataset(pixels=False))
    body += samples.element(0x00420011, "OB", b"abcd")[:-4]  # header says 4, nothing follows
    body = body[:-4] + struct.pack("<L", 0x7FFFFFF0)
    with pytest.raises(MalformedDicom, match=r"\(0042,0011\) declares .* at offset \d+"):
        summarise(tmp_path, samples.part10(body))


def test_pixel_data_cut_short_is_malformed(tmp_path: Path) -> None:
    """A file cut inside Pixel Data is refused."""
    data = samples.make_instance()
    with pytest.raises(MalformedDicom, match=r"\(7FE0,0010\)"):
        summarise(tmp_path, data[:-100])


@pytest.mark.parametrize("cut", [0, 1, 100, 128, 131, 132, 135, 140, 150, 200, 300, 400, 500])
def test_truncated_files_are_refused_or_read(tmp_path: Path, cut: int) -> None:
    """Truncation anywhere gives a BadUpload leaf or, at an element boundary, a Summary."""
    data = samples.make_instance()
    result = outcome(samples.write(tmp_path, data[:cut]))
    assert isinstance(result, Summary | BadUpload)
    if cut < 132:
        assert isinstance(result, NotDicom)


def test_undefined_length_outside_sq_and_pixel_data_is_malformed(tmp_path: Path) -> None:
    """Only SQ, UN and encapsulated Pixel Data may have undefined length."""
    body = samples.encode_dataset(samples.make_dataset(pixels=False))
    body += samples.element(0x00420011, "OB", b"", undefined=True)
    with pytest.raises(MalformedDicom, match="undefined length"):
        summarise(tmp_path, samples.part10(body))


def test_non_item_inside_a_sequence_is_malformed(tmp_path: Path) -> None:
    """A sequence holds items only."""
    body = samples.encode_dataset(samples.make_dataset(pixels=False))
    body += samples.element(0x0040A730, "SQ", samples.element(0x00100020, "LO", b"XX"))
    with pytest.raises(MalformedDicom, match="expected an item"):
        summarise(tmp_path, samples.part10(body))


def test_unclosed_sequence_is_malformed(tmp_path: Path) -> None:
    """An undefined-length sequence that never reaches its delimiter is refused."""
    nested = samples.nested_sequence(3)
    body = samples.encode_dataset(samples.make_dataset(pixels=False)) + nested[:-16]
    with pytest.raises(MalformedDicom, match="file ends inside"):
        summarise(tmp_path, samples.part10(body))


def test_undefined_length_fragment_is_malformed(tmp_path: Path) -> None:
    """Pixel data fragments must have defined lengths (PS3.5 §A.4)."""
    value = samples.item(b"") + samples.item(b"", undefined=True)
    body = samples.encode_dataset(samples.make_dataset(pixels=False))
    body += samples.element(0x7FE00010, "OB", value, undefined=True)
    with pytest.raises(MalformedDicom, match="fragment"):
        summarise(tmp_path, samples.part10(body, samples.JPEG_BASELINE))


def test_repeated_tag_is_malformed(tmp_path: Path) -> None:
    """A second SOPInstanceUID could show Orthanc a different value: refused."""
    body = samples.encode_dataset(samples.make_dataset(pixels=False))
    body += samples.element(0x00080018, "UI", b"1.2.3.4\0")
    with pytest.raises(MalformedDicom, match="tags must ascend"):
        summarise(tmp_path, samples.part10(body))


@pytest.mark.parametrize("data", [b"", b"\0" * 131, os.urandom(4096), b"\0" * 128 + b"DICX" * 8])
def test_garbage_is_not_dicom(tmp_path: Path, data: bytes) -> None:
    """Empty, short and random bytes have no DICM prefix."""
    with pytest.raises(NotDicom, match="no DICM prefix at offset 128"):
        summarise(tmp_path, data)


def test_prefix_without_meta_is_malformed(tmp_path: Path) -> None:
    """DICM followed by no group 0002 is refused."""
    with pytest.raises(MalformedDicom, match="File Meta"):
        summarise(tmp_path, bytes(128) + b"DICM" + samples.element(0x00080018, "UI", b"1.2\0"))


def test_charset_with_a_nul_byte_is_malformed(tmp_path: Path) -> None:
    """pydicom raises a bare ValueError on it; the caller sees MalformedDicom."""
    body = samples.element(0x00080005, "CS", b"ISO_IR\x00100")
    body += samples.encode_dataset(samples.make_dataset(SpecificCharacterSet=None))
    with pytest.raises(MalformedDicom, match="embedded null"):
        summarise(tmp_path, samples.part10(body))


def test_dicomdir_is_refused(tmp_path: Path) -> None:
    """A DICOMDIR is a media directory, not an instance."""
    data = samples.part10(b"", sop_class="1.2.840.10008.1.3.10")
    with pytest.raises(NotDicom, match="DICOMDIR"):
        summarise(tmp_path, data)


# --- transfer syntaxes and compression -------------------------------------------


@pytest.mark.parametrize(
    "uid", ["1.2.3.4.5", "1.2.840.10008.1.2.4.999", "1.2.840.10008.1.2.6.2", "1.2.840.10008.1.20"]
)
def test_unknown_transfer_syntax_is_refused(tmp_path: Path, uid: str) -> None:
    """Private, unknown and non-binary transfer syntaxes are refused."""
    body = samples.encode_dataset(samples.make_dataset())
    with pytest.raises(UnsupportedTransferSyntax, match=re.escape(uid)):
        summarise(tmp_path, samples.part10(body, uid))


def test_deflate_bomb_is_stopped_at_the_cap(tmp_path: Path) -> None:
    """A small file inflating past max_inflated_bytes is InflateLimitExceeded."""
    data = samples.make_deflate_bomb(8 << 20)
    assert len(data) < 64 * 1024
    with pytest.raises(InflateLimitExceeded, match=str(1 << 20)):
        summarise(tmp_path, data, Limits(max_inflated_bytes=1 << 20))


def test_corrupt_deflate_stream_is_refused(tmp_path: Path) -> None:
    """Bytes that are not raw deflate are CorruptCompression."""
    data = samples.part10(b"", samples.DEFLATED, deflate=b"\xff" * 64)
    with pytest.raises(CorruptCompression):
        summarise(tmp_path, data)


def test_truncated_deflate_stream_is_refused(tmp_path: Path) -> None:
    """A deflate stream cut before its last block is CorruptCompression."""
    data = samples.make_deflate_bomb(1 << 20)
    with pytest.raises(CorruptCompression, match="ends before"):
        summarise(tmp_path, data[: len(data) - 40])


# --- required attributes and UIDs --------------------------------------------------


@pytest.mark.parametrize(
    ("keyword", "tag"),
    [
        ("SOPInstanceUID", "(0008,0018)"),
        ("StudyInstanceUID", "(0020,000D)"),
        ("SeriesInstanceUID", "(0020,000E)"),
    ],
)
@pytest.mark.parametrize("value", [None, ""], ids=["absent", "empty"])
def test_missing_required_uid_is_refused(
    tmp_path: Path, keyword: str, tag: str, value: str | None
) -> None:
    """Each UID Orthanc needs, absent or empty, is MissingTag naming it (Orthanc refuses too)."""
    overrides: dict[str, Any] = {keyword: value}
    data = samples.make_instance(**overrides)
    with pytest.raises(MissingTag, match=re.escape(f"{keyword} {tag} is missing or empty")):
        summarise(tmp_path, data)


@pytest.mark.parametrize("value", [None, ""], ids=["absent", "empty"])
def test_a_missing_sop_class_is_taken_with_a_warning(tmp_path: Path, value: str | None) -> None:
    """Orthanc stores files without a SOP Class UID; the File Meta's names the class."""
    data = samples.make_instance(SOPClassUID=value, meta_class=samples.CT_IMAGE_STORAGE)
    summary = summarise(tmp_path, data)
    assert summary.warnings == ("sop_class_missing",)
    assert summary.sop_class_uid == samples.CT_IMAGE_STORAGE


@pytest.mark.parametrize("uid", ["1.02.3", "1..2", "1." + "2" * 63, "1.2.abc", ".1.2", "1.2."])
@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SOPInstanceUID"])
def test_a_nonconformant_uid_is_taken_with_a_warning(
    tmp_path: Path, keyword: str, uid: str
) -> None:
    """PS3.5 §9.1 breaches that real devices write (and Orthanc stores): a warning."""
    summary = summarise(tmp_path, samples.make_instance(**{keyword: uid}))
    assert summary.warnings == ("uid_nonconformant",)
    assert uid in (summary.study_instance_uid, summary.sop_instance_uid)


@pytest.mark.parametrize("uid", ["1.2 3", "1.2\\3", "1.2\x013", "1.\t2"])
def test_a_uid_that_cannot_name_an_instance_is_refused(tmp_path: Path, uid: str) -> None:
    """A space, backslash or control character in a UID: InvalidUid (docs/VALIDATION.md)."""
    with pytest.raises(InvalidUid, match="StudyInstanceUID"):
        summarise(tmp_path, samples.make_instance(StudyInstanceUID=uid))


@pytest.mark.parametrize("uid", ["0.0", "1.0.3", "2.25." + "9" * 59])
def test_edge_valid_uids_are_accepted(tmp_path: Path, uid: str) -> None:
    """Zero components and exactly 64 characters are valid."""
    summary = summarise(tmp_path, samples.make_instance(StudyInstanceUID=uid))
    assert summary.study_instance_uid == uid


@pytest.mark.parametrize(
    "override",
    [{"meta_instance": "1.2.3.4"}, {"meta_class": "1.2.840.10008.5.1.4.1.1.4"}],
    ids=["instance", "class"],
)
def test_meta_disagreeing_with_the_data_set_is_a_warning(
    tmp_path: Path, override: dict[str, str]
) -> None:
    """Orthanc stores such files (real RT plans and doses) and reads the data set's UIDs:
    taken, with the warning ``meta_mismatch``, the data set's UIDs summarised."""
    summary = summarise(tmp_path, samples.make_instance(**override))
    assert summary.warnings == ("meta_mismatch",)
    assert summary.sop_instance_uid == samples.SOP_INSTANCE_UID
    assert summary.sop_class_uid == samples.CT_IMAGE_STORAGE


@pytest.mark.parametrize(
    "transfer_syntax", [samples.IMPLICIT_LE, samples.EXPLICIT_LE, samples.EXPLICIT_BE]
)
def test_a_bare_data_set_is_read_as_dcmtk_reads_it(tmp_path: Path, transfer_syntax: str) -> None:
    """No preamble, no DICM, no File Meta: the encoding is read off the first element."""
    body = samples.encode_dataset(samples.make_dataset(pixels=False), transfer_syntax)
    summary = summarise(tmp_path, body)
    assert summary.transfer_syntax_uid == transfer_syntax
    assert summary.sop_instance_uid == samples.SOP_INSTANCE_UID
    assert summary.warnings == ("no_part10_header",)


def test_file_meta_without_a_preamble_is_read(tmp_path: Path) -> None:
    """A Part 10 file with its 128 + 4 leading bytes cut off: File Meta at offset 0."""
    data = samples.make_instance(samples.IMPLICIT_LE)[132:]
    summary = summarise(tmp_path, data)
    assert summary.transfer_syntax_uid == samples.IMPLICIT_LE
    assert summary.warnings == ("no_part10_header",)


@pytest.mark.parametrize(
    "head",
    [b"MZ\x90\x00", b"\x7fELF", b"#!/bin/sh", b"PK\x03\x04", b"\x10\x00\x10\x00PN"],
    ids=["pe", "elf", "shebang", "zip", "group-0010"],
)
def test_a_bare_file_must_open_with_group_0002_or_0008(tmp_path: Path, head: bytes) -> None:
    """The security rule for bare data sets: nothing can open like an executable."""
    body = samples.encode_dataset(samples.make_dataset(pixels=False))
    with pytest.raises(NotDicom, match="no data set at offset 0"):
        summarise(tmp_path, head + body)


def test_a_bare_file_that_does_not_parse_is_not_dicom(tmp_path: Path) -> None:
    """Opening like a data set is not enough: the whole of it must parse."""
    body = samples.encode_dataset(samples.make_dataset(pixels=False))
    with pytest.raises(NotDicom, match="not a data set"):
        summarise(tmp_path, body[:40] + b"\xff" * 64)


def _without_meta_element(tag: int) -> bytes:
    data = samples.make_instance()
    needle = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"UI"
    at = data.index(needle, 132)
    return data[:at] + struct.pack("<HH", 0x0002, 0x0099) + data[at + 4 :]


def test_a_missing_transfer_syntax_in_the_file_meta_is_refused(tmp_path: Path) -> None:
    """Without its Transfer Syntax UID the data set cannot be read."""
    with pytest.raises(MissingTag, match=re.escape("(0002,0010)")):
        summarise(tmp_path, _without_meta_element(0x00020010))


@pytest.mark.parametrize("tag", [0x00020002, 0x00020003])
def test_a_missing_media_storage_uid_is_a_warning(tmp_path: Path, tag: int) -> None:
    """Orthanc reads the data set's own SOP Class and Instance UIDs: taken, with a warning."""
    summary = summarise(tmp_path, _without_meta_element(tag))
    assert summary.warnings == ("meta_incomplete",)
    assert summary.sop_instance_uid == samples.SOP_INSTANCE_UID


def test_errors_pickle_with_their_detail(tmp_path: Path) -> None:
    """Errors cross the worker-process boundary intact."""
    with pytest.raises(BadUpload) as caught:
        summarise(tmp_path, samples.make_nested(30))
    clone = pickle.loads(pickle.dumps(caught.value))  # noqa: S301 - our own bytes
    assert type(clone) is NestingTooDeep
    assert clone.detail == caught.value.detail


# --- other people's files, and fuzzing ------------------------------------------------

BUNDLED = sorted(p for p in pydicom.data.get_testdata_files() if os.path.isfile(p))


@pytest.mark.parametrize("path", BUNDLED, ids=[os.path.basename(p) for p in BUNDLED])
def test_pydicom_test_files_give_a_summary_or_a_bad_upload(path: str) -> None:
    """Every file pydicom ships is refused with a BadUpload leaf or read as pydicom reads it."""
    started = time.monotonic()
    result = outcome(path)
    assert time.monotonic() - started < 5
    assert isinstance(result, Summary | BadUpload)
    if isinstance(result, Summary):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            raw_id = ds.get_item("PatientID")
            if raw_id is not None and raw_id.VR == "UN" and isinstance(raw_id.value, bytes):
                # Explicit VR UN is hashed as stored by Orthanc, padding included.
                patient_id = raw_id.value.decode("latin-1").rstrip("\0")
            else:
                patient_id = ds.get("PatientID") or ""
            expected = (
                ds.SOPClassUID,
                ds.SOPInstanceUID,
                ds.StudyInstanceUID,
                ds.SeriesInstanceUID,
                patient_id,
                ds.get("Modality") or None,
            )
        got = (
            result.sop_class_uid,
            result.sop_instance_uid,
            result.study_instance_uid,
            result.series_instance_uid,
            result.patient_id,
            result.modality,
        )
        assert got == expected


_FUZZ_BASE = samples.make_encapsulated()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mutations=st.lists(
        st.tuples(st.integers(0, len(_FUZZ_BASE) - 1), st.integers(0, 255)), min_size=1, max_size=8
    ),
    cut=st.one_of(st.none(), st.integers(0, len(_FUZZ_BASE))),
)
def test_mutated_files_give_a_summary_or_a_bad_upload(
    tmp_path_factory: pytest.TempPathFactory, mutations: list[tuple[int, int]], cut: int | None
) -> None:
    """Random byte flips and cuts never raise anything but a BadUpload leaf."""
    data = bytearray(_FUZZ_BASE)
    for at, value in mutations:
        data[at] = value
    path = samples.write(tmp_path_factory.mktemp("fuzz"), bytes(data[:cut]))
    assert isinstance(outcome(path, Limits(max_inflated_bytes=1 << 20)), Summary | BadUpload)


# --- Orthanc IDs and preambles -----------------------------------------------------------


def test_orthanc_hash_of_empty_string() -> None:
    """A missing PatientID hashes like Orthanc's empty string."""
    assert orthanc_hash("") == "da39a3ee-5e6b4b0d-3255bfef-95601890-afd80709"


def test_orthanc_ids_match_orthanc_for_dummy_ct() -> None:
    """orthanc-tests' DummyCT.dcm IDs, as a real Orthanc answers them."""
    ids = orthanc_ids(
        "ozp00SjY2xG",
        "1.2.840.113619.2.176.2025.1499492.7391.1171285944.390",
        "1.2.840.113619.2.176.2025.1499492.7391.1171285944.394",
        "1.2.840.113619.2.176.2025.1499492.7040.1171286242.109",
    )
    assert ids.instance == "66a662ce-7430e543-bad44d47-0dc5a943-ec7a538d"
    assert ids.series == "f2635388-f01d497a-15f7c06b-ad7dba06-c4c599fe"
    assert ids.study == "b9c08539-26f93bde-c81ab0d7-bffaf2cb-a4d0bdd0"
    assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}", ids.patient)


@pytest.mark.parametrize(
    ("preamble", "label"),
    [
        (b"MZ\x90\x00", "PE/MZ"),
        (b"\x7fELF\x02\x01", "ELF"),
        (b"\xfe\xed\xfa\xce", "Mach-O"),
        (b"\xfe\xed\xfa\xcf", "Mach-O"),
        (b"\xce\xfa\xed\xfe", "Mach-O"),
        (b"\xcf\xfa\xed\xfe", "Mach-O"),
        (b"\xca\xfe\xba\xbe", "Mach-O"),
        (b"#!/bin/sh\n", "shebang"),
        (b"PK\x03\x04", "ZIP"),
        (b"", None),
        (b"TIFF or vendor text, not code", None),
        (b"PK\x05\x06", "ZIP"),  # an empty archive's end record: ZIP readers take it
    ],
)
def test_classify_preamble(preamble: bytes, label: str | None) -> None:
    """Executable magics are labelled; zeros and other content are harmless."""
    padded = preamble + bytes(128 - len(preamble))
    assert classify_preamble(padded) == label
