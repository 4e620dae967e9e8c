"""ZIP archives on POST /instances, against the real Orthanc's own answers."""

from __future__ import annotations

import gzip
from collections.abc import Callable

import pytest
from sqlalchemy import create_engine, select

from app.db.models import Site as SiteRecord
from app.db.models import Upload
from tests.conftest import SHARED_SQLITE_ONLY, SQLITE_ONLY
from tests.support.archives import empty_zip, make_zip, overlapping_zip, quoted_overlap_zip
from tests.support.intake import IntakeProcess, Site, peak_rss, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study

ORTHANC_FIELDS = ("ID", "ParentPatient", "ParentSeries", "ParentStudy", "Path", "Status")


def _rows(
    intake: IntakeProcess, site: Site | None = None, receipts: list[str] | None = None
) -> list[Upload]:
    """The upload records, oldest first: a site's (the intake is shared), or by receipt."""
    engine = create_engine(intake.database_url)
    try:
        with engine.connect() as conn:
            query = select(Upload).order_by(Upload.id)
            if site is not None:
                query = query.join(SiteRecord, Upload.site_id == SiteRecord.id).where(
                    SiteRecord.name == site.name
                )
            if receipts is not None:
                query = query.where(Upload.receipt.in_(receipts))
            return list(conn.execute(query).all())  # type: ignore[arg-type]
    finally:
        engine.dispose()


def test_a_zip_is_answered_like_orthanc_and_every_entry_arrives(
    shared_intake: IntakeProcess,
    fresh_site: Site,
    private_orthanc: OrthancProcess,
    own_orthanc: OrthancProcess,
) -> None:
    """Same archive to the real Orthanc and to the intake: same array, in archive order.
    The reference answer comes from an Orthanc of its own (``own_orthanc``): sent to the
    private Orthanc, the study would be there before the intake forwarded it, and the
    arrival check below would hold without the intake."""
    intake, site = shared_intake, fresh_site
    files = make_study(n_series=2, per_series=2)
    data = make_zip(
        [
            ("study/s1/1.dcm", files[0]),
            ("README.txt", b"not dicom"),
            ("study/s1/2.dcm", files[1]),
            ("study/s2/1.dcm", files[2]),
            ("study/s2/2.dcm", files[3]),
        ]
    )
    with own_orthanc.client() as orthanc:
        expected = orthanc.post("/instances", content=data)
    ours = intake.upload(site, data, headers={"Content-Type": "application/zip"})
    assert expected.status_code == ours.status_code == 200, ours.text
    theirs, answer = expected.json(), ours.json()
    assert len(answer) == len(theirs) == 4
    assert [{k: a[k] for k in ORTHANC_FIELDS} for a in answer] == theirs
    assert [a["IntakeEntry"] for a in answer] == [
        "study/s1/1.dcm",
        "study/s1/2.dcm",
        "study/s2/1.dcm",
        "study/s2/2.dcm",
    ]
    ids = [a["ID"] for a in answer]
    wait_until(lambda: set(ids) <= set(private_orthanc.instances()), timeout=60)
    skipped = [r for r in _rows(intake, site) if r.detail and r.detail.startswith("skipped:")]
    assert [r.reason for r in skipped] == ["not_dicom"]


@SHARED_SQLITE_ONLY
def test_dicomdir_and_non_dicom_entries_are_skipped_and_recorded(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    """Left out of the answer, as Orthanc does, but on record as refusals."""
    intake, site = shared_intake, fresh_site
    data = make_zip(
        [
            ("DICOMDIR", bytes(128) + b"DICM" + bytes(16)),
            ("notes/readme.txt", b"hello"),
            ("a.dcm", make_study(1, 1)[0]),
        ]
    )
    response = intake.upload(site, data)
    assert response.status_code == 200
    assert [a["IntakeEntry"] for a in response.json()] == ["a.dcm"]
    rows = _rows(intake, site)
    assert sorted((r.state, r.reason) for r in rows if r.state == "rejected") == [
        ("rejected", "dicomdir"),
        ("rejected", "not_dicom"),
    ]


@SHARED_SQLITE_ONLY
def test_an_empty_archive_answers_an_empty_array(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    intake, site = shared_intake, fresh_site
    # Orthanc 1.10.1 answers 400 "Cannot open ZIP archive" here; [] is Orthanc's documented
    # answer for an archive without DICOM, and what clients expect.
    response = intake.upload(site, empty_zip())
    assert response.status_code == 200
    assert response.json() == []


@SHARED_SQLITE_ONLY
def test_a_bad_entry_fails_alone_with_its_reason(
    shared_intake: IntakeProcess, fresh_site: Site, private_orthanc: OrthancProcess
) -> None:
    intake, site = shared_intake, fresh_site
    good, other = make_study(n_series=1, per_series=2)
    data = make_zip([("bad.dcm", other[:300]), ("good.dcm", good)])
    response = intake.upload(site, data)
    assert response.status_code == 200
    bad, ok = response.json()
    assert bad["Status"] == "Failure"
    assert bad["IntakeEntry"] == "bad.dcm"
    assert bad["IntakeReason"] == "malformed"
    assert bad["HttpStatus"] == 400
    assert bad["Details"]
    assert ok["Status"] == "Success"
    wait_until(lambda: ok["ID"] in private_orthanc.instances(), timeout=60)
    (row,) = _rows(intake, receipts=[bad["IntakeReceipt"]])
    assert row.state == "rejected"


@SHARED_SQLITE_ONLY
def test_a_nested_archive_entry_is_refused_and_the_rest_taken(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    intake, site = shared_intake, fresh_site
    inner = make_zip([("x.dcm", make_study(1, 1)[0])])
    data = make_zip([("inner.zip", inner), ("ok.dcm", make_study(1, 1)[0])])
    response = intake.upload(site, data)
    assert response.status_code == 200
    nested, ok = response.json()
    assert nested["IntakeReason"] == "nested_archive"
    assert ok["Status"] == "Success"


@SHARED_SQLITE_ONLY
def test_resending_an_archive_answers_already_stored(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    intake, site = shared_intake, fresh_site
    data = make_zip([(f"{i}.dcm", f) for i, f in enumerate(make_study(1, 3))])
    first = intake.upload(site, data).json()
    again = intake.upload(site, data).json()
    assert [a["Status"] for a in first] == ["Success"] * 3
    assert [a["Status"] for a in again] == ["AlreadyStored"] * 3
    assert [a["IntakeState"] for a in again] == ["duplicate"] * 3


@SHARED_SQLITE_ONLY
@pytest.mark.parametrize(
    ("make", "status", "reason"),
    [
        (lambda: make_zip([("bomb.dcm", bytes(32 * 1024 * 1024))]), 413, "inflates"),
        (lambda: overlapping_zip(make_study(1, 1)[0]), 400, "overlap"),
        (lambda: b"PK\x03\x04" + bytes(4000), 400, "end-of-central-directory"),
        (lambda: make_zip([(f"{i}.dcm", bytes(1024 * 1024)) for i in range(32)]), 413, "times"),
        (lambda: quoted_overlap_zip(make_study(1, 1)[0]), 400, "overlap"),
    ],
    ids=["ratio-bomb", "overlapping-entries", "truncated", "small-entries-bomb", "quoted-overlap"],
)
def test_hostile_archives_are_refused_whole_and_nothing_is_kept(
    shared_intake: IntakeProcess,
    fresh_site: Site,
    make: Callable[[], bytes],
    status: int,
    reason: str,
) -> None:
    intake, site = shared_intake, fresh_site
    response = intake.upload(site, make())
    assert response.status_code == status, response.text
    assert reason in response.json()["Details"]
    rows = _rows(intake, site)
    assert [r.state for r in rows] == ["rejected"]
    assert not list((intake.spool / "tmp").iterdir())
    assert intake.returncode is None


@SHARED_SQLITE_ONLY
def test_a_gzip_encoded_archive_is_unpacked(shared_intake: IntakeProcess, fresh_site: Site) -> None:
    intake, site = shared_intake, fresh_site
    data = make_zip([("a.dcm", make_study(1, 1)[0])])
    response = intake.upload(site, gzip.compress(data), headers={"Content-Encoding": "gzip"})
    assert response.status_code == 200
    assert [a["Status"] for a in response.json()] == ["Success"]


@SHARED_SQLITE_ONLY
def test_an_archive_mislabelled_gzip_is_still_an_archive(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    """Orthanc looks for ZIP magic before it gunzips; a ZIP sent with that header works."""
    intake, site = shared_intake, fresh_site
    data = make_zip([("a.dcm", make_study(1, 1)[0])])
    response = intake.upload(site, data, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 200
    assert [a["Status"] for a in response.json()] == ["Success"]


@SQLITE_ONLY  # the cap is the parser's: one intake with the setting, on one backend
def test_archive_entries_count_against_the_request_caps(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess
) -> None:
    intake = make_intake(private_orthanc, max_files_per_request="3")
    site = intake.add_site("capped")
    data = make_zip([(f"{i}.dcm", f) for i, f in enumerate(make_study(1, 4))])
    response = intake.upload(site, data)
    assert response.status_code == 413
    assert response.json()["Details"] == "the archive holds 4 entries; the limit is 3"


@SHARED_SQLITE_ONLY
def test_every_entry_counts_against_the_sites_rate(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    """instances-per-minute counts instances, not requests: the third entry of four waits."""
    intake, site = shared_intake, fresh_site
    done = intake.cli("sites", "policy", site.name, "--instances-per-minute", "2", "--json")
    assert done.returncode == 0, done.stderr
    data = make_zip([(f"{i}.dcm", f) for i, f in enumerate(make_study(1, 4))])
    response = intake.upload(site, data)
    assert response.status_code == 200
    answer = response.json()
    assert [a["Status"] for a in answer] == ["Success", "Success", "Failure", "Failure"]
    assert {a.get("IntakeReason") for a in answer[2:]} == {"rate_limited"}
    assert {a.get("HttpStatus") for a in answer[2:]} == {429}
    # With nothing taken, the whole request is refused the way a single upload would be.
    again = intake.upload(site, make_zip([("x.dcm", make_study(1, 1)[0])]))
    assert again.status_code == 429
    assert int(again.headers["retry-after"]) >= 1


@SHARED_SQLITE_ONLY
def test_bombs_cost_the_intake_little_memory(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    """A 256 MiB ratio bomb and a ZIP of 1000 entries: peak RSS grows by under 32 MiB."""
    intake, site = shared_intake, fresh_site
    pid = intake.pid
    assert pid is not None
    before = peak_rss(pid)
    bomb = make_zip([("bomb.dcm", bytes(256 * 1024 * 1024))])
    assert intake.upload(site, bomb).status_code == 413
    many = make_zip([(f"{i}.txt", b"x") for i in range(1000)])
    assert intake.upload(site, many).json() == []
    assert peak_rss(pid) - before < 32 * 1024 * 1024
