"""The forwarder's failure paths, against a fake private Orthanc at the httpx transport.

A real Orthanc cannot produce 5xx answers, hangs or "AlreadyStored with other bytes"
on demand; everything else here is real: migrations, SQLite and PostgreSQL, the spool.
The forwarder is driven one claim and one delivery at a time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import inspect
import os
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.access import sites
from app.db import migrations
from app.db.models import Site, State, Upload, utcnow
from app.db.sessions import make_engine, make_sessionmaker
from app.forwarding.forwarder import Forwarder
from app.forwarding.leases import Claim
from app.forwarding.orthanc import OrthancClient
from app.intake.spool import QUARANTINE, QUEUE, TMP, Spool
from app.settings import Settings
from tests.support.intake import wait_until

USERNAME = "u"
# Distinctive, so that finding it in a row's detail means it leaked.
PASSWORD = "orthanc-secret-pw"
AUTHORIZATION = "Basic " + base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
INSTANCE_ID = "0a1b2c3d-4e5f6a7b-8c9d0e1f-2a3b4c5d-6e7f8a9b"
RETRY_BASE_SECONDS = 60.0
# Over one read chunk (1 MiB), so the upload is streamed in several pieces.
DATA = bytes(range(256)) * 6000

Answer = httpx.Response | Awaitable[httpx.Response]


def _md5(data: bytes) -> str:
    """The checksum Orthanc keeps for an attachment (StoreMD5ForAttachments)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _stored(status: str = "Success") -> Callable[[httpx.Request], Answer]:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"ID": INSTANCE_ID, "Status": status, "Path": "/x"})

    return answer


def _status(code: int, body: Any = None) -> Callable[[httpx.Request], Answer]:
    def answer(request: httpx.Request) -> httpx.Response:
        if body is None:
            return httpx.Response(code)
        return httpx.Response(code, json=body)

    return answer


def _already_stored_with_md5(md5: str) -> Callable[[httpx.Request], Answer]:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            assert request.url.path == f"/instances/{INSTANCE_ID}/attachments/dicom/md5"
            return httpx.Response(200, text=md5)
        return httpx.Response(200, json={"ID": INSTANCE_ID, "Status": "AlreadyStored"})

    return answer


class FakeOrthanc:
    """The private Orthanc at the transport: records each request, answers with ``handler``."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.handler: Callable[[httpx.Request], Answer] = _stored()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.handler(request)
        if inspect.isawaitable(answer):
            return await answer
        return answer


@dataclass
class World:
    """One database, one spool, one site and the fake Orthanc, for one test."""

    database_url: str
    spool: Spool
    sessions: sessionmaker[Session]
    site_id: int
    orthanc: FakeOrthanc
    clients: list[OrthancClient] = field(default_factory=list)

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": self.database_url,
            "spool_dir": self.spool.root,
            "orthanc_url": "http://orthanc.test",
            "orthanc_username": USERNAME,
            "orthanc_password": PASSWORD,
            "orthanc_timeout_seconds": 5.0,
            "forward_concurrency": 1,
            "forward_retry_base_seconds": RETRY_BASE_SECONDS,
            "forward_retry_max_seconds": 3600.0,
            "forward_max_attempts": 3,
            "forward_lease_seconds": 300.0,
            "orphan_grace_seconds": 600.0,
        }
        values.update(overrides)
        return Settings(**values)

    def forwarder(self, owner: str | None = None, **overrides: Any) -> Forwarder:
        settings = self.settings(**overrides)
        client = OrthancClient(settings, transport=httpx.MockTransport(self.orthanc))
        self.clients.append(client)
        forwarder = Forwarder(settings, self.sessions, self.spool, client)
        if owner is not None:
            forwarder.owner = owner
        return forwarder

    def queue(self, data: bytes = DATA, *, with_file: bool = True) -> Upload:
        """Insert a due queued upload, with its file in ``queue/`` unless told otherwise."""
        receipt = uuid.uuid4().hex
        name = f"{receipt}.dcm"
        if with_file:
            self.spool.path(QUEUE, name).write_bytes(data)
        with self.sessions() as session:
            row = Upload(
                receipt=receipt,
                site_id=self.site_id,
                state=State.QUEUED,
                next_attempt_at=utcnow(),
                spool_name=name,
                sha256=hashlib.sha256(data).hexdigest(),
                orthanc_instance_id=INSTANCE_ID,
                attempts=0,
                failed_answers=0,
                byte_size=len(data),
            )
            session.add(row)
            session.commit()
        return row

    def row(self, upload_id: int) -> Upload:
        with self.sessions() as session:
            return session.get_one(Upload, upload_id)

    def set(self, upload_id: int, **values: Any) -> None:
        with self.sessions() as session:
            session.execute(update(Upload).where(Upload.id == upload_id).values(**values))
            session.commit()


@pytest.fixture
def world(database_url: str, tmp_path: Path) -> Iterator[World]:
    migrations.upgrade(database_url)
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    with sessions() as session:
        sites.add(session, "site-a")
        site_id = session.scalars(select(Site.id).where(Site.name == "site-a")).one()
    world = World(database_url, spool, sessions, site_id, FakeOrthanc())
    try:
        yield world
    finally:
        for client in world.clients:
            asyncio.run(client.aclose())
        engine.dispose()


def _claim_one(forwarder: Forwarder) -> Claim | None:
    claims = forwarder._claim()
    assert len(claims) <= 1
    return claims[0] if claims else None


def _step(forwarder: Forwarder) -> None:
    """Claim the next due row and make one delivery attempt."""
    claim = _claim_one(forwarder)
    assert claim is not None
    asyncio.run(forwarder.deliver(claim))


def _in(world: World, folder: str, upload: Upload) -> bool:
    return world.spool.path(folder, upload.spool_name or "").exists()


# --- success ---------------------------------------------------------------------------


def test_success_marks_the_row_forwarded(world: World) -> None:
    """A 200 "Success" answer marks the row forwarded, with its time and Orthanc's status."""
    upload = world.queue()
    _step(world.forwarder())
    row = world.row(upload.id)
    assert row.state == State.FORWARDED
    assert row.forwarded_at is not None
    assert row.orthanc_status == "Success"
    assert row.orthanc_instance_id == INSTANCE_ID
    assert row.attempts == 1
    assert (row.lease_owner, row.lease_until, row.next_attempt_at) == (None, None, None)
    assert (row.reason, row.detail) == (None, None)


def test_success_removes_the_spool_file(world: World) -> None:
    """Once Orthanc holds the instance, its file leaves ``queue/`` and is not kept elsewhere."""
    upload = world.queue()
    _step(world.forwarder())
    assert not _in(world, QUEUE, upload)
    assert not _in(world, QUARANTINE, upload)


def test_store_request_sends_the_file_with_credentials(world: World) -> None:
    """The upload is one POST /instances with Basic auth, exact Content-Length and exact bytes."""
    world.queue()
    _step(world.forwarder())
    [request] = world.orthanc.requests
    assert request.method == "POST"
    assert request.url.path == "/instances"
    assert request.headers["Authorization"] == AUTHORIZATION
    assert request.headers["Content-Length"] == str(len(DATA))
    assert request.content == DATA


# --- retried failures ------------------------------------------------------------------


def test_503_keeps_the_row_queued(world: World) -> None:
    """A 503 counts one error answer and leaves the row queued, unleased, for a later try."""
    world.orthanc.handler = _status(503)
    upload = world.queue()
    _step(world.forwarder())
    row = world.row(upload.id)
    assert row.state == State.QUEUED
    assert (row.attempts, row.failed_answers) == (1, 1)
    assert row.reason == "orthanc_unavailable"
    assert (row.lease_owner, row.lease_until) == (None, None)


def test_503_backs_off_by_at_most_the_base_delay(world: World) -> None:
    """After a first failure the next try is in the future, no more than the base delay away."""
    world.orthanc.handler = _status(503)
    upload = world.queue()
    before = utcnow()
    _step(world.forwarder())
    after = utcnow()
    next_attempt_at = world.row(upload.id).next_attempt_at
    assert next_attempt_at is not None
    assert before < next_attempt_at <= after + timedelta(seconds=RETRY_BASE_SECONDS)


def test_503_keeps_the_spool_file_queued(world: World) -> None:
    """A retried upload keeps its file in ``queue/``."""
    world.orthanc.handler = _status(503)
    upload = world.queue()
    _step(world.forwarder())
    assert _in(world, QUEUE, upload)


def test_retried_row_is_not_claimed_before_it_is_due(world: World) -> None:
    """The back-off holds: a row that just failed is not claimable again at once."""
    world.orthanc.handler = _status(503)
    world.queue()
    forwarder = world.forwarder()
    _step(forwarder)
    assert _claim_one(forwarder) is None


def _refuse_connection(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("refused", request=request)


def _time_out(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("no answer", request=request)


def test_connection_refused_does_not_count_as_an_error_answer(world: World) -> None:
    """An unreachable Orthanc is retried without counting toward giving up."""
    world.orthanc.handler = _refuse_connection
    upload = world.queue()
    _step(world.forwarder())
    row = world.row(upload.id)
    assert row.state == State.QUEUED
    assert (row.attempts, row.failed_answers) == (1, 0)
    assert row.reason == "orthanc_unavailable"


def test_timeout_does_not_count_as_an_error_answer(world: World) -> None:
    """An Orthanc that does not answer in time is retried without counting toward giving up."""
    world.orthanc.handler = _time_out
    upload = world.queue()
    _step(world.forwarder())
    row = world.row(upload.id)
    assert row.state == State.QUEUED
    assert (row.attempts, row.failed_answers) == (1, 0)


def test_unreachable_orthanc_is_waited_out_past_the_attempt_limit(world: World) -> None:
    """More unreachable tries than ``forward_max_attempts`` still leave the row queued."""
    world.orthanc.handler = _refuse_connection
    upload = world.queue()
    forwarder = world.forwarder(forward_max_attempts=3)
    for _ in range(5):
        world.set(upload.id, next_attempt_at=utcnow())
        _step(forwarder)
    row = world.row(upload.id)
    assert row.state == State.QUEUED
    assert (row.attempts, row.failed_answers) == (5, 0)
    assert _in(world, QUEUE, upload)


def test_repeated_500s_give_up_into_quarantine(world: World) -> None:
    """After ``forward_max_attempts`` error answers the upload is quarantined as "gave_up"."""
    world.orthanc.handler = _status(500, {"Message": "Internal error"})
    upload = world.queue()
    forwarder = world.forwarder(forward_max_attempts=3)
    states = []
    for _ in range(3):
        world.set(upload.id, next_attempt_at=utcnow())
        _step(forwarder)
        states.append(world.row(upload.id).state)
    row = world.row(upload.id)
    assert states == [State.QUEUED, State.QUEUED, State.QUARANTINED]
    assert row.reason == "gave_up"
    assert row.attempts == 3
    assert _in(world, QUARANTINE, upload)
    assert not _in(world, QUEUE, upload)


def test_failed_md5_lookup_is_retried(world: World) -> None:
    """When the MD5 check after "AlreadyStored" gets a 503, the upload is retried, not judged."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(503)
        return httpx.Response(200, json={"ID": INSTANCE_ID, "Status": "AlreadyStored"})

    world.orthanc.handler = answer
    upload = world.queue()
    _step(world.forwarder())
    row = world.row(upload.id)
    assert row.state == State.QUEUED
    assert (row.attempts, row.failed_answers) == (1, 1)


# --- refusals and conflicts ------------------------------------------------------------


def test_400_quarantines_at_once_with_orthancs_message(world: World) -> None:
    """A 400 quarantines on the first answer as "orthanc_refused", with Orthanc's Message."""
    world.orthanc.handler = _status(
        400, {"Message": "Bad file format", "Details": "Cannot parse an invalid DICOM file"}
    )
    upload = world.queue()
    _step(world.forwarder())
    row = world.row(upload.id)
    assert row.state == State.QUARANTINED
    assert row.reason == "orthanc_refused"
    assert row.detail is not None
    assert "Bad file format" in row.detail
    assert (row.lease_owner, row.lease_until, row.next_attempt_at) == (None, None, None)


def test_400_moves_the_file_to_quarantine(world: World) -> None:
    """A refused upload's file is kept in ``quarantine/`` for an admin."""
    world.orthanc.handler = _status(400, {"Message": "Bad file format"})
    upload = world.queue()
    _step(world.forwarder())
    assert world.spool.path(QUARANTINE, upload.spool_name or "").read_bytes() == DATA
    assert not _in(world, QUEUE, upload)


def test_already_stored_with_the_same_bytes_is_forwarded(world: World) -> None:
    """An "AlreadyStored" answer with Orthanc's MD5 equal to the file's counts as delivered."""
    world.orthanc.handler = _already_stored_with_md5(_md5(DATA))
    upload = world.queue()
    _step(world.forwarder())
    row = world.row(upload.id)
    assert row.state == State.FORWARDED
    assert row.orthanc_status == "AlreadyStored"
    assert not _in(world, QUEUE, upload)


def test_already_stored_with_other_bytes_is_a_conflict(world: World) -> None:
    """An "AlreadyStored" answer with a different MD5 quarantines the upload as "conflict"."""
    world.orthanc.handler = _already_stored_with_md5(_md5(b"other"))
    upload = world.queue()
    _step(world.forwarder())
    row = world.row(upload.id)
    assert row.state == State.QUARANTINED
    assert row.reason == "conflict"
    assert _in(world, QUARANTINE, upload)


def test_already_stored_without_an_md5_is_trusted(world: World) -> None:
    """When Orthanc keeps no MD5 (404 on the attachment), "AlreadyStored" is taken as delivered."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(404, json={"Message": "Unknown resource"})
        return httpx.Response(200, json={"ID": INSTANCE_ID, "Status": "AlreadyStored"})

    world.orthanc.handler = answer
    upload = world.queue()
    _step(world.forwarder())
    assert world.row(upload.id).state == State.FORWARDED


def test_missing_spool_file_quarantines_without_a_request(world: World) -> None:
    """A queued row whose file is gone is quarantined as "spool_file_missing" and not sent."""
    upload = world.queue(with_file=False)
    _step(world.forwarder())
    row = world.row(upload.id)
    assert row.state == State.QUARANTINED
    assert row.reason == "spool_file_missing"
    assert world.orthanc.requests == []


# --- leases ----------------------------------------------------------------------------


def test_claim_takes_a_lease(world: World) -> None:
    """A claim records its owner and a lease ending ``forward_lease_seconds`` from now."""
    upload = world.queue()
    forwarder = world.forwarder(owner="host-a:1", forward_lease_seconds=300.0)
    before = utcnow()
    claim = _claim_one(forwarder)
    row = world.row(upload.id)
    assert claim is not None
    assert claim.id == upload.id
    assert row.lease_owner == claim.lease
    assert claim.lease.startswith("host-a:1/")
    assert row.lease_until is not None
    assert before + timedelta(seconds=299) < row.lease_until <= utcnow() + timedelta(seconds=300)


def test_one_claim_leases_several_due_rows_in_order(world: World) -> None:
    """The claimer asks for as many rows as it has idle senders: one transaction."""
    uploads = [world.queue() for _ in range(3)]
    forwarder = world.forwarder(owner="host-a:1")
    first = forwarder._claim(2)
    assert [c.id for c in first] == [u.id for u in uploads[:2]]
    assert len({c.lease for c in first}) == 1
    assert {world.row(u.id).lease_owner for u in uploads[:2]} == {first[0].lease}
    assert world.row(uploads[2].id).lease_owner is None
    rest = forwarder._claim(5)
    assert [c.id for c in rest] == [uploads[2].id]
    assert rest[0].lease != first[0].lease
    assert forwarder._claim(5) == []


def test_leased_row_is_not_claimed_by_another_worker(world: World) -> None:
    """While its lease lasts, a claimed row is invisible to a second forwarder."""
    world.queue()
    assert _claim_one(world.forwarder(owner="host-a:1")) is not None
    assert _claim_one(world.forwarder(owner="host-b:2")) is None


def test_expired_lease_lets_another_worker_claim(world: World) -> None:
    """Once the lease has passed, a second forwarder claims the row and becomes its owner."""
    upload = world.queue()
    assert _claim_one(world.forwarder(owner="host-a:1")) is not None
    world.set(upload.id, lease_until=utcnow() - timedelta(seconds=1))
    claim = _claim_one(world.forwarder(owner="host-b:2"))
    assert claim is not None
    assert claim.id == upload.id
    assert (world.row(upload.id).lease_owner or "").startswith("host-b:2/")


def test_stale_claim_does_not_undo_a_delivery(world: World) -> None:
    """A worker whose lease expired cannot turn a row another worker forwarded into quarantine."""
    upload = world.queue()
    slow = world.forwarder(owner="host-a:1")
    stale = _claim_one(slow)
    assert stale is not None
    world.set(upload.id, lease_until=utcnow() - timedelta(seconds=1))
    _step(world.forwarder(owner="host-b:2"))
    assert world.row(upload.id).state == State.FORWARDED
    asyncio.run(slow.deliver(stale))
    assert world.row(upload.id).state == State.FORWARDED


def test_already_stored_after_a_concurrent_delivery_does_not_crash(world: World) -> None:
    """A slow delivery overtaken by another worker (lease expired) ends without an exception."""
    upload = world.queue()
    slow = world.forwarder(owner="host-a:1")
    other = world.forwarder(owner="host-b:2")
    md5 = _md5(DATA)

    async def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, text=md5)
        if len(world.orthanc.requests) > 1:  # the other worker's POST
            return httpx.Response(200, json={"ID": INSTANCE_ID, "Status": "Success"})
        # The slow POST outlives its lease; the other worker delivers meanwhile.
        world.set(upload.id, lease_until=utcnow() - timedelta(seconds=1))
        claim = _claim_one(other)
        assert claim is not None
        await other.deliver(claim)
        return httpx.Response(200, json={"ID": INSTANCE_ID, "Status": "AlreadyStored"})

    world.orthanc.handler = answer
    _step(slow)
    assert world.row(upload.id).state == State.FORWARDED


# --- recovery at start-up --------------------------------------------------------------


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_recover_removes_an_orphan_past_the_grace(world: World) -> None:
    """A file in ``queue/`` with no row is removed when the grace period is zero."""
    orphan = world.spool.path(QUEUE, "x.dcm")
    orphan.write_bytes(DATA)
    world.forwarder(orphan_grace_seconds=0).recover()
    assert not orphan.exists()


def test_recover_keeps_a_recent_orphan(world: World) -> None:
    """A fresh file with no row may be between rename and commit elsewhere, so it is kept."""
    orphan = world.spool.path(QUEUE, "x.dcm")
    orphan.write_bytes(DATA)
    world.forwarder(orphan_grace_seconds=3600).recover()
    assert orphan.exists()


def test_recover_removes_a_stale_partial_file(world: World) -> None:
    """A half-received ``tmp/*.part`` older than the grace is removed."""
    partial = world.spool.path(TMP, "abc.part")
    partial.write_bytes(DATA[:100])
    _age(partial, 3600)
    world.forwarder(orphan_grace_seconds=600).recover()
    assert not partial.exists()


def test_recover_quarantines_a_queued_row_without_its_file(world: World) -> None:
    """A queued row whose file is gone becomes quarantined as "spool_file_missing"."""
    upload = world.queue(with_file=False)
    world.forwarder().recover()
    row = world.row(upload.id)
    assert row.state == State.QUARANTINED
    assert row.reason == "spool_file_missing"


def test_recover_keeps_a_queued_rows_file(world: World) -> None:
    """A queued row and its file are left alone, however old the file."""
    upload = world.queue()
    _age(world.spool.path(QUEUE, upload.spool_name or ""), 3600)
    world.forwarder(orphan_grace_seconds=0).recover()
    assert world.row(upload.id).state == State.QUEUED
    assert _in(world, QUEUE, upload)


def test_recover_removes_the_file_of_a_forwarded_row(world: World) -> None:
    """A file left in ``queue/`` after its row was forwarded is removed."""
    upload = world.queue()
    world.set(upload.id, state=State.FORWARDED)
    world.forwarder(orphan_grace_seconds=3600).recover()
    assert not _in(world, QUEUE, upload)


# --- credentials -----------------------------------------------------------------------


def _echo_json(code: int) -> Callable[[httpx.Request], Answer]:
    def answer(request: httpx.Request) -> httpx.Response:
        echoed = request.headers["Authorization"]
        body = {"Message": "failed", "Authorization": echoed, "Password": PASSWORD}
        return httpx.Response(code, json=body)

    return answer


def _echo_text(request: httpx.Request) -> httpx.Response:
    return httpx.Response(500, text=f"{request.headers['Authorization']} {PASSWORD}")


def _echo_connect_error(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError(f"refused {request.headers['Authorization']} {PASSWORD}")


def _echo_timeout(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout(f"slow {request.headers['Authorization']} {PASSWORD}")


@pytest.mark.parametrize(
    ("handler", "max_attempts"),
    [
        pytest.param(_echo_json(503), 3, id="503-json"),
        pytest.param(_echo_json(500), 1, id="500-gave-up"),
        pytest.param(_echo_json(400), 3, id="400-refused"),
        pytest.param(_echo_text, 3, id="500-text"),
        pytest.param(_echo_connect_error, 3, id="connect-error"),
        pytest.param(_echo_timeout, 3, id="timeout"),
    ],
)
def test_orthanc_credentials_never_reach_the_detail(
    world: World, handler: Callable[[httpx.Request], Answer], max_attempts: int
) -> None:
    """Even when the failure echoes the Authorization header, the row's detail omits it."""
    world.orthanc.handler = handler
    upload = world.queue()
    _step(world.forwarder(forward_max_attempts=max_attempts))
    detail = world.row(upload.id).detail
    assert detail
    assert PASSWORD not in detail
    assert AUTHORIZATION.split()[1] not in detail


def test_a_failing_delivery_does_not_stop_the_forwarder(world: World) -> None:
    """An unexpected error in one delivery is logged; the worker goes on to the next row."""
    first = world.queue()
    second = world.queue()
    calls = 0

    async def answer(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("something nobody planned for")
        return httpx.Response(200, json={"ID": INSTANCE_ID, "Status": "Success"})

    world.orthanc.handler = answer
    forwarder = world.forwarder(owner="host-a:1")

    async def run_briefly() -> None:
        task = asyncio.create_task(forwarder.run())
        deadline = time.monotonic() + 10
        # Polls a database row, which no asyncio.Event can signal.
        while time.monotonic() < deadline and world.row(second.id).state != State.FORWARDED:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run_briefly())
    assert world.row(second.id).state == State.FORWARDED
    assert world.row(first.id).state == State.QUEUED  # its lease runs out; it is tried again


def test_a_long_delivery_renews_its_lease(world: World) -> None:
    """While Orthanc takes longer than the lease, no other worker can claim the row."""
    upload = world.queue()
    forwarder = world.forwarder(owner="host-a:1", forward_lease_seconds=0.6)
    rival = world.forwarder(owner="host-b:2", forward_lease_seconds=0.6)
    rival_claims: list[object] = []

    async def slow(request: httpx.Request) -> httpx.Response:
        for _ in range(4):  # 1.2 s in all: twice the lease
            await asyncio.sleep(0.3)
            rival_claims.append(await asyncio.to_thread(rival._claim))
        return httpx.Response(200, json={"ID": INSTANCE_ID, "Status": "Success"})

    world.orthanc.handler = slow
    _step(forwarder)
    assert rival_claims == [[], [], [], []]
    assert world.row(upload.id).state == State.FORWARDED


def _dead_pid() -> int:
    """The pid of a process that has just exited."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_stopping_forwarder_frees_only_its_own_leases(world: World) -> None:
    ours, theirs = world.queue(), world.queue()
    forwarder = world.forwarder()
    later = utcnow() + timedelta(seconds=300)
    world.set(ours.id, lease_owner=f"{forwarder.owner}/abc", lease_until=later)
    world.set(theirs.id, lease_owner=f"{forwarder.owner}0/abc", lease_until=later)
    assert forwarder.release_own_leases() == 1
    assert world.row(ours.id).lease_owner is None
    assert world.row(theirs.id).lease_owner == f"{forwarder.owner}0/abc"  # another pid


def test_recover_releases_the_lease_of_an_unreaped_process(world: World) -> None:
    """A forwarder process whose service was SIGKILLed may stay a zombie (PID 1 in a
    container need not reap it): kill(pid, 0) still succeeds, yet it holds nothing."""
    zombie = subprocess.Popen(["true"])  # not waited for until the end: a zombie
    try:
        stat = Path(f"/proc/{zombie.pid}/stat")
        wait_until(lambda: stat.read_text().rpartition(")")[2].split()[0] == "Z", timeout=10)
        row = world.queue()
        forwarder = world.forwarder()
        host = forwarder.owner.rpartition(":")[0]
        later = utcnow() + timedelta(seconds=300)
        world.set(row.id, lease_owner=f"{host}:{zombie.pid}/abc", lease_until=later)
        assert forwarder.release_dead_leases() == 1
        assert world.row(row.id).lease_owner is None
    finally:
        zombie.wait()


def test_recover_releases_leases_of_dead_processes_on_this_host(world: World) -> None:
    """After a SIGKILL, a restarted intake need not wait out the dead process's lease."""
    dead = world.queue()
    alive = world.queue()
    forwarder = world.forwarder()
    host = forwarder.owner.rpartition(":")[0]
    later = utcnow() + timedelta(seconds=300)
    world.set(dead.id, lease_owner=f"{host}:{_dead_pid()}/abc", lease_until=later)
    world.set(alive.id, lease_owner=f"{host}:{os.getppid()}/abc", lease_until=later)
    forwarder.recover()
    assert world.row(dead.id).lease_owner is None
    assert world.row(alive.id).lease_owner is not None
    claim = _claim_one(forwarder)
    assert claim is not None
    assert claim.id == dead.id
