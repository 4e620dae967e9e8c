"""What hurts the real private Orthanc (Debian 1.10.1), pinned so the intake's caps stay honest.

Nested sequences: a ~2 KB CT file whose ContentSequence is nested N levels deep with
undefined-length sequences and items (``make_nested``). Measured here: up to 47 levels
are stored; from 48 levels the Orthanc process dies of SIGSEGV inside the upload
request, and the client sees the connection drop. The threshold did not move with
``ulimit -s`` (4 MiB to 16 MiB), so it is Orthanc's own thread stack, not the shell's.
The intake must refuse such files before forwarding them (``NestingTooDeep``).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_nested

pytestmark = pytest.mark.orthanc

# The depth the intake may safely let through, with a wide margin below the crash.
SAFE_DEPTH = 16
LAST_STORED_DEPTH = 47
FIRST_FATAL_DEPTH = 48
_EXIT_WAIT_SECONDS = 10.0


@dataclass(frozen=True)
class Upload:
    """What one upload did to Orthanc."""

    status_code: int | None  # None: the connection dropped before an answer
    orthanc_status: str | None
    exit_code: int | None  # None: Orthanc is still running


@pytest.fixture(scope="module")
def limits_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    with OrthancProcess(tmp_path_factory.mktemp("limits"), name="limits") as orthanc:
        yield orthanc


@pytest.fixture
def orthanc(limits_orthanc: OrthancProcess) -> Iterator[OrthancProcess]:
    """The module's Orthanc, running at the start of each test and revived after it."""
    if not limits_orthanc.is_alive():
        limits_orthanc.restart()
    yield limits_orthanc
    if not limits_orthanc.is_alive():
        limits_orthanc.restart()


def upload_nested(orthanc: OrthancProcess, depth: int) -> Upload:
    """Upload ``make_nested(depth)`` and report the answer and whether Orthanc survived."""
    try:
        response = orthanc.upload(make_nested(depth))
    except httpx.TransportError:
        # Give a dying process time to be reaped before asking whether it died.
        return Upload(None, None, orthanc.wait(_EXIT_WAIT_SECONDS))
    status = response.json().get("Status") if response.is_success else None
    exit_code = None if orthanc.is_alive() else orthanc.wait(_EXIT_WAIT_SECONDS)
    return Upload(response.status_code, status, exit_code)


@pytest.mark.parametrize("depth", [SAFE_DEPTH, LAST_STORED_DEPTH])
def test_nested_file_is_stored_and_orthanc_survives(orthanc: OrthancProcess, depth: int) -> None:
    """Up to 47 nested levels Orthanc stores the file and keeps running."""
    upload = upload_nested(orthanc, depth)
    assert upload == Upload(httpx.codes.OK, "Success", None)
    assert orthanc.is_alive()


@pytest.mark.parametrize("depth", [FIRST_FATAL_DEPTH, 64])
def test_nested_file_kills_orthanc(orthanc: OrthancProcess, depth: int) -> None:
    """From 48 nested levels one upload crashes Orthanc (SIGSEGV) mid-request."""
    upload = upload_nested(orthanc, depth)
    assert upload == Upload(None, None, -signal.SIGSEGV)
    assert not orthanc.is_alive()


def test_orthanc_comes_back_with_its_data_after_the_crash(orthanc: OrthancProcess) -> None:
    """After a crash a restart serves the instances stored before it."""
    stored = orthanc.upload(make_nested(SAFE_DEPTH)).json()["ID"]
    assert upload_nested(orthanc, FIRST_FATAL_DEPTH).exit_code == -signal.SIGSEGV
    orthanc.restart()
    assert stored in orthanc.instances()


def _with_patient_id(patient_id: str, charset: str = "ISO_IR 192") -> bytes:
    from pydicom.uid import generate_uid

    from tests.dicom_samples import make_instance

    return make_instance(
        SpecificCharacterSet=charset,
        PatientID=patient_id,
        SOPInstanceUID=generate_uid(),
        StudyInstanceUID=generate_uid(),
        SeriesInstanceUID=generate_uid(),
    )


@pytest.mark.parametrize(
    ("patient_id", "stored"),
    [("P" * 256, True), ("P" * 257, False), ("\u00e9" * 128, True), ("\u00e9" * 129, False)],
    ids=["256-ascii", "257-ascii", "256-bytes-utf8", "258-bytes-utf8"],
)
def test_orthanc_takes_identifiers_up_to_256_utf8_bytes(
    orthanc: OrthancProcess, patient_id: str, stored: bool
) -> None:
    """The limit the intake checks (part10.MAX_IDENTIFIER_BYTES): bytes in UTF-8, not
    characters; past it Orthanc answers 400 "Bad type for a parameter"."""
    response = orthanc.upload(_with_patient_id(patient_id))
    assert (response.status_code == 200) is stored, response.text
    if not stored:
        assert response.json()["Message"] == "Bad type for a parameter"
