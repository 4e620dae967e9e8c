"""The queue and quarantine admin API: listing, retry, discard, conflicts, on both backends.

A real quarantine comes from a real Orthanc refusing the intake's credentials; the
state-machine tests put rows and spool files in place directly, on an intake whose
Orthanc never answers and whose retries wait an hour, so nothing moves under them.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Site, State, Upload, utcnow
from app.db.sessions import make_engine, make_sessionmaker
from tests.conftest import ModuleIntakes
from tests.support.intake import Admin, IntakeProcess, wait_until
from tests.support.intake import Site as SiteCredentials
from tests.support.orthanc import OrthancProcess, refusing_uploads
from tests.support.studies import make_study

STUDY = "1.2.826.0.1.3680043.8.498.1"
OTHER_STUDY = "1.2.826.0.1.3680043.8.498.2"


@dataclass
class World:
    """An offline intake, an admin, two sites of this test's own (``a``, ``b``), and
    direct access to the database and spool."""

    intake: IntakeProcess
    admin: Admin
    sessions: sessionmaker[Session]
    a: str
    b: str

    def client(self) -> httpx.Client:
        return self.intake.admin_client(self.admin)

    def insert(
        self,
        site: str,
        state: State,
        reason: str | None = None,
        *,
        study_uid: str = STUDY,
        with_file: bool = True,
        due_in: timedelta | None = None,
        leased_for: timedelta | None = None,
        attempts: int = 0,
    ) -> Upload:
        receipt = uuid.uuid4().hex
        folder = "quarantine" if state == State.QUARANTINED else "queue"
        if with_file:
            (self.intake.spool / folder / f"{receipt}.dcm").write_bytes(b"DICM test bytes")
        now = utcnow()
        with self.sessions() as session:
            site_id = session.scalar(select(Site.id).where(Site.name == site))
            row = Upload(
                receipt=receipt,
                site_id=site_id,
                byte_size=15,
                sha256=hashlib.sha256(receipt.encode()).hexdigest(),
                sop_instance_uid=f"1.2.3.{uuid.uuid4().int % 10**12}",
                study_instance_uid=study_uid,
                state=state,
                reason=reason,
                detail=f"test row: {reason}",
                attempts=attempts,
                failed_answers=attempts,
                next_attempt_at=now + due_in if due_in is not None else None,
                lease_owner="elsewhere/1" if leased_for else None,
                lease_until=now + leased_for if leased_for else None,
                spool_name=f"{receipt}.dcm",
            )
            session.add(row)
            session.commit()
        return row

    def row(self, upload_id: int) -> Upload:
        with self.sessions() as session:
            return session.get_one(Upload, upload_id)

    def file(self, folder: str, row: Upload) -> Path:
        return self.intake.spool / folder / f"{row.receipt}.dcm"


@contextmanager
def _database(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def offline(
    module_intakes: ModuleIntakes,
) -> Iterator[tuple[IntakeProcess, Admin, sessionmaker[Session]]]:
    """One offline intake per backend for the module: its Orthanc never answers and its
    retries wait an hour, so nothing moves under the rows a test puts in place."""
    intake = module_intakes(
        None, forward_retry_base_seconds="3600", forward_retry_max_seconds="3600"
    )
    admin = intake.add_admin()
    with _database(intake.database_url) as sessions:
        yield intake, admin, sessions


@pytest.fixture
def world(offline: tuple[IntakeProcess, Admin, sessionmaker[Session]]) -> World:
    """Two new sites on the module's offline intake: a test sees only its own rows."""
    intake, admin, sessions = offline
    tag = uuid.uuid4().hex[:10]
    a, b = intake.add_site(f"a-{tag}").name, intake.add_site(f"b-{tag}").name
    return World(intake, admin, sessions, a, b)


def _retry(world: World, row: Upload) -> httpx.Response:
    with world.client() as client:
        return client.post(f"/api/uploads/{row.id}/retry")


def _discard(world: World, row: Upload, reason: Any = "sent twice by mistake") -> httpx.Response:
    with world.client() as client:
        return client.post(f"/api/uploads/{row.id}/discard", json={"reason": reason})


def _state(sessions: sessionmaker[Session], receipt: str) -> str | None:
    with sessions() as session:
        return session.scalar(select(Upload.state).where(Upload.receipt == receipt))


def _before(moment: str, limit: datetime) -> bool:
    return datetime.fromisoformat(moment) <= limit


# --- access -------------------------------------------------------------------------------


def test_queue_routes_need_an_admin(world: World) -> None:
    """Every queue route answers 401 without credentials."""
    calls = [
        ("GET", "/api/queue", None),
        ("GET", "/api/conflicts", None),
        ("GET", "/api/uploads/1/file", None),
        ("POST", "/api/uploads/1/retry", None),
        ("POST", "/api/uploads/1/discard", {"reason": "x"}),
        ("POST", "/api/studies/retry", {"site": world.a, "study_uid": STUDY}),
        ("POST", f"/api/sites/{world.a}/retry", None),
    ]
    with world.intake.admin_client() as anonymous:
        for method, path, body in calls:
            response = anonymous.request(method, path, json=body)
            assert response.status_code == 401, path
            assert set(response.json()) == {"error", "detail"}


# --- a real refusal, fixed and retried ------------------------------------------------------


def test_orthanc_refusal_is_quarantined_and_retry_delivers_it(
    make_intake: Callable[..., IntakeProcess],
    own_orthanc: OrthancProcess,
    database_url: str,
    tmp_path: Path,
) -> None:
    """An Orthanc that refuses uploads (a Lua filter: 403) quarantines them; once it takes
    them again, an admin's retry delivers."""
    own_orthanc.extra_config["LuaScripts"] = [str(refusing_uploads(tmp_path))]
    own_orthanc.restart()
    refused = make_intake(own_orthanc)
    site = refused.add_site("hospital-a")
    admin = refused.add_admin()
    answer = refused.upload(site, make_study(1, 1)[0])
    assert answer.status_code == 200
    receipt = answer.json()["IntakeReceipt"]
    quarantined = refused.spool / "quarantine" / f"{receipt}.dcm"
    with refused.admin_client(admin) as client:
        page = wait_until(
            lambda: client.get("/api/queue", params={"state": "quarantined"}).json()["items"]
        )
    assert page[0]["reason"] == "orthanc_refused"
    assert "403" in page[0]["detail"]
    assert page[0]["has_file"] is True
    assert quarantined.is_file()
    refused.stop()
    del own_orthanc.extra_config["LuaScripts"]
    own_orthanc.restart()

    fixed = IntakeProcess(refused.workdir, database_url, orthanc=own_orthanc)
    with fixed, fixed.admin_client(admin) as client:
        retried = client.post(f"/api/uploads/{page[0]['id']}/retry")
        assert retried.status_code == 200
        assert retried.json()["state"] == "queued"
        assert retried.json()["attempts"] == 0
        assert "retried by admin 'admin'" in retried.json()["detail"]
        assert not quarantined.exists()
        wait_until(own_orthanc.instances)
        with _database(database_url) as sessions:
            # A fresh session per poll: on SQLite an open one holds the write lock.
            wait_until(lambda: _state(sessions, receipt) == State.FORWARDED)
        # The forwarder removes the file just after recording the delivery.
        wait_until(lambda: not (refused.spool / "queue" / f"{receipt}.dcm").exists())


# --- listing --------------------------------------------------------------------------------


def test_queue_lists_oldest_first_and_pages_without_gaps(world: World) -> None:
    """Queued rows come oldest first, page by page, each exactly once."""
    rows = [world.insert(world.a, State.QUEUED, due_in=timedelta(hours=1)) for _ in range(5)]
    seen: list[int] = []
    cursor: int | None = None
    with world.client() as client:
        while True:
            params: dict[str, Any] = {"state": "queued", "site": world.a, "limit": 2}
            if cursor is not None:
                params["cursor"] = cursor
            page = client.get("/api/queue", params=params).json()
            seen += [item["id"] for item in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
    assert seen == [r.id for r in rows]


def test_quarantine_lists_newest_first_with_filters(world: World) -> None:
    """Quarantined rows come newest first, filtered by site and reason."""
    old = world.insert(world.a, State.QUARANTINED, "gave_up", attempts=20)
    world.insert(world.a, State.QUARANTINED, "orthanc_refused")
    new = world.insert(world.a, State.QUARANTINED, "gave_up")
    world.insert(world.b, State.QUARANTINED, "gave_up")
    with world.client() as client:
        page = client.get(
            "/api/queue", params={"state": "quarantined", "site": world.a, "reason": "gave_up"}
        ).json()
    assert [i["id"] for i in page["items"]] == [new.id, old.id]
    assert page["items"][1]["attempts"] == 20
    assert page["items"][1]["site"] == world.a


def test_queue_of_an_unknown_site_is_404(world: World) -> None:
    with world.client() as client:
        response = client.get("/api/queue", params={"site": "nowhere"})
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


# --- retry ----------------------------------------------------------------------------------


def test_retry_moves_a_quarantined_file_back_to_the_queue(world: World) -> None:
    """Retry: queued, counters reset, due now, the admin recorded, the file in queue/."""
    row = world.insert(world.a, State.QUARANTINED, "gave_up", attempts=20)
    response = _retry(world, row)
    assert response.status_code == 200
    body = response.json()
    assert body["state"] == "queued"
    assert (body["attempts"], body["failed_answers"]) == (0, 0)
    assert _before(body["next_attempt_at"], utcnow())
    assert body["detail"] == "retried by admin 'admin' (was quarantined: gave_up)"
    assert world.file("queue", row).is_file()
    assert not world.file("quarantine", row).exists()


def test_retry_makes_a_queued_row_due_now(world: World) -> None:
    """A queued row in back-off becomes due at once; its file stays in queue/."""
    row = world.insert(world.a, State.QUEUED, "orthanc_unavailable", due_in=timedelta(hours=1))
    response = _retry(world, row)
    assert response.status_code == 200
    assert response.json()["state"] == "queued"
    assert _before(response.json()["next_attempt_at"], utcnow())
    assert "made due now by admin 'admin'" in response.json()["detail"]
    assert world.file("queue", row).is_file()


def test_retry_without_the_spool_file_is_409_nothing_to_retry(world: World) -> None:
    row = world.insert(world.a, State.QUARANTINED, "spool_file_missing", with_file=False)
    response = _retry(world, row)
    assert response.status_code == 409
    assert response.json()["error"] == "nothing_to_retry"
    assert "nothing to retry" in response.json()["detail"]
    assert world.row(row.id).state == State.QUARANTINED


def test_retry_of_a_forwarded_upload_is_409(world: World) -> None:
    row = world.insert(world.a, State.FORWARDED, with_file=False)
    response = _retry(world, row)
    assert response.status_code == 409
    assert response.json()["error"] == "wrong_state"
    assert "forwarded" in response.json()["detail"]


def test_retry_of_a_row_being_forwarded_is_409(world: World) -> None:
    row = world.insert(
        world.a, State.QUEUED, due_in=timedelta(hours=1), leased_for=timedelta(minutes=5)
    )
    response = _retry(world, row)
    assert response.status_code == 409
    assert response.json()["error"] == "being_forwarded"
    assert "being forwarded" in response.json()["detail"]


def test_retry_of_an_unknown_upload_is_404(world: World) -> None:
    with world.client() as client:
        assert client.post("/api/uploads/999999/retry").status_code == 404


def test_retry_a_study_counts_what_it_did(world: World) -> None:
    """A study retry requeues its quarantined rows, makes its queued ones due, skips conflicts."""
    requeue = [world.insert(world.a, State.QUARANTINED, "gave_up") for _ in range(2)]
    due = world.insert(world.a, State.QUEUED, due_in=timedelta(hours=1))
    conflict = world.insert(world.a, State.QUARANTINED, "conflict")
    elsewhere = world.insert(world.a, State.QUARANTINED, "gave_up", study_uid=OTHER_STUDY)
    with world.client() as client:
        response = client.post("/api/studies/retry", json={"site": world.a, "study_uid": STUDY})
    assert response.status_code == 200
    assert response.json() == {"retried": 3, "requeued": 2, "made_due": 1, "skipped": 1}
    assert all(world.row(r.id).state == State.QUEUED for r in [*requeue, due])
    assert all(world.file("queue", r).is_file() for r in requeue)
    assert world.row(conflict.id).state == State.QUARANTINED
    assert world.row(elsewhere.id).state == State.QUARANTINED


def test_retry_a_site_leaves_other_sites_alone(world: World) -> None:
    """A site retry covers all its studies and no other site's rows."""
    mine = [
        world.insert(world.b, State.QUARANTINED, "orthanc_refused"),
        world.insert(world.b, State.QUARANTINED, "gave_up", study_uid=OTHER_STUDY),
    ]
    lost = world.insert(world.b, State.QUARANTINED, "spool_file_missing", with_file=False)
    other = world.insert(world.a, State.QUARANTINED, "gave_up")
    with world.client() as client:
        response = client.post(f"/api/sites/{world.b}/retry")
    assert response.status_code == 200
    assert response.json() == {"retried": 2, "requeued": 2, "made_due": 0, "skipped": 1}
    assert all(world.row(r.id).state == State.QUEUED for r in mine)
    assert world.row(lost.id).state == State.QUARANTINED
    assert world.row(other.id).state == State.QUARANTINED
    assert world.file("quarantine", other).is_file()


def test_retry_of_an_unknown_site_is_404(world: World) -> None:
    with world.client() as client:
        assert client.post("/api/sites/nowhere/retry").status_code == 404


# --- discard --------------------------------------------------------------------------------


def test_discard_records_the_admin_and_then_removes_the_file(world: World) -> None:
    row = world.insert(world.a, State.QUARANTINED, "orthanc_refused")
    response = _discard(world, row)
    assert response.status_code == 200
    stored = world.row(row.id)
    assert stored.state == State.DISCARDED
    assert stored.reason == "discarded"
    assert stored.discarded_at is not None
    assert stored.detail == "discarded by admin 'admin': sent twice by mistake"
    assert response.json()["has_file"] is False
    assert not world.file("quarantine", row).exists()


def test_discard_of_a_queued_row_removes_its_queue_file(world: World) -> None:
    row = world.insert(world.a, State.QUEUED, due_in=timedelta(hours=1))
    assert _discard(world, row).status_code == 200
    assert world.row(row.id).state == State.DISCARDED
    assert not world.file("queue", row).exists()


def test_discarding_twice_is_409(world: World) -> None:
    row = world.insert(world.a, State.QUARANTINED, "gave_up")
    assert _discard(world, row).status_code == 200
    response = _discard(world, row)
    assert response.status_code == 409
    assert response.json()["error"] == "wrong_state"
    assert "discarded" in response.json()["detail"]


@pytest.mark.parametrize("reason", ["", "   ", None])
def test_discard_needs_a_reason(world: World, reason: str | None) -> None:
    row = world.insert(world.a, State.QUARANTINED, "gave_up")
    response = _discard(world, row, reason)
    assert response.status_code in (400, 422)
    assert world.row(row.id).state == State.QUARANTINED
    assert world.file("quarantine", row).is_file()


def test_discard_of_a_row_being_forwarded_is_409(world: World) -> None:
    row = world.insert(
        world.a, State.QUEUED, due_in=timedelta(hours=1), leased_for=timedelta(minutes=5)
    )
    response = _discard(world, row)
    assert response.status_code == 409
    assert response.json()["error"] == "being_forwarded"
    assert "being forwarded, try again" in response.json()["detail"]
    assert world.file("queue", row).is_file()


# --- conflicts ------------------------------------------------------------------------------


@dataclass
class Collision:
    site: str
    first_id: int
    first_sha256: str
    second_id: int
    second_receipt: str
    stored: bytes  # the second upload as the intake keeps it


@pytest.fixture
def collision(shared_intake: IntakeProcess, fresh_site: SiteCredentials) -> Collision:
    """The same SOP instance uploaded twice with different pixels (and a text preamble), by
    a site of this test's own on the module's shared intake."""
    first = make_study(1, 1)[0]
    second = b"not an executable, just notes".ljust(128, b" ") + first[128:-2] + b"\x5a\xa5"
    queued = shared_intake.upload(fresh_site, first).json()
    assert queued["IntakeState"] == "queued"
    answer = shared_intake.upload(fresh_site, second).json()
    assert answer["IntakeState"] == "quarantined"
    stored = bytes(128) + second[128:]
    receipts = {queued["IntakeReceipt"], answer["IntakeReceipt"]}
    with _database(shared_intake.database_url) as sessions, sessions() as session:
        # This site's two uploads, found by their receipts: the database is the module's.
        rows = session.execute(
            select(Upload.sha256, Upload.id)
            .join(Site, Upload.site_id == Site.id)
            .where(Site.name == fresh_site.name, Upload.receipt.in_(receipts))
        ).all()
    ids = dict(rows)
    assert len(rows) == len(ids) == 2
    first_sha = hashlib.sha256(first).hexdigest()
    second_id = ids[hashlib.sha256(stored).hexdigest()]
    return Collision(
        fresh_site.name, ids[first_sha], first_sha, second_id, answer["IntakeReceipt"], stored
    )


def test_conflict_is_listed_with_the_upload_it_collides_with(
    shared_intake: IntakeProcess, fresh_admin: Admin, collision: Collision
) -> None:
    with shared_intake.admin_client(fresh_admin) as client:
        items = client.get("/api/conflicts", params={"site": collision.site}).json()["items"]
    assert [i["upload"]["id"] for i in items] == [collision.second_id]
    assert items[0]["upload"]["site"] == collision.site
    other = items[0]["conflicts_with"]
    assert other["id"] == collision.first_id
    assert other["sha256"] == collision.first_sha256
    assert other["state"] in ("queued", "forwarded")
    assert items[0]["upload"]["reason"] == "conflict"


def test_conflict_file_is_the_uploaded_bytes_with_a_zeroed_preamble(
    shared_intake: IntakeProcess, fresh_admin: Admin, collision: Collision
) -> None:
    with shared_intake.admin_client(fresh_admin) as client:
        response = client.get(f"/api/uploads/{collision.second_id}/file")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom"
    assert response.content == collision.stored


def test_retry_of_a_conflict_is_409(
    shared_intake: IntakeProcess, fresh_admin: Admin, collision: Collision
) -> None:
    with shared_intake.admin_client(fresh_admin) as client:
        response = client.post(f"/api/uploads/{collision.second_id}/retry")
    assert response.status_code == 409
    assert response.json()["error"] == "conflict_not_retryable"
    assert "Orthanc" in response.json()["detail"]
    assert "ignore" in response.json()["detail"]


def test_discard_resolves_a_conflict(
    shared_intake: IntakeProcess, fresh_admin: Admin, collision: Collision
) -> None:
    """Discarding keeps Orthanc's copy: the conflict leaves the list and its file goes."""
    quarantine = shared_intake.spool / "quarantine"
    kept = quarantine / f"{collision.second_receipt}.dcm"
    before = set(quarantine.iterdir())  # other tests' conflicts stay: the intake is shared
    assert kept in before
    with shared_intake.admin_client(fresh_admin) as client:
        discarded = client.post(
            f"/api/uploads/{collision.second_id}/discard", json={"reason": "keep Orthanc's copy"}
        )
        assert discarded.status_code == 200
        listed = client.get("/api/conflicts", params={"site": collision.site})
        assert listed.json()["items"] == []
        assert client.get(f"/api/uploads/{collision.second_id}/file").status_code == 409
    # Its file is gone, and no other.
    assert set(quarantine.iterdir()) == before - {kept}
