"""Per-site limits kept in the shared database (app/access/quotas.py), on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.access import quotas, sites
from app.db.migrations import upgrade
from app.db.models import SiteUsage, UploadSlot
from app.db.sessions import make_engine, make_sessionmaker
from app.errors import QuotaExceeded, RateLimited, TooManyConcurrentUploads

NOW = datetime(2030, 1, 2, 3, 4, 20, 500_000, tzinfo=UTC)  # 39.5 s left in its minute
TTL = 60.0


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


@pytest.fixture
def site_id(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        sites.add(session, "site-a")
        return sites.show(session, "site-a").id


def _take_instance(
    sessions: sessionmaker[Session], site_id: int, limit: int, now: datetime
) -> None:
    with sessions() as session:
        quotas.take_instance(session, site_id, limit, now)
        session.commit()


def _take_bytes(sessions: sessionmaker[Session], site_id: int, limit: int, size: int) -> None:
    with sessions() as session:
        quotas.take_bytes(session, site_id, limit, size, NOW)
        session.commit()


def _used_today(sessions: sessionmaker[Session], site_id: int) -> int:
    with sessions() as session:
        return quotas.bytes_used_today(session, site_id, NOW)


def _acquire(sessions: sessionmaker[Session], site_id: int, limit: int, now: datetime = NOW) -> int:
    with sessions() as session:
        slot = quotas.acquire_slot(session, site_id, limit, "test", now, TTL)
        session.commit()
        return slot


def test_take_instance_allows_exactly_the_limit_per_minute(
    sessions: sessionmaker[Session], site_id: int
) -> None:
    for _ in range(3):
        _take_instance(sessions, site_id, 3, NOW)
    with pytest.raises(RateLimited) as refused:
        _take_instance(sessions, site_id, 3, NOW + timedelta(seconds=10))
    assert 1 <= refused.value.retry_after <= 61
    assert refused.value.retry_after == 30  # 29.5 s left in the minute, rounded up


def test_retry_after_at_the_start_of_a_minute_is_at_most_61(
    sessions: sessionmaker[Session], site_id: int
) -> None:
    start = NOW.replace(second=0, microsecond=0)
    _take_instance(sessions, site_id, 1, start)
    with pytest.raises(RateLimited) as refused:
        _take_instance(sessions, site_id, 1, start)
    assert refused.value.retry_after <= 61


def test_a_new_minute_window_starts_fresh(sessions: sessionmaker[Session], site_id: int) -> None:
    for _ in range(2):
        _take_instance(sessions, site_id, 2, NOW)
    later = NOW + timedelta(minutes=1)
    for _ in range(2):
        _take_instance(sessions, site_id, 2, later)
    with pytest.raises(RateLimited):
        _take_instance(sessions, site_id, 2, later)


def test_sites_have_separate_minute_windows(sessions: sessionmaker[Session], site_id: int) -> None:
    with sessions() as session:
        sites.add(session, "site-b")
        other = sites.show(session, "site-b").id
    _take_instance(sessions, site_id, 1, NOW)
    _take_instance(sessions, other, 1, NOW)
    with pytest.raises(RateLimited):
        _take_instance(sessions, site_id, 1, NOW)


def test_take_bytes_enforces_the_daily_quota_exactly(
    sessions: sessionmaker[Session], site_id: int
) -> None:
    _take_bytes(sessions, site_id, 1000, 600)
    _take_bytes(sessions, site_id, 1000, 400)
    assert _used_today(sessions, site_id) == 1000
    with pytest.raises(QuotaExceeded) as refused:
        _take_bytes(sessions, site_id, 1000, 1)
    assert refused.value.retry_after >= 1
    assert _used_today(sessions, site_id) == 1000


def test_a_refused_take_bytes_counts_nothing(sessions: sessionmaker[Session], site_id: int) -> None:
    _take_bytes(sessions, site_id, 1000, 600)
    with pytest.raises(QuotaExceeded):
        _take_bytes(sessions, site_id, 1000, 401)
    _take_bytes(sessions, site_id, 1000, 400)
    assert _used_today(sessions, site_id) == 1000


def test_an_instance_bigger_than_the_quota_is_refused(
    sessions: sessionmaker[Session], site_id: int
) -> None:
    with pytest.raises(QuotaExceeded):
        _take_bytes(sessions, site_id, 1000, 1001)
    assert _used_today(sessions, site_id) == 0
    with sessions() as session, pytest.raises(QuotaExceeded):
        quotas.check_bytes(session, site_id, 1000, 1001, NOW)


def test_check_bytes_refuses_what_no_longer_fits(
    sessions: sessionmaker[Session], site_id: int
) -> None:
    _take_bytes(sessions, site_id, 1000, 700)
    with sessions() as session:
        quotas.check_bytes(session, site_id, 1000, 300, NOW)
        with pytest.raises(QuotaExceeded):
            quotas.check_bytes(session, site_id, 1000, 301, NOW)


def test_the_next_day_has_a_fresh_quota(sessions: sessionmaker[Session], site_id: int) -> None:
    _take_bytes(sessions, site_id, 1000, 1000)
    with sessions() as session:
        tomorrow = NOW + timedelta(days=1)
        quotas.take_bytes(session, site_id, 1000, 1000, tomorrow)
        session.commit()
        assert quotas.bytes_used_today(session, site_id, tomorrow) == 1000


def test_acquire_slot_allows_the_limit_then_refuses(
    sessions: sessionmaker[Session], site_id: int
) -> None:
    slots = {_acquire(sessions, site_id, 2) for _ in range(2)}
    assert len(slots) == 2
    with pytest.raises(TooManyConcurrentUploads):
        _acquire(sessions, site_id, 2)


def test_release_slot_frees_one(sessions: sessionmaker[Session], site_id: int) -> None:
    first = _acquire(sessions, site_id, 2)
    _acquire(sessions, site_id, 2)
    with sessions() as session:
        quotas.release_slot(session, first)
        session.commit()
    _acquire(sessions, site_id, 2)
    with pytest.raises(TooManyConcurrentUploads):
        _acquire(sessions, site_id, 2)


def test_an_expired_slot_is_reclaimed(sessions: sessionmaker[Session], site_id: int) -> None:
    """A holder that died without releasing frees its slot once the slot expires."""
    _acquire(sessions, site_id, 1)
    with pytest.raises(TooManyConcurrentUploads):
        _acquire(sessions, site_id, 1, NOW + timedelta(seconds=TTL - 1))
    _acquire(sessions, site_id, 1, NOW + timedelta(seconds=TTL + 1))
    with sessions() as session:
        assert session.scalar(select(func.count(UploadSlot.id))) == 1


def test_a_renewed_slot_is_not_reclaimed(sessions: sessionmaker[Session], site_id: int) -> None:
    slot = _acquire(sessions, site_id, 1)
    with sessions() as session:
        quotas.renew_slot(session, slot, NOW + timedelta(seconds=TTL - 1), TTL)
        session.commit()
    with pytest.raises(TooManyConcurrentUploads):
        _acquire(sessions, site_id, 1, NOW + timedelta(seconds=TTL + 1))


def test_prune_drops_old_windows_and_expired_slots(
    sessions: sessionmaker[Session], site_id: int
) -> None:
    old = NOW - timedelta(days=3)
    _take_instance(sessions, site_id, 10, old)
    _take_instance(sessions, site_id, 10, NOW)
    with sessions() as session:
        quotas.take_bytes(session, site_id, 1000, 10, old)
        session.commit()
    _take_bytes(sessions, site_id, 1000, 10)
    _acquire(sessions, site_id, 5, old)
    _acquire(sessions, site_id, 5, NOW)
    with sessions() as session:
        quotas.prune(session, NOW)
        session.commit()
        starts = session.scalars(select(SiteUsage.window_start)).all()
        assert sorted(starts) == [
            NOW.replace(hour=0, minute=0, second=0, microsecond=0),
            NOW.replace(second=0, microsecond=0),
        ]
        assert session.scalar(select(func.count(UploadSlot.id))) == 1


def test_concurrent_takers_get_exactly_the_limit(
    sessions: sessionmaker[Session], site_id: int
) -> None:
    """Threads with their own sessions (as separate processes would) never overshoot."""
    threads, attempts, limit = 6, 20, 37
    start = threading.Barrier(threads)
    taken: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        count = 0
        try:
            start.wait()
            for _ in range(attempts):
                with sessions() as session:
                    try:
                        quotas.take_instance(session, site_id, limit, NOW)
                    except RateLimited:
                        session.rollback()
                        continue
                    session.commit()
                    count += 1
        except BaseException as exc:  # reported below, so a thread's failure fails the test
            errors.append(exc)
        taken.append(count)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert errors == []
    assert sum(taken) == limit
    with sessions() as session:
        counted = session.scalar(select(SiteUsage.count).where(SiteUsage.site_id == site_id))
    assert counted == limit
