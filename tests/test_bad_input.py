"""Bad uploads get their documented status and Orthanc-shaped error, and cost nothing else."""

from __future__ import annotations

import base64
import gzip
import io
import socket
import warnings
import zlib
from typing import Any

import httpx
import pydicom
import pytest
from sqlalchemy import create_engine, select

from app.db.models import Site as SiteRow
from app.db.models import State, Upload
from tests.conftest import ModuleIntakes
from tests.support.intake import IntakeProcess, Site, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.shared import shared_intake_fixtures
from tests.support.studies import make_nested, make_study


def _rewrite(data: bytes, **changes: Any) -> bytes:
    """The file with attributes set (or deleted when the value is None), re-encoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on the invalid values we write on purpose
        ds = pydicom.dcmread(io.BytesIO(data))
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


def _assert_orthanc_error(response: httpx.Response, status: int, *, details: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["HttpStatus"] == status
    assert body["Method"] == "POST"
    assert body["Uri"] == "/instances"
    assert {"HttpError", "Message", "OrthancError", "OrthancStatus"} <= set(body)
    assert details in body["Details"], body["Details"]
    return body


# Parser-level cases share the module's intake per backend, each with its own site.
intake, site, _admin = shared_intake_fixtures()


def _rows(intake: IntakeProcess, site: Site) -> list[Upload]:
    """The site's upload rows, oldest first."""
    engine = create_engine(intake.database_url)
    try:
        with engine.connect() as conn:
            query = (
                select(Upload)
                .join(SiteRow, SiteRow.id == Upload.site_id)
                .where(SiteRow.name == site.name)
                .order_by(Upload.id)
            )
            return list(conn.execute(query).all())  # type: ignore[arg-type]
    finally:
        engine.dispose()


VALID = make_study(n_series=1, per_series=1)[0]


@pytest.mark.parametrize(
    ("body", "details"),
    [
        (b"", "DICM"),
        (b"hello, not DICOM " * 40, "DICM"),
        (VALID[:300], ""),
        (VALID[:140], ""),
    ],
    ids=["empty", "garbage", "truncated-300", "truncated-meta"],
)
def test_not_dicom_is_400_bad_file_format(
    intake: IntakeProcess, site: Site, body: bytes, details: str
) -> None:
    error = _assert_orthanc_error(intake.upload(site, body), 400, details=details)
    assert error["OrthancStatus"] == 15
    assert error["OrthancError"] == "Bad file format"


def test_missing_sop_instance_uid_is_inexistent_tag(intake: IntakeProcess, site: Site) -> None:
    data = _rewrite(VALID, SOPInstanceUID=None)
    error = _assert_orthanc_error(intake.upload(site, data), 400, details="SOPInstanceUID")
    assert error["OrthancError"] == "Inexistent tag"
    assert error["OrthancStatus"] == 21


@pytest.mark.parametrize("odd_uid", ["1.02.3", "1..2", "1.2.abc", "1." + "2" * 70])
def test_a_nonconformant_uid_is_taken_with_a_warning_on_the_row(
    intake: IntakeProcess, site: Site, odd_uid: str
) -> None:
    """What real devices write and Orthanc stores: 200, forwarded unchanged, warned."""
    data = _rewrite(VALID, SeriesInstanceUID=odd_uid)
    answer = intake.upload(site, data)
    assert answer.status_code == 200, answer.text
    assert [r.warnings for r in _rows(intake, site)] == [["uid_nonconformant"]]


@pytest.mark.parametrize("bad_uid", ["1.2 3", "1.2\x013"])
def test_a_uid_with_spaces_or_controls_is_refused(
    intake: IntakeProcess, site: Site, bad_uid: str
) -> None:
    data = _rewrite(VALID, SeriesInstanceUID=bad_uid)
    _assert_orthanc_error(intake.upload(site, data), 400, details="SeriesInstanceUID")


def test_meta_dataset_mismatch_is_taken_as_orthanc_takes_it(
    intake: IntakeProcess, site: Site
) -> None:
    """File Meta naming another instance: Orthanc stores it, so the intake takes it (with
    the warning meta_mismatch, tests/test_identity.py); the data set's UIDs name it."""
    ds = pydicom.dcmread(io.BytesIO(VALID))
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    answer = intake.upload(site, out.getvalue())
    assert answer.status_code == 200, answer.text
    assert answer.json()["ID"] == intake.upload(site, VALID).json()["ID"]


def test_executable_preamble_is_refused_and_kept_aside(intake: IntakeProcess, site: Site) -> None:
    data = b"MZ\x90\x00".ljust(128, b"\0") + VALID[128:]
    _assert_orthanc_error(intake.upload(site, data), 400, details="executable")
    kept = [f for f in (intake.spool / "refused").iterdir() if f.read_bytes() == data]
    assert len(kept) == 1
    assert [r.reason for r in _rows(intake, site)] == ["executable_preamble"]


def test_unsupported_content_encoding_is_415(intake: IntakeProcess, site: Site) -> None:
    response = intake.upload(site, VALID, headers={"Content-Encoding": "br"})
    _assert_orthanc_error(response, 415, details="br")


def test_corrupt_gzip_is_400(intake: IntakeProcess, site: Site) -> None:
    response = intake.upload(site, b"\x1f\x8b garbage", headers={"Content-Encoding": "gzip"})
    _assert_orthanc_error(response, 400, details="gzip")


def test_gzip_upload_is_accepted(intake: IntakeProcess, site: Site) -> None:
    response = intake.upload(site, gzip.compress(VALID), headers={"Content-Encoding": "gzip"})
    assert response.status_code == 200, response.text


@pytest.fixture
def small_intake(module_intakes: ModuleIntakes) -> IntakeProcess:
    """The module's one intake per backend with a 256 KiB instance cap."""
    return module_intakes(max_instance_bytes=str(256 * 1024))


def test_oversize_declared_body_is_413(small_intake: IntakeProcess) -> None:
    site = small_intake.add_site("big-sender")
    data = make_study(n_series=1, per_series=1, rows=512, cols=512)[0]
    _assert_orthanc_error(small_intake.upload(site, data), 413, details="limit")


def test_oversize_chunked_body_is_413(small_intake: IntakeProcess) -> None:
    """Without Content-Length the cap holds while streaming."""
    site = small_intake.add_site("chunky")
    data = make_study(n_series=1, per_series=1, rows=512, cols=512)[0]
    chunks = iter([data[i : i + 65536] for i in range(0, len(data), 65536)])
    with small_intake.client(site) as client:
        response = client.post("/instances", content=chunks)
    _assert_orthanc_error(response, 413, details="limit")
    assert list((small_intake.spool / "tmp").iterdir()) == []


def test_gzip_bomb_is_413_and_orthanc_is_untouched(
    small_intake: IntakeProcess, private_orthanc: OrthancProcess
) -> None:
    """2 GiB of zeros in ~2 MiB of gzip: refused at the cap, never inflated whole."""
    site = small_intake.add_site("bomber")
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1024 * 1024)
    bomb = b"".join(compressor.compress(block) for _ in range(2048)) + compressor.flush()
    response = small_intake.upload(site, bomb, headers={"Content-Encoding": "gzip"})
    _assert_orthanc_error(response, 413, details="limit")
    assert private_orthanc.is_alive()


def test_deeply_nested_file_is_refused_and_orthanc_survives(
    intake: IntakeProcess, site: Site, private_orthanc: OrthancProcess
) -> None:
    """Depth 64 segfaults Orthanc 1.10.1 (tests/test_orthanc_limits.py); it never gets there."""
    response = intake.upload(site, make_nested(64))
    _assert_orthanc_error(response, 400, details="nest")
    accepted = intake.upload(site, make_nested(16))
    assert accepted.status_code == 200, accepted.text
    instance = accepted.json()["ID"]
    wait_until(lambda: instance in private_orthanc.instances(), timeout=30)
    assert private_orthanc.is_alive()


def test_refusals_are_recorded(intake: IntakeProcess, site: Site) -> None:
    """Every refused upload leaves a `rejected` row with its reason."""
    intake.upload(site, b"garbage" * 100)
    intake.upload(site, _rewrite(VALID, SOPInstanceUID=None))
    rows = _rows(intake, site)
    assert [(r.state, r.reason) for r in rows] == [
        (State.REJECTED, "not_dicom"),
        (State.REJECTED, "missing_tag"),
    ]
    assert all(r.detail for r in rows)


def test_client_vanishing_mid_body_leaves_nothing_and_breaks_nothing(
    intake: IntakeProcess, site: Site
) -> None:
    """Half a body then a closed socket: no temp file left, no error logged, next upload fine."""
    token = base64.b64encode(f"{site.name}:{site.token}".encode()).decode()
    head = (
        "POST /instances HTTP/1.1\r\nHost: intake\r\n"
        f"Authorization: Basic {token}\r\nContent-Length: 100000\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", intake.public_port), timeout=10) as sock:
        sock.sendall(head + VALID[:5000])
    wait_until(lambda: "disconnected mid-upload" in intake.log_text(), timeout=30)
    assert list((intake.spool / "tmp").iterdir()) == []
    assert "Traceback" not in intake.log_text()
    assert intake.upload(site, make_study(n_series=1, per_series=1)[0]).status_code == 200
