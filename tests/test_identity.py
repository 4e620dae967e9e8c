"""One instance is Orthanc's instance: (PatientID, Study, Series, SOP Instance UID).

Through a real intake on both backends to the real private Orthanc: every answer that says
"stored" (Success, AlreadyStored) names an instance that reaches the archive; a site's
answers depend on its own uploads only; an instance joining another site's study is held
(`foreign_study`) until an admin releases it, unless shared studies are allowed.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from tests.dicom_samples import (
    CT_IMAGE_STORAGE,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    encode_dataset,
    make_dataset,
    make_instance,
    part10,
)
from tests.support.archives import make_zip
from tests.support.intake import Admin, IntakeProcess, Site, wait_until
from tests.support.orthanc import OrthancProcess

MakeIntake = Callable[..., IntakeProcess]


def _instance(**uids: str) -> bytes:
    """A small CT instance; unnamed identifying attributes get fresh values."""
    values = {
        "PatientID": f"PID-{uuid.uuid4().hex[:8]}",
        "StudyInstanceUID": generate_uid(),
        "SeriesInstanceUID": generate_uid(),
        "SOPInstanceUID": generate_uid(),
    }
    return make_instance(**(values | uids))


def _in_orthanc(orthanc: OrthancProcess, orthanc_id: str) -> bool:
    with orthanc.client() as client:
        return client.get(f"/instances/{orthanc_id}").status_code == 200


def _stored(intake: IntakeProcess, site: Site, data: bytes) -> dict[str, Any]:
    answer = intake.upload(site, data)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def intake_answer(intake: IntakeProcess, site: Site, body: bytes) -> Any:
    """The intake's 200 answer: one instance's JSON, or a list of them for a ZIP."""
    answer = intake.upload(site, body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _forwarded_row(admin: httpx.Client, site: Site) -> dict[str, Any]:
    """The site's newest upload row, once it is forwarded (admin API)."""

    def forwarded() -> dict[str, Any] | None:
        found = admin.get("/api/uploads", params={"site": site.name}).json()["items"]
        row: dict[str, Any] = found[0]
        return row if row["state"] == "forwarded" else None

    found: dict[str, Any] = wait_until(forwarded, timeout=60)
    return found


def _wait_in_orthanc(orthanc: OrthancProcess, orthanc_id: str) -> None:
    wait_until(lambda: _in_orthanc(orthanc, orthanc_id), timeout=60)


@pytest.fixture
def second_site(shared_intake: IntakeProcess) -> Site:
    return shared_intake.add_site(f"other-{uuid.uuid4().hex[:10]}")


@pytest.mark.parametrize("differs", ["PatientID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_one_sop_uid_under_two_identities_is_two_instances(
    shared_intake: IntakeProcess, fresh_site: Site, private_orthanc: OrthancProcess, differs: str
) -> None:
    """Same SOP Instance UID, another patient, study or series: both are stored, as Orthanc."""
    sop = generate_uid()
    common = {
        "PatientID": f"PID-{uuid.uuid4().hex[:8]}",
        "StudyInstanceUID": generate_uid(),
        "SeriesInstanceUID": generate_uid(),
    }
    first = _stored(shared_intake, fresh_site, _instance(SOPInstanceUID=sop, **common))
    other = common | {differs: generate_uid() if differs != "PatientID" else "PID-corrected"}
    if differs == "StudyInstanceUID":  # a new study means a new series too, in practice
        other["SeriesInstanceUID"] = generate_uid()
    second = _stored(shared_intake, fresh_site, _instance(SOPInstanceUID=sop, **other))
    assert first["ID"] != second["ID"]
    assert (first["Status"], second["Status"]) == ("Success", "Success")
    assert second["IntakeState"] == "queued"
    _wait_in_orthanc(private_orthanc, first["ID"])
    _wait_in_orthanc(private_orthanc, second["ID"])


def test_the_same_instance_with_other_bytes_stays_a_visible_conflict(
    shared_intake: IntakeProcess, fresh_site: Site, private_orthanc: OrthancProcess
) -> None:
    """Same Orthanc ID, other bytes: AlreadyStored (Orthanc keeps the first), quarantined."""
    uids = {
        "PatientID": "PID-conflict",
        "StudyInstanceUID": generate_uid(),
        "SeriesInstanceUID": generate_uid(),
        "SOPInstanceUID": generate_uid(),
    }
    first = _stored(shared_intake, fresh_site, make_instance(**uids))
    second = _stored(shared_intake, fresh_site, make_instance(InstanceNumber=2, **uids))
    assert second["ID"] == first["ID"]
    assert second["Status"] == "AlreadyStored"
    assert (second["IntakeState"], second["IntakeReason"]) == ("quarantined", "conflict")
    _wait_in_orthanc(private_orthanc, first["ID"])


def test_another_site_cannot_suppress_an_instance_by_sending_its_sop_uid_first(
    shared_intake: IntakeProcess,
    fresh_site: Site,
    second_site: Site,
    private_orthanc: OrthancProcess,
) -> None:
    """B forges A's future SOP Instance UID under another patient: A's instance is stored."""
    sop = generate_uid()
    forged = _stored(shared_intake, second_site, _instance(SOPInstanceUID=sop, PatientID="X"))
    real = _stored(shared_intake, fresh_site, _instance(SOPInstanceUID=sop))
    assert (forged["Status"], real["Status"]) == ("Success", "Success")
    assert real["IntakeState"] == "queued"
    _wait_in_orthanc(private_orthanc, real["ID"])


def test_a_site_learns_nothing_of_another_sites_sop_uids(
    shared_intake: IntakeProcess, fresh_site: Site, second_site: Site
) -> None:
    """A SOP UID another site used is answered exactly like an unused one (raw and STOW)."""
    used = generate_uid()
    _stored(shared_intake, fresh_site, _instance(SOPInstanceUID=used))
    probe_used = _stored(shared_intake, second_site, _instance(SOPInstanceUID=used))
    probe_new = _stored(shared_intake, second_site, _instance())
    keys = ("Status", "IntakeState")
    assert [probe_used[k] for k in keys] == [probe_new[k] for k in keys] == ["Success", "queued"]
    data = _instance(SOPInstanceUID=used)
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--b--\r\n"
    with shared_intake.client(second_site) as client:
        stow = client.post(
            "/dicom-web/studies",
            content=body,
            headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
        )
    assert stow.status_code == 200, stow.text
    assert "00081198" not in stow.json()  # no FailedSOPSequence, no 0x0111


def test_an_instance_joining_another_sites_study_is_held_until_released(
    shared_intake: IntakeProcess,
    fresh_site: Site,
    second_site: Site,
    fresh_admin: Admin,
    private_orthanc: OrthancProcess,
) -> None:
    """B adds to A's study: FilteredOut, quarantined `foreign_study`; an admin releases it."""
    study = {"PatientID": f"PID-{uuid.uuid4().hex[:8]}", "StudyInstanceUID": generate_uid()}
    owner = _stored(shared_intake, fresh_site, _instance(**study))
    injected = _stored(shared_intake, second_site, _instance(**study))
    assert injected["ParentStudy"] == owner["ParentStudy"]
    assert injected["Status"] == "FilteredOut"
    assert (injected["IntakeState"], injected["IntakeReason"]) == ("quarantined", "foreign_study")
    # A resend of the held file is not "stored" either.
    again = shared_intake.upload(second_site, _instance(**study))
    assert again.json()["Status"] == "FilteredOut"
    # The owner keeps adding to its own study.
    assert _stored(shared_intake, fresh_site, _instance(**study))["Status"] == "Success"
    _wait_in_orthanc(private_orthanc, owner["ID"])
    assert not _in_orthanc(private_orthanc, injected["ID"])

    with shared_intake.admin_client(fresh_admin) as admin:
        held = admin.get("/api/queue", params={"state": "quarantined", "site": second_site.name})
        assert held.status_code == 200, held.text
        reasons = {item["reason"] for item in held.json()["items"]}
        assert reasons == {"foreign_study"}
        (upload_id,) = [
            i["id"] for i in held.json()["items"] if i["receipt"] == injected["IntakeReceipt"]
        ]
        released = admin.post(f"/api/uploads/{upload_id}/retry")
        assert released.status_code == 200, released.text
    _wait_in_orthanc(private_orthanc, injected["ID"])


def test_shared_studies_let_every_site_add_to_a_study(
    make_intake: MakeIntake, private_orthanc: OrthancProcess
) -> None:
    """INTAKE_SHARED_STUDIES=true: another site's instance in the study is stored at once."""
    intake = make_intake(private_orthanc, shared_studies="true")
    first, second = intake.add_site("first"), intake.add_site("second")
    study = {"PatientID": f"PID-{uuid.uuid4().hex[:8]}", "StudyInstanceUID": generate_uid()}
    _stored(intake, first, _instance(**study))
    joined = _stored(intake, second, _instance(**study))
    assert (joined["Status"], joined["IntakeState"]) == ("Success", "queued")
    _wait_in_orthanc(private_orthanc, joined["ID"])


def _with_raw_patient_id(value: bytes, charset: str) -> bytes:
    """A Part 10 file whose PatientID holds exactly ``value`` (padded to even length)."""
    placeholder = "PLACEHOLDER-PID"  # odd: pydicom pads it with one space
    ds = make_dataset(
        SpecificCharacterSet=charset,
        PatientID=placeholder,
        SOPInstanceUID=generate_uid(),
        StudyInstanceUID=generate_uid(),
        SeriesInstanceUID=generate_uid(),
    )
    encoded = encode_dataset(ds, EXPLICIT_LE)
    old = placeholder.encode() + b" "
    at = encoded.index(old)
    padded = value + (b" " if len(value) % 2 else b"")
    patched = encoded[: at - 2] + struct.pack("<H", len(padded)) + padded + encoded[at + len(old) :]
    return part10(patched, EXPLICIT_LE, sop_class=CT_IMAGE_STORAGE, sop_instance=ds.SOPInstanceUID)


@pytest.mark.parametrize(
    ("value", "charset"),
    [
        (b"AB\xff\xfeCD", "ISO_IR 192"),
        (b"\xc3(x", "ISO_IR 192"),
        (b"caf\xc3\xa9", "ISO_IR 192"),
        (b"Ab\xe9d", "ISO_IR 999"),
        (b"AB\x00CD", "ISO_IR 100"),
        (b"ABC\x00 ", "ISO_IR 100"),
        (b"Ab\xe9d", "ISO_IR 100"),
    ],
    ids=["invalid-utf8", "broken-sequence", "utf8", "unknown-charset", "nul", "nul-pad", "latin1"],
)
def test_orthanc_ids_are_the_ones_orthanc_gives(
    shared_intake: IntakeProcess,
    fresh_site: Site,
    fresh_admin: Admin,
    private_orthanc: OrthancProcess,
    value: bytes,
    charset: str,
) -> None:
    """Odd PatientIDs: the IDs the site is told, and the row's after forwarding, are the
    real Orthanc's for the same file."""
    data = _with_raw_patient_id(value, charset)
    direct = private_orthanc.upload(data)
    assert direct.status_code == 200, direct.text
    told = _stored(shared_intake, fresh_site, data)
    keys = ("ID", "ParentPatient", "ParentStudy", "ParentSeries")
    assert {k: told[k] for k in keys} == {k: direct.json()[k] for k in keys}
    with shared_intake.admin_client(fresh_admin) as admin:
        row = _forwarded_row(admin, fresh_site)
    assert (
        row["orthanc_instance_id"],
        row["orthanc_patient_id"],
        row["orthanc_study_id"],
        row["orthanc_series_id"],
    ) == tuple(direct.json()[k] for k in keys)


@pytest.mark.parametrize(
    ("overrides", "warning"),
    [
        ({"SOPClassUID": None}, "sop_class_missing"),
        ({"SOPClassUID": ""}, "sop_class_missing"),
        ({"SeriesInstanceUID": "1.2." + "3" * 120}, "uid_nonconformant"),
        (
            {
                "SOPInstanceUID": "1.02.3."
                + uuid.uuid4().hex[:8].translate(str.maketrans("abcdef", "123456"))
            },
            "uid_nonconformant",
        ),
        ({"StudyInstanceUID": "1.2.abc." + uuid.uuid4().hex[:8]}, "uid_nonconformant"),
    ],
    ids=["no-sop-class", "empty-sop-class", "long-uid", "leading-zero", "letters"],
)
def test_files_orthanc_stores_are_taken_with_a_warning(
    shared_intake: IntakeProcess,
    fresh_site: Site,
    fresh_admin: Admin,
    private_orthanc: OrthancProcess,
    overrides: dict[str, Any],
    warning: str,
) -> None:
    """Orthanc 1.10.1 stores them (checked first, directly): the intake takes them, forwards
    the bytes unchanged, and the row (API and CSV) carries the warning."""
    values: dict[str, Any] = {
        "PatientID": f"PID-{uuid.uuid4().hex[:8]}",
        "StudyInstanceUID": generate_uid(),
        "SeriesInstanceUID": generate_uid(),
        "SOPInstanceUID": generate_uid(),
    } | overrides
    data = make_instance(meta_class=CT_IMAGE_STORAGE, **values)
    direct = private_orthanc.upload(data)
    assert direct.status_code == 200, direct.text
    told = _stored(shared_intake, fresh_site, data)
    assert told["ID"] == direct.json()["ID"]
    with shared_intake.admin_client(fresh_admin) as admin:
        row = _forwarded_row(admin, fresh_site)
        assert row["warnings"] == [warning]
        export = admin.get("/api/uploads.csv", params={"site": fresh_site.name}).text
    assert warning in export
    assert private_orthanc.instance_file(told["ID"])[128:] == data[128:]


def test_a_modality_longer_than_its_column_is_stored_on_both_backends(
    shared_intake: IntakeProcess, fresh_site: Site, private_orthanc: OrthancProcess
) -> None:
    """Orthanc takes a 300-character Modality; PostgreSQL once refused the row (a 503 a
    peer push would meet for ever). The row keeps 16 characters; the file goes on whole."""
    data = _instance(Modality="M" * 300)
    told = _stored(shared_intake, fresh_site, data)
    assert told["Status"] == "Success"
    _wait_in_orthanc(private_orthanc, told["ID"])


def _bare(data: bytes) -> bytes:
    """A Part 10 file's data set alone: no preamble, no DICM, no File Meta."""
    return data[144 + struct.unpack("<L", data[140:144])[0] :]


# Files Orthanc 1.10.1 stores although their Part 10 header is absent or disagrees with
# the data set (pydicom's ExplVR_*NoMeta.dcm, rtstruct.dcm, rtplan.dcm, rtdose*.dcm).
_SHAPES: dict[str, tuple[Callable[[dict[str, Any]], bytes], str]] = {
    "bare-implicit-le": (lambda v: _bare(make_instance(IMPLICIT_LE, **v)), "no_part10_header"),
    "bare-explicit-le": (lambda v: _bare(make_instance(EXPLICIT_LE, **v)), "no_part10_header"),
    "bare-explicit-be": (lambda v: _bare(make_instance(EXPLICIT_BE, **v)), "no_part10_header"),
    "meta-without-preamble": (lambda v: make_instance(IMPLICIT_LE, **v)[132:], "no_part10_header"),
    "meta-names-another-instance": (
        lambda v: make_instance(meta_instance=generate_uid(), **v),
        "meta_mismatch",
    ),
    "meta-names-another-class": (
        lambda v: make_instance(meta_class="1.2.840.10008.5.1.4.1.1.4", **v),
        "meta_mismatch",
    ),
}


@pytest.fixture(scope="module")
def reference_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    """A plain Orthanc of this module's own: what Orthanc answers, apart from the archive."""
    with OrthancProcess(tmp_path_factory.mktemp("reference"), name="reference") as orthanc:
        yield orthanc


@pytest.mark.parametrize("zipped", [False, True], ids=["raw", "zip"])
@pytest.mark.parametrize("shape", sorted(_SHAPES))
def test_files_without_or_against_their_part10_header_are_taken_as_orthanc_takes_them(
    shared_intake: IntakeProcess,
    fresh_site: Site,
    fresh_admin: Admin,
    private_orthanc: OrthancProcess,
    reference_orthanc: OrthancProcess,
    shape: str,
    zipped: bool,
) -> None:
    """Orthanc's answer and IDs, the bytes forwarded as sent (a preamble zeroed), and the
    row's warning; alone and as a ZIP entry."""
    build, warning = _SHAPES[shape]
    data = build(
        {
            "PatientID": f"PID-{uuid.uuid4().hex[:8]}",
            "StudyInstanceUID": generate_uid(),
            "SeriesInstanceUID": generate_uid(),
            "SOPInstanceUID": generate_uid(),
        }
    )
    body = make_zip([("IM0001", data)]) if zipped else data
    direct = reference_orthanc.upload(body)
    assert direct.status_code == 200, direct.text
    told: Any = intake_answer(shared_intake, fresh_site, body)
    expected, answered = (direct.json()[0], told[0]) if zipped else (direct.json(), told)
    keys = ("ID", "ParentPatient", "ParentStudy", "ParentSeries", "Status")
    assert {k: answered[k] for k in keys} == {k: expected[k] for k in keys}
    with shared_intake.admin_client(fresh_admin) as admin:
        row = _forwarded_row(admin, fresh_site)
    assert row["warnings"] == [warning]
    stored = private_orthanc.instance_file(answered["ID"])
    assert stored == (bytes(128) + data[128:] if data[128:132] == b"DICM" else data)
