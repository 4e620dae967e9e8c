"""Start-up recovery of the spool and the queue, before the forwarder's first claim.

Half-received files and orphans (a file no row needs) are removed once older than
``orphan_grace_seconds`` (another process may be between rename and commit); a file
whose row was quarantined moves to quarantine/; the leases of this host's dead processes
are freed; a queued row whose file is gone is quarantined as ``spool_file_missing``.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import State, Upload
from app.forwarding.leases import OURS, Leases
from app.intake.spool import QUARANTINE, QUEUE, Spool
from app.metrics import Metrics
from app.settings import Settings

log = logging.getLogger(__name__)


def recover(
    settings: Settings,
    sessions: sessionmaker[Session],
    spool: Spool,
    leases: Leases,
    metrics: Metrics,
) -> None:
    """At start-up: drop half-received files and orphans; flag rows that lost their file."""
    now = time.time()
    grace = settings.orphan_grace_seconds
    lost: list[int] = []
    for leftover in (spool.root / "tmp").glob("*.part"):
        if now - leftover.stat().st_mtime >= grace:
            spool.discard(leftover)
    with sessions() as session:
        for file in (spool.root / QUEUE).glob("*.dcm"):
            state = session.scalar(select(Upload.state).where(Upload.receipt == file.stem))
            if state == State.QUARANTINED:
                spool.keep(file, QUARANTINE, file.name)  # an admin may still want it
                continue
            # No row yet may mean another process is between rename and commit.
            orphan = state is None and now - file.stat().st_mtime >= grace
            if orphan or (state is not None and state != State.QUEUED):
                log.warning("removing spool file %s: no queued upload needs it", file.name)
                spool.discard(file)
        leases.release_dead_in(session)
        queued = select(Upload).where(Upload.state == State.QUEUED, OURS)
        for row in session.scalars(queued, {"node": spool.node}):
            if not spool.path(QUEUE, row.spool_name or "").is_file():
                row.state = State.QUARANTINED
                row.reason = "spool_file_missing"
                row.detail = f"the spool file {row.spool_name} was missing at start-up"
                lost.append(row.site_id)
                log.error("receipt=%s lost its spool file; quarantined", row.receipt)
        session.commit()
    for site_id in lost:
        metrics.record_quarantine(site_id, "spool_file_missing")
