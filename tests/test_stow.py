"""DICOMweb STOW-RS, driven by the real dicomweb-client package."""

from __future__ import annotations

import io

import httpx
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from app.intake import stow
from tests.conftest import SHARED_SQLITE_ONLY
from tests.support.intake import IntakeProcess, Site, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study


def _datasets(files: list[bytes]) -> list[Dataset]:
    return [pydicom.dcmread(io.BytesIO(f)) for f in files]


def _client(intake: IntakeProcess, site: Site) -> DICOMwebClient:
    session = requests.Session()
    session.auth = (site.name, site.token)
    return DICOMwebClient(url=f"{intake.url}/dicom-web", session=session)


def test_dicomweb_client_stores_a_study(
    shared_intake: IntakeProcess, fresh_site: Site, private_orthanc: OrthancProcess
) -> None:
    intake, site = shared_intake, fresh_site
    datasets = _datasets(make_study(n_series=1, per_series=3))
    answer = _client(intake, site).store_instances(datasets)
    referenced = answer.ReferencedSOPSequence
    assert [r.ReferencedSOPInstanceUID for r in referenced] == [d.SOPInstanceUID for d in datasets]
    assert [r.ReferencedSOPClassUID for r in referenced] == [d.SOPClassUID for d in datasets]
    assert "FailedSOPSequence" not in answer
    with httpx.Client(
        base_url=private_orthanc.url, auth=(private_orthanc.username, private_orthanc.password)
    ) as orthanc:

        def stored() -> bool:
            found = orthanc.post(
                "/tools/find",
                json={
                    "Level": "Instance",
                    "Query": {"StudyInstanceUID": datasets[0].StudyInstanceUID},
                },
            ).json()
            return len(found) == 3

        wait_until(stored, timeout=60)


@SHARED_SQLITE_ONLY
def test_an_instance_of_another_study_is_refused_alone(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    """POST /studies/{uid}: the stranger fails with 0xC409, the rest is stored (202)."""
    ours = _datasets(make_study(n_series=1, per_series=2))
    stranger = _datasets(make_study(n_series=1, per_series=1))
    client = _client(shared_intake, fresh_site)
    answer = client.store_instances(
        [ours[0], stranger[0], ours[1]], study_instance_uid=ours[0].StudyInstanceUID
    )
    assert [r.ReferencedSOPInstanceUID for r in answer.ReferencedSOPSequence] == [
        ours[0].SOPInstanceUID,
        ours[1].SOPInstanceUID,
    ]
    (failed,) = answer.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == stranger[0].SOPInstanceUID
    assert failed.FailureReason == stow.STUDY_UID_MISMATCH


def _related(parts: list[tuple[str, bytes]], boundary: str = "stow-boundary") -> bytes:
    body = b""
    for content_type, data in parts:
        body += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def _post(
    intake: IntakeProcess, site: Site, body: bytes, content_type: str, **headers: str
) -> httpx.Response:
    with intake.client(site) as client:
        return client.post(
            "/dicom-web/studies", content=body, headers={"Content-Type": content_type, **headers}
        )


RELATED = 'multipart/related; type="application/dicom"; boundary=stow-boundary'


@SHARED_SQLITE_ONLY
def test_nothing_stored_is_a_409_with_reasons(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    body = _related([("application/dicom", b"not dicom"), ("application/dicom+json", b"{}")])
    response = _post(shared_intake, fresh_site, body, RELATED)
    assert response.status_code == 409
    assert response.headers["content-type"] == stow.MEDIA_TYPE
    failed = response.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"] for f in failed] == [
        [stow.CANNOT_UNDERSTAND],
        [stow.CANNOT_UNDERSTAND],
    ]


@SHARED_SQLITE_ONLY
def test_a_conflicting_resend_is_reported_as_a_duplicate_sop_instance(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    """Same SOP Instance UID, other bytes: kept for an admin, reported failed (0x0111)."""
    (data,) = make_study(1, 1)
    first = _post(shared_intake, fresh_site, _related([("application/dicom", data)]), RELATED)
    changed = data[:-2] + bytes([data[-2] ^ 1, data[-1]])
    again = _post(shared_intake, fresh_site, _related([("application/dicom", changed)]), RELATED)
    assert first.status_code == 200
    assert again.status_code == 409
    (failed,) = again.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [stow.DUPLICATE_SOP_INSTANCE]


@SHARED_SQLITE_ONLY
@pytest.mark.parametrize(
    ("content_type", "accept", "status"),
    [
        ("application/dicom", None, 415),
        ('multipart/related; type="application/dicom+xml"; boundary=b', None, 415),
        (RELATED, "application/dicom+xml", 406),
    ],
    ids=["not-multipart", "metadata-bulkdata", "xml-answer"],
)
def test_requests_the_intake_cannot_serve_get_precise_errors(
    shared_intake: IntakeProcess,
    fresh_site: Site,
    content_type: str,
    accept: str | None,
    status: int,
) -> None:
    headers = {"Accept": accept} if accept else {}
    body = _related([("application/dicom", make_study(1, 1)[0])])
    response = _post(shared_intake, fresh_site, body, content_type, **headers)
    assert response.status_code == status
    assert response.json()["Details"]


@SHARED_SQLITE_ONLY
def test_stow_needs_a_site_token(shared_intake: IntakeProcess) -> None:
    with httpx.Client(base_url=shared_intake.url) as client:
        response = client.post(
            "/dicom-web/studies", content=b"x", headers={"Content-Type": RELATED}
        )
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Basic")
