"""What the intake knows of a DICOM instance, without parsing one.

The summary a validated file gives (``Summary``), the limits its parsing runs within,
Orthanc's resource IDs for it, and the executable-preamble check (CVE-2019-11687).
The parser that makes a Summary is ``app.dicom.part10`` (pydicom, numpy); it imports this
module, never the other way round, and only validation workers load it
(``app.dicom.validation``), so the serving process never holds either.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

__all__ = [
    "MAX_IDENTIFIER_BYTES",
    "PREAMBLE_BYTES",
    "UID_CHARS",
    "Limits",
    "OrthancIds",
    "Summary",
    "bare_data_set_order",
    "classify_preamble",
    "is_part10",
    "orthanc_hash",
    "orthanc_ids",
]


@dataclass(frozen=True)
class Limits:
    max_depth: int = 16  # sequence nesting; the top-level data set is 0, its SQ items 1
    max_elements: int = 200_000  # data elements in total, those inside items included
    max_inflated_bytes: int = 256 * 1024 * 1024  # Deflated TS: data set bytes after inflation


@dataclass(frozen=True)
class Summary:
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    transfer_syntax_uid: str
    modality: str | None
    element_count: int
    max_depth: int
    # What the file does that Orthanc takes but the standard does not (docs/VALIDATION.md):
    # it is forwarded unchanged, and the row says so.
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class OrthancIds:
    patient: str
    study: str
    series: str
    instance: str


# What Orthanc indexes an instance by (PatientID, Study, Series, SOP Instance UID) holds
# at most this many bytes in UTF-8 (Orthanc 1.10.1, measured: tests/test_orthanc_limits.py).
MAX_IDENTIFIER_BYTES = 256
# What a UID may hold, in a file or in a URL (STOW-RS ``/studies/{uid}``): printable ASCII
# but space and backslash. PS3.5 §9.1 wants digits and dots; real devices write letters,
# leading zeros and more, and Orthanc takes them (a warning here). Never a space, control
# or non-ASCII character: the UID could not name the instance unambiguously in a URL, a
# multi-valued attribute (backslash) or a log line (docs/VALIDATION.md).
# (Its length is checked on its own: over MAX_IDENTIFIER_BYTES is Orthanc's refusal.)
UID_CHARS = re.compile(r"[!-\[\]-~]+")


def orthanc_hash(*parts: str) -> str:
    """Orthanc's resource ID: SHA-1 of the '|'-joined UTF-8 values, as 5 groups of 8 hex."""
    digest = hashlib.sha1("|".join(parts).encode("utf-8"), usedforsecurity=False).hexdigest()
    return "-".join(digest[i : i + 8] for i in range(0, 40, 8))


def orthanc_ids(patient_id: str, study_uid: str, series_uid: str, sop_uid: str) -> OrthancIds:
    """The four IDs Orthanc will give this instance (its DicomInstanceHasher)."""
    return OrthancIds(
        patient=orthanc_hash(patient_id),
        study=orthanc_hash(patient_id, study_uid),
        series=orthanc_hash(patient_id, study_uid, series_uid),
        instance=orthanc_hash(patient_id, study_uid, series_uid, sop_uid),
    )


_EXECUTABLE_MAGICS = (
    (b"MZ", "PE/MZ"),
    (b"\x7fELF", "ELF"),
    (b"\xfe\xed\xfa\xce", "Mach-O"),
    (b"\xfe\xed\xfa\xcf", "Mach-O"),
    (b"\xce\xfa\xed\xfe", "Mach-O"),
    (b"\xcf\xfa\xed\xfe", "Mach-O"),
    (b"\xca\xfe\xba\xbe", "Mach-O"),
    (b"#!", "shebang"),
    (b"PK\x03\x04", "ZIP"),
    (b"PK\x05\x06", "ZIP"),  # an empty archive's end record: a ZIP reader takes the file
)


PREAMBLE_BYTES = 128  # PS3.10 §7.1: a 128-byte preamble, then "DICM"
_DATA_SET_GROUPS = frozenset({0x0002, 0x0008})


def is_part10(head: bytes) -> bool:
    """Whether a file opening with ``head`` carries the PS3.10 §7.1 header."""
    return head[PREAMBLE_BYTES : PREAMBLE_BYTES + 4] == b"DICM"


def bare_data_set_order(head: bytes) -> str | None:
    """For a file without the Part 10 header: ``"little"`` or ``"big"`` when it opens
    like a data set, the way DCMTK (and so Orthanc) reads such a file; None otherwise.

    A data set holds SOPInstanceUID (0008,0018) and its tags ascend, so its first tag is
    in group 0002 (File Meta written without preamble, always little endian) or 0008.
    Holding the first group to those is also the security rule: such a file cannot open
    with an executable's or an archive's magic (``MZ``, ``\x7fELF``, ``#!``, ``PK``), so
    it cannot be a polyglot (CVE-2019-11687) the way a Part 10 preamble can.
    """
    if len(head) < 8:
        return None
    little, big = head[0] | head[1] << 8, head[0] << 8 | head[1]
    if little in _DATA_SET_GROUPS:
        return "little"
    if big == 0x0008:
        return "big"
    return None


def classify_preamble(preamble: bytes) -> str | None:
    """Label an executable 128-byte preamble (CVE-2019-11687); None if it is harmless."""
    for magic, label in _EXECUTABLE_MAGICS:
        if preamble.startswith(magic):
            return label
    return None
