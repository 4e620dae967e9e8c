"""The admin API's intake log, studies and daily stats, on a real intake over real HTTP.

Every test runs on the module's shared intake (one per backend) with a site and an admin
of its own, and looks only at its own rows: listings are filtered by its site(s), or by
UIDs only its data carries, so what other tests wrote cannot change a result."""

from __future__ import annotations

import csv
import io
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, select

from app.admin import studies
from app.db.models import Site as SiteRow
from app.db.models import Upload
from app.db.sessions import make_engine, make_sessionmaker
from tests.support.intake import Admin, IntakeProcess, Site, wait_until
from tests.support.studies import make_study

GARBAGE = b"not a DICOM file at all " * 20


@pytest.fixture
def api(shared_intake: IntakeProcess, fresh_admin: Admin) -> Iterator[httpx.Client]:
    with shared_intake.admin_client(fresh_admin) as client:
        yield client


def _insert(intake: IntakeProcess, site: str, rows: list[dict[str, Any]]) -> list[int]:
    """Upload rows written straight into the intake's database; their ids."""
    engine = make_engine(intake.database_url)
    try:
        with engine.begin() as connection:
            site_id = connection.scalar(select(SiteRow.id).where(SiteRow.name == site))
            first = connection.scalar(select(Upload.id).order_by(Upload.id.desc()).limit(1)) or 0
            base = {"site_id": site_id, "byte_size": 1000, "attempts": 0, "failed_answers": 0}
            connection.execute(
                insert(Upload),
                [{**base, "receipt": f"t{first + i:031d}", **r} for i, r in enumerate(rows)],
            )
            ids = connection.scalars(
                select(Upload.id).where(Upload.id > first, Upload.site_id == site_id)
            ).all()
    finally:
        engine.dispose()
    return sorted(ids)


def _all(api: httpx.Client, path: str, **params: Any) -> list[dict[str, Any]]:
    response = api.get(path, params=params)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def _upload_all(intake: IntakeProcess, site: Site, files: list[bytes]) -> list[dict[str, Any]]:
    answers = []
    for data in files:
        response = intake.upload(site, data)
        assert response.status_code == 200, response.text
        answers.append(response.json())
    return answers


@pytest.mark.parametrize(
    "path",
    ["/api/uploads", "/api/uploads/1", "/api/uploads.csv", "/api/studies", "/api/stats/daily"],
)
def test_routes_need_an_admin(shared_intake: IntakeProcess, fresh_admin: Admin, path: str) -> None:
    """Without credentials every route here answers 401 in the admin error shape."""
    with shared_intake.admin_client() as anonymous:
        response = anonymous.get(path)
    assert response.status_code == 401
    assert set(response.json()) == {"error", "detail"}


def test_each_filter_narrows_the_log(
    shared_intake: IntakeProcess, fresh_site: Site, api: httpx.Client
) -> None:
    """Every filter keeps exactly the rows it names; filters combine.

    The test's rows are those of its two sites: a filter that other tests' rows also
    match (state, patient, address, time) is read under each of the two sites in turn;
    one on UIDs or Orthanc IDs, which only this test's files carry, over the whole log."""
    other = shared_intake.add_site(f"other-{uuid.uuid4().hex[:12]}")

    def ours(**params: Any) -> list[dict[str, Any]]:
        return [
            row
            for name in (fresh_site.name, other.name)
            for row in _all(api, "/api/uploads", site=name, **params)
        ]

    first = make_study(2, 2, patient_id="PAT-A")
    answers = _upload_all(shared_intake, fresh_site, first)
    _upload_all(shared_intake, other, make_study(1, 2, patient_id="PAT-B"))
    assert shared_intake.upload(fresh_site, GARBAGE).status_code == 400
    everything = ours()
    assert len(everything) == 7
    mine = [r for r in everything if r["site"] == fresh_site.name]
    one = next(r for r in mine if r["sop_instance_uid"])

    assert len(_all(api, "/api/uploads", site=fresh_site.name)) == 5
    assert _all(api, "/api/uploads", site="no-such-site") == []
    rejected = ours(state="rejected")
    assert [r["reason"] for r in rejected] == ["not_dicom"]
    assert len(ours(state=["rejected", "queued", "forwarded"])) == 7
    assert len(_all(api, "/api/uploads", reason="not_dicom", site=other.name)) == 0
    assert len(_all(api, "/api/uploads", study_uid=one["study_instance_uid"])) == 4
    assert len(_all(api, "/api/uploads", series_uid=one["series_instance_uid"])) == 2
    assert [r["id"] for r in _all(api, "/api/uploads", sop_uid=one["sop_instance_uid"])] == [
        one["id"]
    ]
    assert len(ours(patient_id="PAT-B")) == 2
    assert len(_all(api, "/api/uploads", orthanc_id=answers[0]["ParentStudy"])) == 4
    assert len(_all(api, "/api/uploads", orthanc_id=answers[0]["ParentSeries"])) == 2
    assert len(_all(api, "/api/uploads", orthanc_id=answers[0]["ID"])) == 1
    assert len(ours(remote_addr="127.0.0.1")) == 7
    assert ours(remote_addr="192.0.2.1") == []
    newest = max(datetime.fromisoformat(r["received_at"]) for r in everything)
    assert len(ours(received_from=newest.isoformat())) == 1
    assert len(ours(received_to=newest.isoformat())) == 6


def test_one_record_in_full(
    shared_intake: IntakeProcess, fresh_site: Site, api: httpx.Client
) -> None:
    """A record shows its hashes, sizes, UIDs and Orthanc IDs; an unknown id is 404."""
    data = make_study(1, 1)[0]
    answer = _upload_all(shared_intake, fresh_site, [data])[0]
    listed = _all(api, "/api/uploads", site=fresh_site.name)[0]
    record = api.get(f"/api/uploads/{listed['id']}").json()
    assert record["byte_size"] == len(data)
    assert record["orthanc_instance_id"] == answer["ID"]
    assert record["orthanc_study_id"] == answer["ParentStudy"]
    assert len(record["sha256"]) == 64
    assert record["state"] in ("queued", "forwarded")
    missing = api.get("/api/uploads/999999")
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"


def test_walking_pages_sees_every_row_once_while_uploads_arrive(
    shared_intake: IntakeProcess, fresh_site: Site, api: httpx.Client
) -> None:
    """Keyset pages: no duplicates and no gaps, though new rows arrive during the walk."""
    start = datetime.now(UTC) - timedelta(days=3)
    # Several rows share a timestamp, so the id has to break ties.
    existing = _insert(
        shared_intake,
        fresh_site.name,
        [
            {"received_at": start + timedelta(seconds=i // 3), "state": "forwarded"}
            for i in range(300)
        ],
    )
    files = make_study(1, 12)
    stop = threading.Event()

    def keep_uploading() -> None:
        for data in files:
            if stop.is_set():
                return
            shared_intake.upload(fresh_site, data)

    uploader = threading.Thread(target=keep_uploading)
    uploader.start()
    seen: list[int] = []
    stamps: list[tuple[str, int]] = []
    cursor = None
    try:
        while True:
            params: dict[str, Any] = {"site": fresh_site.name, "limit": 37}
            if cursor:
                params["cursor"] = cursor
            page = api.get("/api/uploads", params=params).json()
            seen.extend(r["id"] for r in page["items"])
            stamps.extend((r["received_at"], r["id"]) for r in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
    finally:
        stop.set()
        uploader.join()
    assert len(seen) == len(set(seen))
    assert set(existing) <= set(seen)
    parsed = [(datetime.fromisoformat(t), i) for t, i in stamps]
    assert parsed == sorted(parsed, reverse=True)


@pytest.mark.parametrize("cursor", ["not-a-cursor", "eyJ0IjoxLCJpIjoyfQ", "e30", "%%%"])
def test_a_tampered_cursor_is_400(api: httpx.Client, cursor: str) -> None:
    response = api.get("/api/uploads", params={"cursor": cursor})
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_cursor"


def test_csv_has_a_header_and_the_filtered_rows(
    shared_intake: IntakeProcess, fresh_site: Site, api: httpx.Client
) -> None:
    files = make_study(1, 3)
    _upload_all(shared_intake, fresh_site, files)
    assert shared_intake.upload(fresh_site, GARBAGE).status_code == 400
    every = api.get("/api/uploads.csv", params={"site": fresh_site.name})
    assert len(list(csv.DictReader(io.StringIO(every.text)))) == 4  # the refusal too
    response = api.get(
        "/api/uploads.csv", params={"site": fresh_site.name, "state": ["queued", "forwarded"]}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == 3
    assert {r["site"] for r in rows} == {fresh_site.name}
    assert all(r["sop_instance_uid"] and r["reason"] == "" for r in rows)
    assert response.text.splitlines()[0].startswith("id,receipt,site,remote_addr,received_at")


def test_csv_walks_past_one_batch(
    shared_intake: IntakeProcess, fresh_site: Site, api: httpx.Client
) -> None:
    """More rows than one fetch still come out once each, newest first."""
    start = datetime.now(UTC) - timedelta(days=1)
    ids = _insert(
        shared_intake,
        fresh_site.name,
        [
            {"received_at": start + timedelta(seconds=i // 2), "state": "queued"}
            for i in range(4500)
        ],
    )
    response = api.get("/api/uploads.csv", params={"site": fresh_site.name})
    got = [int(r["id"]) for r in csv.DictReader(io.StringIO(response.text))]
    assert sorted(got) == ids
    assert got == sorted(got, reverse=True)


def _study(api: httpx.Client, site: Site, study_uid: str) -> dict[str, Any]:
    items = _all(api, "/api/studies", site=site.name, study_uid=study_uid)
    assert len(items) == 1
    return items[0]


def test_studies_count_instances_series_and_states(
    shared_intake: IntakeProcess, fresh_site: Site, api: httpx.Client
) -> None:
    """Two studies of several series; a duplicate and refusals are counted apart."""
    first, second = make_study(3, 2), make_study(2, 3)
    answers = _upload_all(shared_intake, fresh_site, first + second)
    assert (
        shared_intake.upload(fresh_site, first[0]).json()["Status"] == "AlreadyStored"
    )  # a duplicate
    assert shared_intake.upload(fresh_site, GARBAGE).status_code == 400  # no Study UID: no study
    study_uid = _all(api, "/api/uploads", orthanc_id=answers[0]["ParentStudy"])[0][
        "study_instance_uid"
    ]
    # A refusal that knew its study (the intake records none today: see app/intake/pipeline.py).
    _insert(
        shared_intake,
        fresh_site.name,
        [
            {
                "received_at": datetime.now(UTC),
                "state": "rejected",
                "reason": "content_not_allowed",
                "study_instance_uid": study_uid,
                "sop_instance_uid": "1.2.3.4",
                "series_instance_uid": "1.2.3",
            }
        ],
    )
    listed = _all(api, "/api/studies", site=fresh_site.name)
    assert len(listed) == 2
    study = _study(api, fresh_site, study_uid)
    assert study["instances"] == 6
    assert study["series"] == 3
    assert study["states"]["duplicate"] == 1
    assert study["states"]["rejected"] == 1
    assert study["states"]["queued"] + study["states"]["forwarded"] == 6
    assert study["orthanc_study_id"] == answers[0]["ParentStudy"]
    assert study["bytes"] == sum(len(f) for f in first) + len(first[0]) + 1000
    assert study["quiet"] is False
    other = next(s for s in listed if s["study_instance_uid"] != study_uid)
    assert (other["instances"], other["series"]) == (6, 2)
    assert listed[0]["last_received"] >= listed[1]["last_received"]


def test_a_study_turns_quiet_after_the_quiet_time(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    """`quiet` compares the newest instance with now; seen from an hour later it is quiet."""
    _upload_all(shared_intake, fresh_site, make_study(1, 2))
    engine = make_engine(shared_intake.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            site_id, study_uid = session.execute(
                select(Upload.site_id, Upload.study_instance_uid)
                .join(SiteRow, SiteRow.id == Upload.site_id)
                .where(SiteRow.name == fresh_site.name)
                .limit(1)
            ).one()
            assert study_uid is not None
            key = (site_id, study_uid)
            assert studies.aggregate(session, [key], 300)[key].quiet is False
            later = datetime.now(UTC) + timedelta(hours=1)
            assert studies.aggregate(session, [key], 300, now=later)[key].quiet is True
    finally:
        engine.dispose()


def test_studies_pages_list_every_study_once(
    shared_intake: IntakeProcess, fresh_site: Site, api: httpx.Client
) -> None:
    """Studies interleaved in time come out once each, by their latest instance."""
    start = datetime.now(UTC) - timedelta(hours=5)
    rows = []
    for n in range(3000):  # 12 studies, interleaved: more rows than one scan batch
        study = n % 12
        rows.append(
            {
                "received_at": start + timedelta(seconds=n),
                "state": "forwarded",
                "study_instance_uid": f"1.2.3.{study}",
                "series_instance_uid": f"1.2.3.{study}.1",
                "sop_instance_uid": f"1.2.3.{study}.1.{n}",
            }
        )
    _insert(shared_intake, fresh_site.name, rows)
    seen: list[str] = []
    cursor = None
    while True:
        page = api.get(
            "/api/studies",
            params={"site": fresh_site.name, "limit": 5, **({"cursor": cursor} if cursor else {})},
        )
        assert page.status_code == 200, page.text
        seen.extend(s["study_instance_uid"] for s in page.json()["items"])
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"1.2.3.{s}" for s in (11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)]
    first = _study(api, fresh_site, "1.2.3.0")
    assert first["instances"] == 250


def test_one_study_lists_its_series_and_uploads(
    shared_intake: IntakeProcess, fresh_site: Site, api: httpx.Client
) -> None:
    files = make_study(2, 3)
    answers = _upload_all(shared_intake, fresh_site, files)
    study_uid = _all(api, "/api/uploads", orthanc_id=answers[0]["ParentStudy"])[0][
        "study_instance_uid"
    ]
    study = api.get(f"/api/studies/{fresh_site.name}/{study_uid}").json()
    assert study["instances"] == 6
    assert [s["instances"] for s in study["series_list"]] == [3, 3]
    assert len(study["uploads"]["items"]) == 6
    assert api.get(f"/api/studies/{fresh_site.name}/1.2.3.999").status_code == 404
    assert api.get(f"/api/studies/no-such-site/{study_uid}").status_code == 404


def test_daily_stats_count_uploads_bytes_rejections_and_latency(
    shared_intake: IntakeProcess, fresh_site: Site, api: httpx.Client
) -> None:
    files = make_study(1, 3)
    _upload_all(shared_intake, fresh_site, files)
    assert shared_intake.upload(fresh_site, GARBAGE).status_code == 400
    wait_until(lambda: len(_all(api, "/api/uploads", site=fresh_site.name, state="forwarded")) == 3)
    today = datetime.now(UTC).date()
    figures = api.get("/api/stats/daily", params={"site": fresh_site.name}).json()
    assert [s["site"] for s in figures] == [fresh_site.name]
    assert figures[0]["queue_depth"] == 0
    day = figures[0]["days"][-1]
    assert day["day"] == today.isoformat()
    assert day["uploads"] == 4
    assert day["bytes"] == sum(len(f) for f in files) + len(GARBAGE)
    assert (day["accepted"], day["rejected"]) == (3, 1)
    assert day["rejections"] == {"not_dicom": 1}
    assert day["forwarded"] == 3
    assert 0 <= day["latency_ms"]["p50"] <= day["latency_ms"]["p99"] < 60_000


def test_daily_stats_percentiles_and_utc_days(
    shared_intake: IntakeProcess, fresh_site: Site, api: httpx.Client
) -> None:
    """Latencies of 100..1000 ms give p50 550, p90 910, p99 991; a day ends at UTC midnight."""
    day = datetime(2026, 3, 10, tzinfo=UTC)
    late = day + timedelta(hours=23, minutes=59, seconds=59)
    rows = [
        {
            "received_at": late,
            "forwarded_at": late + timedelta(milliseconds=100 * n),
            "state": "forwarded",
        }
        for n in range(1, 11)
    ]
    rows.append(
        {"received_at": late + timedelta(seconds=2), "forwarded_at": None, "state": "queued"}
    )
    _insert(shared_intake, fresh_site.name, rows)
    figures = api.get(
        "/api/stats/daily",
        params={"site": fresh_site.name, "from": "2026-03-10", "to": "2026-03-11"},
    ).json()
    days = figures[0]["days"]
    assert [d["day"] for d in days] == ["2026-03-10", "2026-03-11"]
    assert days[0]["uploads"] == 10
    assert days[0]["latency_ms"] == {"p50": 550.0, "p90": 910.0, "p99": 991.0}
    assert days[1]["latency_ms"] is None
    assert figures[0]["queue_depth"] == 1


def test_daily_stats_refuse_too_long_a_range(api: httpx.Client) -> None:
    response = api.get("/api/stats/daily", params={"from": "2026-01-01", "to": "2026-12-31"})
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"
