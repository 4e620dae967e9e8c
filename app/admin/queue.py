"""The backlog: queued and quarantined uploads, and what an admin may do with them.

Every transition (retry, make due, discard) runs in one transaction that locks the
row and re-checks its state, so an admin racing the forwarder or another admin
changes nothing behind their back. A file is moved before the commit that records
the move (and moved back if that commit fails); a file is removed only after the
commit that records the discard. No web framework here; the dataclasses are the
admin API's answers as they are (pydantic ``Field`` only documents them in OpenAPI).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, BinaryIO

from pydantic import Field
from sqlalchemy import Select, select
from sqlalchemy.orm import Session, aliased, sessionmaker

from app.db.models import Site, State, Upload, utcnow
from app.errors import (
    BadRequest,
    BeingForwarded,
    ConflictNotRetryable,
    HeldByAnotherNode,
    IntakeError,
    NotFound,
    NothingToRetry,
    WrongState,
)
from app.intake.spool import QUARANTINE, QUEUE, Spool

log = logging.getLogger(__name__)

MAX_PAGE = 500
LISTED = (State.QUEUED, State.QUARANTINED)
_MADE_DUE = "made due now by admin"
_LAST_ERROR = "; last error: "


@dataclass(frozen=True)
class QueueItem:
    """A queued or quarantined upload as an admin sees it."""

    id: int
    receipt: str
    site: str
    state: str
    reason: str | None
    detail: str | None
    attempts: int
    failed_answers: Annotated[int, Field(description="Error answers from Orthanc (5xx) so far")]
    next_attempt_at: datetime | None
    lease_until: Annotated[
        datetime | None, Field(description="Set while the forwarder delivers it")
    ]
    received_at: datetime
    byte_size: int
    sha256: str | None
    sop_instance_uid: str | None
    series_instance_uid: str | None
    study_instance_uid: str | None
    discarded_at: datetime | None
    has_file: Annotated[bool, Field(description="The spool still holds its bytes")]


@dataclass(frozen=True)
class QueuePage:
    items: list[QueueItem]
    next_cursor: int | None


@dataclass(frozen=True)
class Counterpart:
    """The upload a conflict collides with: Orthanc holds (or will hold) its bytes."""

    id: int
    sha256: str | None
    state: str
    received_at: datetime
    orthanc_instance_id: str | None


@dataclass(frozen=True)
class ConflictItem:
    upload: QueueItem
    conflicts_with: Annotated[
        Counterpart | None,
        Field(
            description="The forwarded or queued upload with the same SOP Instance UID; "
            "null when Orthanc's copy came from elsewhere"
        ),
    ]


@dataclass(frozen=True)
class ConflictPage:
    items: list[ConflictItem]
    next_cursor: int | None


@dataclass(frozen=True)
class RetryCount:
    requeued: int  # quarantined → queued
    made_due: int  # queued in back-off → due now
    skipped: int  # conflicts, lost files, rows being forwarded or changed meanwhile


@dataclass(frozen=True)
class KeptFile:
    file: BinaryIO
    size: int
    name: str


class Backlog:
    """The queue and the quarantine as an admin acts on them: pages of what waits, retries
    (one upload, a study, a site), discards with a reason, and a conflict's two copies.
    Every change is one conditional UPDATE, so it never races the forwarder's lease."""

    def __init__(self, sessions: sessionmaker[Session], spool: Spool) -> None:
        self._sessions = sessions
        self._spool = spool

    # --- reading -------------------------------------------------------------------

    def page(
        self,
        state: State,
        *,
        site: str | None = None,
        reason: str | None = None,
        limit: int = 100,
        cursor: int | None = None,
    ) -> QueuePage:
        """Queued rows oldest first (delivery order), quarantined ones newest first."""
        if state not in LISTED:
            raise BadRequest(f"state must be one of {', '.join(LISTED)}")
        newest_first = state is State.QUARANTINED
        with self._sessions() as session:
            query = self._listing(session, site, newest_first, cursor).where(Upload.state == state)
            if reason is not None:
                query = query.where(Upload.reason == reason)
            rows = session.execute(query.limit(_limit(limit) + 1)).all()
        return self._page([self._item(u, name) for u, name in rows], limit)

    def conflicts(
        self, *, site: str | None = None, limit: int = 100, cursor: int | None = None
    ) -> ConflictPage:
        """Quarantined conflicts, newest first, each with the upload it collides with."""
        other = aliased(Upload)
        with self._sessions() as session:
            query = self._listing(session, site, True, cursor).where(
                Upload.state == State.QUARANTINED, Upload.reason == "conflict"
            )
            rows = session.execute(query.limit(_limit(limit) + 1)).all()
            found: list[ConflictItem] = []
            for upload, name in rows:
                counterpart = session.scalars(
                    select(other)
                    .where(
                        other.orthanc_instance_id == upload.orthanc_instance_id,
                        other.id != upload.id,
                        other.state.in_([State.FORWARDED, State.QUEUED]),
                        other.sha256 != upload.sha256,
                    )
                    .order_by(other.id)
                    .limit(1)
                ).first()
                found.append(ConflictItem(self._item(upload, name), _counterpart(counterpart)))
        more = len(found) > _limit(limit)
        found = found[: _limit(limit)]
        return ConflictPage(found, found[-1].upload.id if more and found else None)

    def open_file(self, upload_id: int) -> KeptFile:
        """The kept spool file of a quarantined upload, opened (a discard may follow)."""
        with self._sessions() as session:
            row = _get(session, upload_id)
            if row.state != State.QUARANTINED:
                raise WrongState(
                    f"upload {upload_id} is {row.state}: only quarantined files are kept"
                )
            _here(row, self._spool)
            name = row.spool_name or ""
        try:
            file = self._spool.path(QUARANTINE, name).open("rb")
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(f"the spool file of upload {upload_id} is gone") from None
        return KeptFile(file, _size(file), name)

    # --- transitions -----------------------------------------------------------------

    def retry(self, upload_id: int, admin: str) -> QueueItem:
        """A quarantined upload goes back to the queue; a queued one is made due now."""
        with self._locked(upload_id) as (session, row):
            self._retry(session, row, admin)
            return self._item(row, row.site.name)

    def retry_study(self, site: str, study_uid: str, admin: str) -> RetryCount:
        return self._retry_many(site, study_uid, admin)

    def retry_site(self, site: str, admin: str) -> RetryCount:
        return self._retry_many(site, None, admin)

    def discard(self, upload_id: int, admin: str, reason: str) -> QueueItem:
        """Give up on a queued or quarantined upload; its file goes once that is recorded."""
        reason = reason.strip()
        if not reason:
            raise BadRequest("a discard needs a reason")
        with self._locked(upload_id) as (session, row):
            now = utcnow()
            if row.state not in LISTED:
                raise WrongState(
                    f"upload {upload_id} is {row.state}: only queued or quarantined "
                    "uploads can be discarded"
                )
            _not_leased(row, now)
            _here(row, self._spool)
            row.state = State.DISCARDED
            row.discarded_at = now
            row.reason = "discarded"
            row.detail = f"discarded by admin {admin!r}: {reason}"
            row.next_attempt_at = row.lease_owner = row.lease_until = None
            session.commit()
            if row.spool_name:
                for folder in (QUEUE, QUARANTINE):
                    self._spool.discard(self._spool.path(folder, row.spool_name))
            item = self._item(row, row.site.name)
        log.info(
            "admin %r discarded upload id=%d receipt=%s: %s", admin, row.id, row.receipt, reason
        )
        return item

    # --- helpers -----------------------------------------------------------------------

    @contextmanager
    def _locked(self, upload_id: int) -> Iterator[tuple[Session, Upload]]:
        with self._sessions() as session:
            yield session, _get(session, upload_id, lock=True)

    def _retry(self, session: Session, row: Upload, admin: str) -> str:
        """Retry one locked row and commit; answers "requeued" or "made_due"."""
        now = utcnow()
        if row.state == State.QUEUED:
            _not_leased(row, now)
            row.next_attempt_at = now
            last_error = _last_error(row.detail)
            row.detail = f"{_MADE_DUE} {admin!r}" + (
                f"{_LAST_ERROR}{last_error}" if last_error else ""
            )
            session.commit()
            log.info("admin %r made upload id=%d receipt=%s due now", admin, row.id, row.receipt)
            return "made_due"
        if row.state != State.QUARANTINED:
            raise WrongState(
                f"upload {row.id} is {row.state}: only quarantined or queued uploads can be retried"
            )
        if row.reason == "conflict":
            raise ConflictNotRetryable(
                f"upload {row.id} is a conflict: Orthanc already holds SOP instance "
                f"{row.sop_instance_uid} with other bytes and would ignore these; delete "
                "Orthanc's copy first, or discard this upload to keep Orthanc's"
            )
        _here(row, self._spool)
        name = row.spool_name or ""
        source = self._spool.path(QUARANTINE, name)
        if not source.is_file():
            # A crash between a quarantine's move and commit can leave it in queue/.
            source = self._spool.path(QUEUE, name)
            if not name or not source.is_file():
                raise NothingToRetry(f"upload {row.id}: its spool file is gone, nothing to retry")
        previous = row.reason
        target = self._spool.keep(source, QUEUE, name)
        row.state = State.QUEUED
        row.attempts = row.failed_answers = 0
        row.next_attempt_at = now
        row.lease_owner = row.lease_until = None
        row.reason = "retried"
        row.detail = f"retried by admin {admin!r} (was quarantined: {previous})"
        try:
            session.commit()
        except BaseException:
            self._spool.keep(target, QUARANTINE, name)
            raise
        log.info(
            "admin %r retried upload id=%d receipt=%s (was %s)",
            admin,
            row.id,
            row.receipt,
            previous,
        )
        return "requeued"

    def _retry_many(self, site: str, study_uid: str | None, admin: str) -> RetryCount:
        now = utcnow()
        with self._sessions() as session:
            site_id = _site_id(session, site)
            query = select(Upload.id).where(
                Upload.site_id == site_id,
                (Upload.state == State.QUARANTINED)
                | ((Upload.state == State.QUEUED) & (Upload.next_attempt_at > now)),
            )
            if study_uid is not None:
                query = query.where(Upload.study_instance_uid == study_uid)
            ids = session.scalars(query.order_by(Upload.id)).all()
        outcomes = {"requeued": 0, "made_due": 0, "skipped": 0}
        for upload_id in ids:
            with self._locked(upload_id) as (session, row):
                try:
                    outcomes[self._retry(session, row, admin)] += 1
                except IntakeError as exc:
                    outcomes["skipped"] += 1
                    log.info("retry of upload id=%d skipped: %s", upload_id, exc.detail)
        return RetryCount(**outcomes)

    def _listing(
        self, session: Session, site: str | None, newest_first: bool, cursor: int | None
    ) -> Select[Upload, str]:
        query = select(Upload, Site.name).join(Site, Site.id == Upload.site_id)
        if site is not None:
            query = query.where(Upload.site_id == _site_id(session, site))
        if cursor is not None:
            query = query.where(Upload.id < cursor if newest_first else Upload.id > cursor)
        return query.order_by(Upload.id.desc() if newest_first else Upload.id)

    def _page(self, items: list[QueueItem], limit: int) -> QueuePage:
        more = len(items) > _limit(limit)
        items = items[: _limit(limit)]
        return QueuePage(items, items[-1].id if more and items else None)

    def _item(self, row: Upload, site: str) -> QueueItem:
        folder = QUARANTINE if row.state == State.QUARANTINED else QUEUE
        kept = row.state in LISTED and bool(row.spool_name)
        return QueueItem(
            id=row.id,
            receipt=row.receipt,
            site=site,
            state=str(row.state),
            reason=row.reason,
            detail=row.detail,
            attempts=row.attempts,
            failed_answers=row.failed_answers,
            next_attempt_at=row.next_attempt_at,
            lease_until=row.lease_until,
            received_at=row.received_at,
            byte_size=row.byte_size,
            sha256=row.sha256,
            sop_instance_uid=row.sop_instance_uid,
            series_instance_uid=row.series_instance_uid,
            study_instance_uid=row.study_instance_uid,
            discarded_at=row.discarded_at,
            has_file=kept and self._spool.path(folder, row.spool_name or "").is_file(),
        )


def _last_error(detail: str | None) -> str:
    """The forwarder's last error in a detail, without earlier "made due" notes."""
    if not detail or (detail.startswith(_MADE_DUE) and _LAST_ERROR not in detail):
        return ""
    return detail.rpartition(_LAST_ERROR)[2]


def _limit(limit: int) -> int:
    return max(1, min(limit, MAX_PAGE))


def _size(file: BinaryIO) -> int:
    return os.fstat(file.fileno()).st_size


def _get(session: Session, upload_id: int, *, lock: bool = False) -> Upload:
    query = select(Upload).where(Upload.id == upload_id)
    row = session.scalars(query.with_for_update() if lock else query).first()
    if row is None:
        raise NotFound(f"no upload with id {upload_id}")
    return row


def _site_id(session: Session, name: str) -> int:
    site_id = session.scalar(select(Site.id).where(Site.name == name))
    if site_id is None:
        raise NotFound(f"no site named {name!r}")
    return site_id


def _not_leased(row: Upload, now: datetime) -> None:
    if row.lease_until is not None and row.lease_until > now:
        raise BeingForwarded(f"upload {row.id} is being forwarded, try again in a moment")


def _counterpart(row: Upload | None) -> Counterpart | None:
    if row is None:
        return None
    return Counterpart(row.id, row.sha256, str(row.state), row.received_at, row.orthanc_instance_id)


def _here(row: Upload, spool: Spool) -> None:
    """Actions on a kept file run on the node whose spool holds it."""
    if row.node is not None and row.node != spool.node:
        raise HeldByAnotherNode(
            f"upload {row.id}'s file is in the spool of node {row.node!r}, not of this one "
            f"({spool.node!r}): use that node's admin listener"
        )
