"""Fault injection with real components: nothing acknowledged is ever lost.

The private Orthanc is stopped, killed, slowed down, made to answer 5xx and made to
refuse one instance; the spool's disk fills up; the database goes away or is locked.
Each test then compares what the senders were answered with what the private Orthanc
holds (SHA-256 of the bytes after the preamble) and what the intake's rows say.

Fakes only where a real component cannot fail on demand: a proxy in front of the real
Orthanc delays its answers or answers 5xx itself (tests/support/faults.py).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from sqlalchemy.engine import make_url

from app.db.sessions import SQLITE_BUSY_TIMEOUT_MS
from tests.conftest import SQLITE_ONLY
from tests.support import postgres
from tests.support.archives import make_zip
from tests.support.faults import (
    MIB,
    Answer,
    Attempt,
    Audit,
    CommitTrap,
    Delay,
    FirstN,
    HttpProxy,
    Pass,
    PostgresCluster,
    ProxyRequest,
    Row,
    Uploader,
    audit,
    fill,
    forwarded_lines,
    is_store,
    orthanc_contents,
    orthanc_count,
    post,
    record_figures,
    sop_uid,
    tmpfs,
    upload_rows,
    wait_for,
)
from tests.support.intake import IntakeProcess, Site
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study

SETTLE_SECONDS = 120  # a noisy 2-core machine: generous, but bounded


def _settled(intake: IntakeProcess) -> bool:
    return not any(r.state in ("queued", "received") for r in upload_rows(intake.database_url))


def _statuses(attempts: list[Attempt]) -> dict[str, int]:
    return dict(Counter(str(a.status) for a in attempts))


def _record(
    scenario: str,
    intake: IntakeProcess,
    attempts: list[Attempt],
    result: Audit,
    **extra: object,
) -> list[Row]:
    rows = upload_rows(intake.database_url)
    already = sum(r.state == "forwarded" and r.orthanc_status == "AlreadyStored" for r in rows)
    extra |= {"statuses": _statuses(attempts), "orthanc_already_stored": already}
    record_figures(scenario, result, rows, extra=extra)
    return rows


def _assert_exactly_once(
    scenario: str,
    intake: IntakeProcess,
    orthanc: OrthancProcess,
    attempts: list[Attempt],
    *,
    database_crash: bool = False,
    **extra: object,
) -> None:
    """Every 2xx is in Orthanc with the bytes sent, once; every row forwarded, once."""
    wait_for(lambda: _settled(intake), SETTLE_SECONDS, "the queue did not drain")
    result = audit(attempts, orthanc_contents(orthanc))
    _record(scenario, intake, attempts, result, **extra)
    assert result.ok, result.summary()
    assert result.found == result.acknowledged, result.summary()
    assert orthanc_count(orthanc) == result.acknowledged  # no extra instance, none twice
    rows = [r for r in upload_rows(intake.database_url) if r.state != "rejected"]
    assert {r.state for r in rows} == {"forwarded"}, [(r.state, r.reason) for r in rows]
    receipts = {a.receipt for a in attempts if a.acknowledged}
    recorded = {r.receipt: r for r in rows}
    assert receipts <= set(recorded), f"2xx without a row: {receipts - set(recorded)}"
    assert receipts == set(recorded), (
        "rows without a 2xx: "
        f"{[(r.receipt, r.state, r.reason) for k, r in recorded.items() if k not in receipts]}"
    )
    # One "forwarded" line per delivery. (With the database crashing, a line can be
    # missing: the commit marking the row forwarded happened, its acknowledgement was lost.)
    lines = forwarded_lines(intake.log_text())
    assert set(lines) <= receipts, set(lines) - receipts
    assert max(lines.values()) == 1, f"forwarded twice: {[k for k, n in lines.items() if n > 1]}"
    if not database_crash:
        assert set(lines) == receipts, f"forwarded without a log line: {receipts - set(lines)}"


# --- the private Orthanc ------------------------------------------------------------------


@SQLITE_ONLY
def test_orthanc_stopped_killed_and_restarted_while_uploads_keep_coming(
    make_intake: Callable[..., IntakeProcess], own_orthanc: OrthancProcess
) -> None:
    """SIGTERM, start, SIGKILL (deliveries in flight), start: each upload ends in Orthanc once."""
    intake = make_intake(own_orthanc)
    site = intake.add_site("hospital-f")
    uploader = Uploader(intake, site, make_study(n_series=2, per_series=20), pause=0.1).start()

    def sent(count: int) -> Callable[[], bool]:
        return lambda: uploader.done() >= count

    try:
        for count, change in (
            (6, own_orthanc.stop),
            (14, own_orthanc.start),
            (22, own_orthanc.kill),
            (30, own_orthanc.start),
        ):
            wait_for(sent(count), 120, f"{count} uploads sent")
            change()
        attempts = uploader.join()
    finally:
        uploader.stop()
    assert [a.status for a in attempts] == [200] * 40  # Orthanc's state never reaches a site
    _assert_exactly_once("orthanc stopped, started, killed, started", intake, own_orthanc, attempts)


@SQLITE_ONLY
def test_slow_orthanc_answering_after_the_timeout_stores_each_instance_once(
    make_intake: Callable[..., IntakeProcess], own_orthanc: OrthancProcess
) -> None:
    """Orthanc stores the file but answers after the forwarder gave up: the retry finds it
    AlreadyStored with the same MD5 and counts it delivered; nothing is stored twice."""
    delayed = 4
    with HttpProxy(own_orthanc.port, FirstN(delayed, Delay(3.0), is_store)) as proxy:
        intake = make_intake(own_orthanc, orthanc_url=proxy.url, orthanc_timeout_seconds="1")
        site = intake.add_site("hospital-s")
        with intake.client(site) as client:
            attempts = [post(client, data) for data in make_study(n_series=1, per_series=6)]
        _assert_exactly_once("orthanc answers after the timeout", intake, own_orthanc, attempts)

        def answers() -> list[str]:
            stores = [e for e in proxy.exchanges() if is_store(e.request)]
            return [str((e.json() or {}).get("Status")) for e in stores]

        # The late answers are recorded once their delay has passed. Nothing else is in
        # flight then (every row is forwarded), and Orthanc (OverwriteInstances false)
        # answers Success once per instance at most: the == 6 below needs no more waiting.
        wait_for(lambda: answers().count("Success") >= 6, 30, "Orthanc's late answers")
    assert answers().count("Success") == 6, answers()  # Orthanc stored each file once
    assert answers().count("AlreadyStored") >= delayed, answers()  # ...and was asked again
    rows = upload_rows(intake.database_url)
    assert sum(r.orthanc_status == "AlreadyStored" for r in rows) >= delayed


@SQLITE_ONLY
def test_orthanc_answering_5xx_for_a_while_then_one_instance_for_ever(
    make_intake: Callable[..., IntakeProcess], own_orthanc: OrthancProcess
) -> None:
    """503s for a while are waited out; an instance Orthanc answers 500 for, every time,
    is quarantined "gave_up" with Orthanc's message, its file kept; the rest arrive once."""
    files = make_study(n_series=1, per_series=6)
    poisoned = sop_uid(files[-1]).encode()

    def is_poisoned(request: ProxyRequest) -> bool:
        return is_store(request) and poisoned in request.body

    first_503s = FirstN(
        8, Answer(503, "Orthanc is busy"), lambda r: is_store(r) and not is_poisoned(r)
    )

    def policy(request: ProxyRequest) -> Answer | Pass:
        if is_poisoned(request):
            return Answer(500, "Cannot store this instance")
        action = first_503s(request)
        assert isinstance(action, Answer | Pass)
        return action

    with HttpProxy(own_orthanc.port, policy) as proxy:
        intake = make_intake(own_orthanc, orthanc_url=proxy.url, forward_max_attempts="10")
        site = intake.add_site("hospital-5")
        with intake.client(site) as client:
            attempts = [post(client, data) for data in files]
        assert [a.status for a in attempts] == [200] * 6
        wait_for(lambda: _settled(intake), SETTLE_SECONDS, "the queue did not settle")
        stores = [e for e in proxy.exchanges() if is_store(e.request)]
    assert first_503s.used == 8
    rows = {r.sop_instance_uid: r for r in upload_rows(intake.database_url)}
    stuck = rows[poisoned.decode()]
    assert (stuck.state, stuck.reason) == ("quarantined", "gave_up")
    assert "Cannot store this instance" in (stuck.detail or "")
    kept = intake.spool / "quarantine" / (stuck.spool_name or "")
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == stuck.sha256
    # The poisoned file was tried exactly forward_max_attempts times, never reaching Orthanc.
    assert sum(poisoned in e.request.body for e in stores) == 10
    # The others: each stored by Orthanc exactly once, never a second time.
    reached = [e for e in stores if e.upstream_status is not None]
    assert [(e.json() or {}).get("Status") for e in reached] == ["Success"] * 5
    _record(
        "orthanc answers 503, and 500 for one",
        intake,
        attempts,
        audit(attempts, orthanc_contents(own_orthanc)),
    )
    delivered = [a for a in attempts if a.sop_instance_uid != poisoned.decode()]
    result = audit(delivered, orthanc_contents(own_orthanc))
    assert result.ok, result.summary()
    assert result.found == 5
    assert orthanc_count(own_orthanc) == 5


@SQLITE_ONLY
def test_orthanc_refusing_one_instance_quarantines_it_with_a_reason(
    make_intake: Callable[..., IntakeProcess], own_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """A real Orthanc whose Lua ReceivedInstanceFilter refuses one SOP Instance UID.

    Orthanc 1.10.1 answers such an instance HTTP 200 with ``"Status": "FilteredOut"``
    and does not store it. The intake must not take that for a delivery.
    """
    files = make_study(n_series=1, per_series=4)
    refused = sop_uid(files[1])
    script = tmp_path / "refuse-one.lua"
    script.write_text(
        "function ReceivedInstanceFilter(dicom, origin, info)\n"
        f"  return dicom.SOPInstanceUID ~= '{refused}'\n"
        "end\n"
    )
    own_orthanc.extra_config["LuaScripts"] = [str(script)]
    own_orthanc.restart()
    intake = make_intake(own_orthanc)
    site = intake.add_site("hospital-r")
    with intake.client(site) as client:
        attempts = [post(client, data) for data in files]
    assert [a.status for a in attempts] == [200] * 4
    wait_for(lambda: _settled(intake), SETTLE_SECONDS, "the queue did not settle")
    contents = orthanc_contents(own_orthanc)
    rows = {
        r.sop_instance_uid: r
        for r in _record(
            "orthanc refuses one (Lua filter)", intake, attempts, audit(attempts, contents)
        )
    }
    row = rows[refused]
    assert refused not in contents
    assert row.state == "quarantined", (
        f"Orthanc filtered the instance out (it answered 200, Status {row.orthanc_status!r}) "
        f"and does not hold it, yet its upload ended {row.state!r} and its spool file is "
        f"{'kept' if (intake.spool / 'queue' / (row.spool_name or '')).exists() else 'gone'}: "
        "an acknowledged upload lost"
    )
    assert row.reason
    assert (intake.spool / "quarantine" / (row.spool_name or "")).is_file()
    others = [a for a in attempts if a.sop_instance_uid != refused]
    result = audit(others, contents)
    assert result.ok, result.summary()
    assert result.found == 3


@SQLITE_ONLY
def test_a_resend_after_a_lost_spool_file_is_delivered(
    make_intake: Callable[..., IntakeProcess], own_orthanc: OrthancProcess
) -> None:
    """A committed row whose spool file is gone is quarantined `spool_file_missing` at
    start-up (test_resilience.py). This happens without an operator's mistake too: when
    the database fails while acknowledging a commit that did happen, `_persist` answers
    503 and deletes the file, leaving a queued row with no file. The site then sends the
    same bytes again; that copy is the only one left and must reach Orthanc, not be
    answered AlreadyStored as a "duplicate" of a row that holds no file."""
    intake = make_intake(own_orthanc)
    site = intake.add_site("hospital-m")
    own_orthanc.stop()
    data = make_study(n_series=1, per_series=1)[0]
    with intake.client(site) as client:
        first = post(client, data)
    assert first.status == 200
    assert first.receipt is not None
    intake.kill()
    (intake.spool / "queue" / f"{first.receipt}.dcm").unlink()
    intake.start()
    rows = {r.receipt: r for r in upload_rows(intake.database_url)}
    assert (rows[first.receipt].state, rows[first.receipt].reason) == (
        "quarantined",
        "spool_file_missing",
    )
    with intake.client(site) as client:
        again = post(client, data)
    assert again.status == 200
    own_orthanc.start()
    wait_for(lambda: _settled(intake), SETTLE_SECONDS, "the queue did not settle")
    rows = {r.receipt: r for r in upload_rows(intake.database_url)}
    resent = rows[again.receipt or ""]
    contents = orthanc_contents(own_orthanc)
    _record("resent after a lost spool file", intake, [first, again], audit([again], contents))
    assert first.sop_instance_uid in contents, (
        f"the resend was acknowledged (200) but ended {resent.state!r} "
        f"(duplicate of a quarantined row with no file) and Orthanc does not hold it"
    )
    assert contents[first.sop_instance_uid] == first.digest


# --- the spool's disk -----------------------------------------------------------------------


def _free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _queue_intact(intake: IntakeProcess, spool: Path) -> int:
    """Every queued row's spool file is there with the SHA-256 recorded at intake."""
    rows = [r for r in upload_rows(intake.database_url) if r.state == "queued"]
    for row in rows:
        data = (spool / "queue" / (row.spool_name or "")).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.sha256, row.receipt
    return len(rows)


def _as_attempt(answer: httpx.Response) -> Attempt:
    return Attempt("script", "", "", answer.status_code, None, answer.headers.get("retry-after"))


def _assert_spool_full(answer: Attempt) -> None:
    assert answer.status == 507, answer
    assert answer.retry_after is not None
    assert int(answer.retry_after) > 0


@SQLITE_ONLY
def test_spool_disk_full_refuses_with_507_and_recovers(
    make_intake: Callable[..., IntakeProcess], own_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """A 16 MiB tmpfs spool: the free-space floor refuses first, a really full disk too;
    earlier uploads are unharmed; draining the queue or freeing space lets uploads in."""
    big = make_study(n_series=1, per_series=30, rows=512, cols=1024)  # ~1 MiB each
    assert all(MIB < len(f) < MIB + 4096 for f in big)
    spool = tmp_path / "spool-tmpfs"
    floor = 4 * MIB
    attempts: list[Attempt] = []
    with tmpfs(spool, 16 * MIB):
        intake = make_intake(own_orthanc, spool_dir=str(spool), spool_min_free_bytes=str(floor))
        try:
            site = intake.add_site("hospital-d")
            own_orthanc.stop()  # uploads pile up in the spool
            files = iter(big)
            with intake.client(site) as client:
                # 1. The floor: 507 while there is still room for several more files.
                refused = b""
                for data in files:
                    attempts.append(post(client, data))
                    if not attempts[-1].acknowledged:
                        refused = data
                        break
                _assert_spool_full(attempts[-1])
                free_at_refusal = _free(spool)
                assert free_at_refusal > MIB, free_at_refusal  # room for one more, refused
                assert len([a for a in attempts if a.acknowledged]) >= 8
                assert not any((spool / "tmp").iterdir())
                assert _queue_intact(intake, spool) == len(attempts) - 1

                # 2. Orthanc returns, the queue drains, the same upload is taken.
                own_orthanc.start()
                wait_for(lambda: _settled(intake), SETTLE_SECONDS, "the queue did not drain")
                wait_for(lambda: not any((spool / "queue").iterdir()), 30, "queue/ emptied")
                attempts.append(post(client, refused))
                assert attempts[-1].status == 200

            # 3. No floor: the disk really fills (ENOSPC in the middle of a body).
            own_orthanc.stop()
            intake.stop()
            intake.env_extra["INTAKE_SPOOL_MIN_FREE_BYTES"] = "0"
            intake.start()
            filler = spool / "filler.bin"
            fill(filler, leave_free=3 * MIB + MIB // 2)
            with intake.client(site) as client:
                for data in files:
                    attempts.append(post(client, data))
                    if not attempts[-1].acknowledged:
                        break
                _assert_spool_full(attempts[-1])
                free_when_full = _free(spool)
                assert free_when_full < MIB  # it was really full: no floor said no
                assert not any((spool / "tmp").iterdir()), "a partial file was left behind"
                queued = _queue_intact(intake, spool)
                assert queued >= 2
                # A gzip body inflating past the free space, and a small ZIP whose first
                # entry does not fit: 507 too, and nothing of them left behind.
                gzipped, zipped = next(files), next(files)
                compressed = client.post(
                    "/instances",
                    content=gzip.compress(gzipped, 1),
                    headers={"Content-Encoding": "gzip"},
                )
                _assert_spool_full(_as_attempt(compressed))
                # Pixel Data ends the files: mostly zeros compress (under the ratio limit).
                pixels, kept = 512 * 1024 * 2, 16 * 1024
                entry = zipped[:-pixels] + bytes(pixels - kept) + zipped[-kept:]
                archive = make_zip([("a.dcm", entry)])
                assert len(archive) < 64 * 1024
                _assert_spool_full(_as_attempt(client.post("/instances", content=archive)))
                assert not any((spool / "tmp").iterdir()), "a partial file was left behind"
                assert _queue_intact(intake, spool) == queued
                never_taken = {sop_uid(gzipped), sop_uid(zipped)}

                # 4. Space returns (the filler goes): uploads are taken again.
                filler.unlink()
                attempts.append(post(client, next(files)))
                assert attempts[-1].status == 200
            own_orthanc.start()
            _assert_exactly_once(
                "spool disk full (16 MiB tmpfs)",
                intake,
                own_orthanc,
                attempts,
                free_bytes_at_floor_507=free_at_refusal,
                free_bytes_at_enospc_507=free_when_full,
                refused_507_gzip_and_zip=2,
            )
            assert not never_taken & set(orthanc_contents(own_orthanc))
        finally:
            intake.kill()


# --- the database ---------------------------------------------------------------------------


def test_postgresql_stopped_gives_503_and_no_acknowledgement_without_a_row(
    own_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """A private PostgreSQL cluster crashed (pg_ctl -m immediate) mid-test and started again."""
    cluster = PostgresCluster()
    intake: IntakeProcess | None = None
    uploader: Uploader | None = None
    try:
        cluster.start()
        database_url = cluster.create_database()
        # A delivery cut off by the outage keeps its lease until it runs out: keep it short.
        intake = IntakeProcess(
            tmp_path / "intake",
            database_url,
            orthanc=own_orthanc,
            env_extra={"INTAKE_FORWARD_LEASE_SECONDS": "10"},
        )
        intake.start()
        site = intake.add_site("hospital-p")
        # A site whose token is first used during the outage: no cached lookup to answer
        # for it, so the lookup itself needs the database (no waiting out the 5 s cache).
        unseen = intake.add_site("hospital-q")
        files = make_study(n_series=3, per_series=20)
        before, down, around = files[:5], files[5:15], make_study(n_series=4, per_series=50)
        with intake.client(site) as client, intake.client(unseen) as unseen_client:
            attempts = [post(client, data) for data in before]
            assert [a.status for a in attempts] == [200] * 5
            # Meanwhile, a script keeps posting across the stop and the start.
            uploader = Uploader(intake, site, around, pause=0.2).start()
            cluster.stop("immediate")  # as a crash: recovery at the next start
            refused = [post(client, data) for data in down[:5]]  # its token lookup cached
            refused += [post(unseen_client, data) for data in down[5:]]
            cluster.start()
            restarted = uploader.done()
            attempts += refused
        for answer in refused:
            assert answer.status == 503, answer
            assert answer.retry_after is not None

        def taken_since_restart() -> bool:
            return sum(a.acknowledged for a in uploader.attempts[restarted:]) >= 5

        wait_for(taken_since_restart, 60, "uploads taken again after the restart")
        attempts += uploader.stop()
        # Across the stop and the start: either 200 or 503 with Retry-After, nothing else.
        assert {a.status for a in attempts} <= {200, 503}, [a.status for a in attempts]
        assert all(a.retry_after for a in attempts if a.status == 503)
        _assert_exactly_once(
            "postgresql crashed and started", intake, own_orthanc, attempts, database_crash=True
        )
        refused_uids = {a.sop_instance_uid for a in attempts if not a.acknowledged}
        assert not refused_uids & {r.sop_instance_uid for r in upload_rows(database_url)}
    finally:
        if uploader is not None:
            uploader.stop()
        if intake is not None:
            intake.kill()
        cluster.destroy()


@contextlib.contextmanager
def _behind_a_commit_trap(
    orthanc: OrthancProcess, tmp_path: Path, site_name: str
) -> Iterator[tuple[CommitTrap, IntakeProcess, Site, str]]:
    """An intake on a fresh PostgreSQL database reached through a CommitTrap, its site,
    and the database's direct URL (for reading rows past the trap)."""
    database_url = postgres.create_database()
    try:
        with CommitTrap(make_url(database_url).port or 5432) as trap:
            intake = IntakeProcess(tmp_path / "intake", trap.url(database_url), orthanc=orthanc)
            with intake:
                yield trap, intake, intake.add_site(site_name), database_url
    finally:
        postgres.drop_database(database_url)


def test_a_commit_whose_answer_is_lost_is_acknowledged_and_delivered(
    own_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """PostgreSQL commits the upload's row, and the connection is cut before its answer
    reaches the intake (an ambiguous commit). The intake must look the row up: it exists,
    so the upload is acknowledged and its file kept and delivered, not deleted with a 503
    (which left a queued row with no file, and the site's resend taken as a duplicate)."""
    with _behind_a_commit_trap(own_orthanc, tmp_path, "hospital-q") as (trap, intake, site, _):
        data = make_study(n_series=1, per_series=1)[0]
        trap.arm()
        with intake.client(site) as client:
            attempt = post(client, data)
        assert trap.fired == 1, "the trap did not see the upload's COMMIT"
        assert attempt.status == 200, attempt
        assert "the commit happened after all" in intake.log_text()
        _assert_exactly_once("commit answer lost", intake, own_orthanc, [attempt])


def test_a_commit_whose_outcome_cannot_be_known_keeps_its_file(
    own_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """The commit's answer is lost and the database stays unreachable, so the intake
    cannot tell whether the row exists: 503, and the file is kept. The row did commit,
    so once the database is back the forwarder delivers it, and the site's resend is
    answered as a duplicate of it: the instance is in Orthanc once."""
    with _behind_a_commit_trap(own_orthanc, tmp_path, "hospital-r") as (
        trap,
        intake,
        site,
        database_url,
    ):
        data = make_study(n_series=1, per_series=1)[0]
        trap.arm(refuse_after=True)
        with intake.client(site) as client:
            first = post(client, data)
            assert trap.fired == 1, "the trap did not see the upload's COMMIT"
            assert first.status == 503, first
            assert "commit outcome unknown" in intake.log_text()
            trap.refusing = False
            wait_for(lambda: _settled(intake), SETTLE_SECONDS, "not delivered")
            again = post(client, data)
        assert again.status == 200, again
        rows = upload_rows(database_url)
        assert sorted(r.state for r in rows) == ["duplicate", "forwarded"]
        contents = orthanc_contents(own_orthanc)
        assert contents[sop_uid(data)] == again.digest
        assert orthanc_count(own_orthanc) == 1


@SQLITE_ONLY
def test_sqlite_held_by_another_writer_gives_503_then_recovers(
    make_intake: Callable[..., IntakeProcess],
    private_orthanc: OrthancProcess,
    database_url: str,
) -> None:
    """Another process holds BEGIN IMMEDIATE past the intake's busy_timeout while six
    uploads come in at once: each gets 503, none a row or a spooled file; after the
    release uploads are taken. Last, each 503 should come after one busy_timeout, not
    after several (the uploads must not queue behind the forwarder's blocked claims)."""
    concurrent = 6
    intake = make_intake(private_orthanc)
    site: Site = intake.add_site("hospital-l")
    files = make_study(n_series=1, per_series=concurrent + 1)
    with intake.client(site) as client:
        first = post(client, files[0])
    assert first.status == 200
    # Delivered before the lock is taken: a delivery whose final write meets the lock
    # keeps its lease until FORWARD_LEASE_SECONDS (RELIABILITY.md, Notes), past this test.
    wait_for(lambda: _settled(intake), SETTLE_SECONDS, "the first upload was not delivered")
    path = make_url(database_url).database
    assert path is not None
    busy_seconds = SQLITE_BUSY_TIMEOUT_MS / 1000
    held = sqlite3.connect(path, timeout=busy_seconds, isolation_level=None)
    answers: list[tuple[Attempt, float]] = []
    lock = threading.Lock()

    def send(data: bytes) -> None:
        started = time.monotonic()
        with intake.client(site) as client:
            answer = post(client, data)
        with lock:
            answers.append((answer, time.monotonic() - started))

    try:
        held.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        senders = [threading.Thread(target=send, args=(d,)) for d in files[1:]]
        for sender in senders:
            sender.start()
        for sender in senders:  # the lock is held until every upload has its answer
            sender.join(busy_seconds * concurrent + 60)
        assert time.monotonic() - started < busy_seconds * concurrent + 60
    finally:
        held.rollback()
        held.close()
    assert len(answers) == concurrent
    for answer, seconds in answers:
        assert answer.status == 503, answer
        assert answer.retry_after is not None
        assert seconds >= busy_seconds - 1  # it waited for the lock, then said no
    rows = upload_rows(database_url)
    assert len(rows) == 1  # no row for the refused ones...
    spooled = {f.name for f in (intake.spool / "queue").iterdir()}
    assert spooled <= {rows[0].spool_name}  # ...and no file of theirs kept
    with intake.client(site) as client:
        after = [post(client, data) for data in files[1:]]
    assert [a.status for a in after] == [200] * concurrent
    wait_for(lambda: _settled(intake), SETTLE_SECONDS, "the queue did not drain")
    attempts = [first, *(a for a, _ in answers), *after]
    _record(
        "sqlite locked by another writer",
        intake,
        attempts,
        audit(attempts, orthanc_contents(private_orthanc)),
        seconds_to_503=sorted(round(seconds, 1) for _, seconds in answers),
    )
    result = audit(after, orthanc_contents(private_orthanc))
    assert not result.lost, result.summary()
    assert not result.corrupt, result.summary()
    assert result.found == concurrent
    # The forwarder's workers block on the lock too; with the default thread pool
    # (CPUs + 4 threads) uploads queued behind them and waited several busy timeouts for
    # their 503 (app/service.py now sizes the pool for both).
    waited = sorted(round(seconds, 1) for _, seconds in answers)
    assert waited[-1] < busy_seconds + 10, f"seconds to each 503: {waited}"
