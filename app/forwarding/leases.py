"""Leases on queued rows: who may deliver which upload, and for how long.

A claim leases due rows of this node (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite
serialises writers with BEGIN IMMEDIATE), each claim under a lease name of its own, so
several intake processes can share a database and every write of a delivery checks the
lease: a sender whose lease ran out changes nothing. A long delivery renews its lease;
a dead process's leases come back when they run out, or at once when this host can tell
the process is gone (``release_dead``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Select, Table, bindparam, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import State, Upload, utcnow
from app.intake.spool import Spool
from app.settings import Settings


@dataclass(frozen=True)
class Claim:
    """A queued row leased to one delivery."""

    id: int
    lease: str  # unique to this claim: writes check it, so a stale worker changes nothing
    receipt: str
    spool_name: str
    expected_id: str | None
    attempts: int
    failed_answers: int
    request_id: str | None = None


# The hot path's statements, built once and in Core (docs/PERFORMANCE.md: building them
# per delivery and the ORM's machinery were most of the forwarder's CPU).
_UPLOADS = cast(Table, Upload.__table__)
_LEASE = (
    _UPLOADS.update()
    .where(_UPLOADS.c.id.in_(bindparam("ids", expanding=True)))
    .values(lease_owner=bindparam("lease"), lease_until=bindparam("until"))
)
# Rows whose file is in this node's spool (``:node``; another node's files are not here).
OURS = or_(_UPLOADS.c.node == bindparam("node"), _UPLOADS.c.node.is_(None))


def _due_rows() -> Select[Any]:
    """Due rows of a node (``:node``, or none recorded), oldest first, ``:limit`` of them."""
    c = _UPLOADS.c
    return (
        select(
            c.id,
            c.receipt,
            c.spool_name,
            c.orthanc_instance_id,
            c.attempts,
            c.failed_answers,
            c.request_id,
        )
        .where(
            c.state == State.QUEUED,
            c.next_attempt_at <= bindparam("now"),
            or_(c.lease_until.is_(None), c.lease_until < bindparam("now")),
            OURS,
        )
        .order_by(c.next_attempt_at, c.id)
        .limit(bindparam("limit"))
        .with_for_update(skip_locked=True)
    )


_DUE = _due_rows()


class LeaseLost(Exception):
    """The claim's lease ended and another worker took the row; this worker backs off."""


def _is_zombie(pid: int) -> bool:
    """Exited but not reaped. A forwarder process whose service was SIGKILLed is adopted
    by PID 1, which in a container may never reap it: ``kill(pid, 0)`` still succeeds."""
    proc = Path("/proc")
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except FileNotFoundError:
        return proc.is_dir()  # reaped since kill() saw it; without /proc, we cannot tell
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


class Leases:
    """This process's leases: claiming due rows, holding them, and freeing the dead's."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], spool: Spool) -> None:
        self._settings = settings
        self._sessions = sessions
        self._spool = spool
        self.owner = f"{socket.gethostname()[:32]}:{os.getpid()}"

    def claim(self, limit: int = 1) -> list[Claim]:
        """Lease up to ``limit`` due rows of this node, in one transaction."""
        now = utcnow()
        lease = f"{self.owner}/{uuid.uuid4().hex[:12]}"  # one per claim: see Claim.lease
        with self._sessions() as session:
            rows = session.execute(
                _DUE, {"now": now, "node": self._spool.node, "limit": limit}
            ).all()
            if not rows:
                return []
            until = now + timedelta(seconds=self._settings.forward_lease_seconds)
            session.execute(
                _LEASE, {"ids": [row.id for row in rows], "lease": lease, "until": until}
            )
            session.commit()
        return [
            Claim(
                id=row.id,
                lease=lease,
                receipt=row.receipt,
                spool_name=row.spool_name or "",
                expected_id=row.orthanc_instance_id,
                attempts=row.attempts,
                failed_answers=row.failed_answers,
                request_id=row.request_id,
            )
            for row in rows
        ]

    @contextlib.contextmanager
    def owned(self, claim: Claim) -> Iterator[tuple[Session, Upload]]:
        """The claimed row, locked, if this claim still holds its lease; commits on exit."""
        with self._sessions() as session:
            row = session.get_one(Upload, claim.id, with_for_update=True)
            if row.lease_owner != claim.lease or row.state != State.QUEUED:
                raise LeaseLost(f"receipt={claim.receipt}: lease lost, now {row.state}")
            yield session, row
            row.lease_owner = row.lease_until = None
            session.commit()

    async def keep(self, claim: Claim) -> None:
        """Renew the lease while a long delivery runs, so no other worker takes the row."""
        while True:
            await asyncio.sleep(self._settings.forward_lease_seconds / 3)
            await asyncio.to_thread(self._renew, claim)

    def _renew(self, claim: Claim) -> None:
        with self._sessions() as session:
            row = session.get_one(Upload, claim.id, with_for_update=True)
            if row.lease_owner == claim.lease:
                lease = self._settings.forward_lease_seconds
                row.lease_until = utcnow() + timedelta(seconds=lease)
                session.commit()

    def is_dead(self, lease: str) -> bool:
        """A lease taken on this host by a process that no longer runs (or by our own pid,
        reused after a restart: this process has claimed nothing yet)."""
        owner = lease.split("/", 1)[0]
        host, _, pid_text = owner.rpartition(":")
        if host != self.owner.rpartition(":")[0] or not pid_text.isdigit():
            return False
        pid = int(pid_text)
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return _is_zombie(pid)

    def release_own(self) -> int:
        """Free this process's leases as it stops (its deliveries were cancelled), so the
        next forwarder need not wait for them to run out, nor for this pid to be reaped."""
        with self._sessions() as session:
            released = session.scalars(
                update(Upload)
                .where(
                    Upload.state == State.QUEUED,
                    Upload.lease_owner.startswith(f"{self.owner}/", autoescape=True),
                )
                .values(lease_owner=None, lease_until=None)
                .returning(Upload.id)
            ).all()
            session.commit()
        return len(released)

    def release_dead(self) -> int:
        """Free the leases of this host's processes that no longer run, at once rather
        than when they run out. The service calls it when its forwarder process died;
        never while this object itself delivers (its own pid counts as dead)."""
        with self._sessions() as session:
            released = self.release_dead_in(session)
            session.commit()
        return released

    def release_dead_in(self, session: Session) -> int:
        leased = select(Upload).where(
            Upload.state == State.QUEUED, Upload.lease_owner.is_not(None), OURS
        )
        released = 0
        for row in session.scalars(leased, {"node": self._spool.node}):
            if row.lease_owner and self.is_dead(row.lease_owner):
                # Claimed by a process on this host that died (SIGKILL, crash): no need
                # to wait for the lease to run out.
                row.lease_owner = row.lease_until = None
                released += 1
        return released
