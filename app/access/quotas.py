"""Per-site limits that hold across every intake process: they live in the database.

- instances per minute and bytes per day: fixed-window counters in ``site_usage``,
  raised with one conditional UPSERT (``INSERT … ON CONFLICT DO UPDATE … WHERE``),
  so two processes can never both take the last unit;
- concurrent uploads: rows in ``upload_slots``, counted under a lock on the site's
  row; each slot expires unless its holder renews it, so a killed process frees its
  slots by itself.

Windows are UTC: a minute starts at :00, a day at midnight UTC. A fixed window allows
up to twice the rate across a boundary; the daily byte quota is exact.

Everything a site is counted for is counted here, at two moments of an upload:
- ``Admission.admit``, before the body is read: the concurrency slot, the declared size
  against what is left of the day's bytes, and the request's first instance against the
  minute (an attempt counts, so a flood of bad files is refused before its bodies);
- ``take_stored``, in the transaction that commits a stored file's row: its bytes, and,
  for a request's further files (a ZIP's entries, a form's parts), one instance each.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import and_, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Site, SiteUsage, UploadSlot, utcnow
from app.errors import QuotaExceeded, RateLimited, TooManyConcurrentUploads

if TYPE_CHECKING:
    from app.access.sites import AuthenticatedSite

MINUTE, DAY = "minute", "day"


def _window_start(window: str, now: datetime) -> datetime:
    if window == MINUTE:
        return now.replace(second=0, microsecond=0)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def _seconds_left(window: str, now: datetime) -> int:
    length = timedelta(minutes=1) if window == MINUTE else timedelta(days=1)
    return int((_window_start(window, now) + length - now).total_seconds()) + 1


def _add(
    session: Session,
    site_id: int,
    window: str,
    now: datetime,
    *,
    count: int,
    size: int,
    max_count: int | None = None,
    max_bytes: int | None = None,
) -> bool:
    """Add to the window's counters unless that would pass a maximum; True if added."""
    if (max_count is not None and count > max_count) or (
        max_bytes is not None and size > max_bytes
    ):
        return False
    values = {
        "site_id": site_id,
        "window": window,
        "window_start": _window_start(window, now),
        "count": count,
        "bytes": size,
    }
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    conditions = []
    if max_count is not None:
        conditions.append(SiteUsage.count + count <= max_count)
    if max_bytes is not None:
        conditions.append(SiteUsage.bytes + size <= max_bytes)
    stmt = (
        insert(SiteUsage)
        .values(values)
        .on_conflict_do_update(
            index_elements=["site_id", "window", "window_start"],
            set_={"count": SiteUsage.count + count, "bytes": SiteUsage.bytes + size},
            where=and_(*conditions) if conditions else None,
        )
        .returning(SiteUsage.count)
    )
    return session.execute(stmt).first() is not None


def take_instance(session: Session, site_id: int, limit: int, now: datetime) -> None:
    """Count one upload against instances-per-minute, or raise RateLimited."""
    if not _add(session, site_id, MINUTE, now, count=1, size=0, max_count=limit):
        raise RateLimited(
            f"the site's limit of {limit} instances per minute is reached",
            retry_after=_seconds_left(MINUTE, now),
        )


def bytes_used_today(session: Session, site_id: int, now: datetime) -> int:
    used = session.scalar(
        select(SiteUsage.bytes).where(
            SiteUsage.site_id == site_id,
            SiteUsage.window == DAY,
            SiteUsage.window_start == _window_start(DAY, now),
        )
    )
    return int(used or 0)


def _quota_error(limit: int, now: datetime) -> QuotaExceeded:
    return QuotaExceeded(
        f"the site's quota of {limit} bytes per day (UTC) would be exceeded",
        retry_after=_seconds_left(DAY, now),
    )


def check_bytes(session: Session, site_id: int, limit: int, size: int, now: datetime) -> None:
    """Refuse early when ``size`` (e.g. Content-Length) no longer fits in today's quota."""
    if bytes_used_today(session, site_id, now) + size > limit:
        raise _quota_error(limit, now)


def take_bytes(session: Session, site_id: int, limit: int, size: int, now: datetime) -> None:
    """Count a received instance's bytes against today's quota, or raise QuotaExceeded."""
    if not _add(session, site_id, DAY, now, count=1, size=size, max_bytes=limit):
        raise _quota_error(limit, now)


def acquire_slot(
    session: Session, site_id: int, limit: int, holder: str, now: datetime, ttl_seconds: float
) -> int:
    """Take one of the site's concurrent-upload slots; its id, or TooManyConcurrentUploads."""
    # Serialise slot-taking per site (PostgreSQL row lock; SQLite's BEGIN IMMEDIATE).
    session.execute(select(Site.id).where(Site.id == site_id).with_for_update())
    session.execute(
        delete(UploadSlot).where(UploadSlot.site_id == site_id, UploadSlot.expires_at < now)
    )
    busy = session.scalar(select(func.count(UploadSlot.id)).where(UploadSlot.site_id == site_id))
    if (busy or 0) >= limit:
        raise TooManyConcurrentUploads(
            f"the site already has {busy} uploads in progress (limit {limit})", retry_after=5
        )
    slot = UploadSlot(
        site_id=site_id, holder=holder, expires_at=now + timedelta(seconds=ttl_seconds)
    )
    session.add(slot)
    session.flush()
    return slot.id


def take_stored(
    session: Session, site: AuthenticatedSite, byte_size: int, extra_instance: bool, now: datetime
) -> None:
    """Count a file being stored, in its row's transaction: its bytes against the day, and,
    unless it is the request's first (admission took that one), an instance."""
    quota = site.policy.bytes_per_day
    if quota is not None:
        take_bytes(session, site.site_id, quota, byte_size, now)
    rate = site.policy.instances_per_minute
    if extra_instance and rate is not None:
        take_instance(session, site.site_id, rate, now)


def renew_slot(session: Session, slot_id: int, now: datetime, ttl_seconds: float) -> None:
    session.execute(
        update(UploadSlot)
        .where(UploadSlot.id == slot_id)
        .values(expires_at=now + timedelta(seconds=ttl_seconds))
    )


def release_slot(session: Session, slot_id: int) -> None:
    session.execute(delete(UploadSlot).where(UploadSlot.id == slot_id))


def prune(session: Session, now: datetime) -> None:
    """Forget windows older than two days and slots long expired."""
    session.execute(delete(SiteUsage).where(SiteUsage.window_start < now - timedelta(days=2)))
    session.execute(delete(UploadSlot).where(UploadSlot.expires_at < now))


class Admission:
    """Applies a site's limits around one upload, off the event loop."""

    def __init__(self, sessions: sessionmaker[Session], slot_ttl_seconds: float) -> None:
        self._sessions = sessions
        self._ttl = slot_ttl_seconds

    @contextlib.asynccontextmanager
    async def admit(
        self, site: AuthenticatedSite, declared_bytes: int | None
    ) -> AsyncIterator[None]:
        """Count the upload and hold a concurrency slot (if the site has such limits)."""
        policy = site.policy
        if (
            policy.instances_per_minute is None
            and policy.max_concurrent_uploads is None
            and (policy.bytes_per_day is None or declared_bytes is None)
        ):
            yield  # the common case: no database work at all
            return
        slot = await asyncio.to_thread(self._enter, site, declared_bytes)
        if slot is None:
            yield
            return
        heartbeat = asyncio.create_task(self._keep(slot))
        try:
            yield
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await asyncio.to_thread(self._leave, slot)

    def _enter(self, site: AuthenticatedSite, declared_bytes: int | None) -> int | None:
        policy = site.policy
        now = utcnow()
        with self._sessions() as session:
            if policy.bytes_per_day is not None and declared_bytes is not None:
                check_bytes(session, site.site_id, policy.bytes_per_day, declared_bytes, now)
            slot = None
            if policy.max_concurrent_uploads is not None:
                slot = acquire_slot(
                    session,
                    site.site_id,
                    policy.max_concurrent_uploads,
                    holder=f"{os.getpid()}",
                    now=now,
                    ttl_seconds=self._ttl,
                )
            # Counted last, so a refusal above does not use up the minute's allowance.
            if policy.instances_per_minute is not None:
                take_instance(session, site.site_id, policy.instances_per_minute, now)
            session.commit()
        return slot

    async def _keep(self, slot: int) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            await asyncio.to_thread(self._renew, slot)

    def _renew(self, slot: int) -> None:
        with self._sessions() as session:
            renew_slot(session, slot, utcnow(), self._ttl)
            session.commit()

    def _leave(self, slot: int) -> None:
        with self._sessions() as session:
            release_slot(session, slot)
            session.commit()
