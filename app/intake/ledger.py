"""The intake log's rows of uploads, as the pipeline writes them: the ledger.

An accepted file becomes one row in one transaction (``Ledger.record``): the site's own
earlier rows of the same Orthanc instance and the study's owner decide whether it is
``queued``, a ``duplicate`` or ``quarantined`` (``_place``, the rules of
docs/ARCHITECTURE.md "Identity"), and the site's stored bytes and further instances are
counted against its limits in the same transaction, so nothing uncommitted is counted.
A commit whose answer was lost is looked up again (``_committed``) before the site is
told anything. Refusals become ``rejected`` rows (``rejected_row``, ``save_rejections``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, cast

from sqlalchemy import Table, bindparam, or_, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app import logs
from app.access import quotas
from app.access.sites import AuthenticatedSite
from app.db.models import FOREIGN_STUDY, State, Upload, utcnow
from app.dicom.summary import OrthancIds, Summary, orthanc_ids
from app.errors import IntakeError, ServiceUnavailable
from app.intake.spool import QUARANTINE, QUEUE, Received, Spool
from app.orthanc_status import Status
from app.settings import Settings

log = logging.getLogger(__name__)

# The hot path's statements, built once and in Core: the ORM's bulk-insert machinery and
# building a statement per upload were most of the row writing's CPU (docs/PERFORMANCE.md).
_UPLOADS = cast(Table, Upload.__table__)
_INSERT = _UPLOADS.insert().returning(_UPLOADS.c.id)
# Identity is Orthanc's: an instance is its Orthanc ID (PatientID, Study, Series and SOP
# Instance UIDs), never the SOP Instance UID alone, and a site's answers depend on its own
# uploads only: another site's rows never make an upload a duplicate or a conflict.
_PRIOR = (
    select(_UPLOADS.c.id, _UPLOADS.c.sha256, _UPLOADS.c.state, _UPLOADS.c.reason)
    .where(
        _UPLOADS.c.orthanc_instance_id == bindparam("instance"),
        _UPLOADS.c.site_id == bindparam("site"),
        _UPLOADS.c.state.in_([State.QUEUED, State.FORWARDED, State.QUARANTINED]),
        # A row whose file was lost holds no copy: a resend is the copy.
        or_(_UPLOADS.c.reason.is_(None), _UPLOADS.c.reason != "spool_file_missing"),
    )
    .order_by(_UPLOADS.c.id)
)
# The site whose upload first opened an Orthanc study: its owner (INTAKE_SHARED_STUDIES).
# Held foreign instances own nothing, so a site that injects first cannot lock one out
# for good: its instances wait in quarantine like anyone's.
_OWNER = (
    select(_UPLOADS.c.site_id)
    .where(
        _UPLOADS.c.orthanc_study_id == bindparam("study"),
        _UPLOADS.c.state.in_([State.QUEUED, State.FORWARDED, State.DUPLICATE, State.QUARANTINED]),
        or_(_UPLOADS.c.reason.is_(None), _UPLOADS.c.reason != FOREIGN_STUDY),
    )
    .order_by(_UPLOADS.c.id)
    .limit(1)
)
# PostgreSQL: uploads into one study take turns deciding (SQLite's writers always do).
_STUDY_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(:study, 0))")

_MODALITY_WIDTH = 16  # models.Upload.modality


def _summary_columns(summary: Summary) -> dict[str, str | list[str] | None]:
    """The upload row's columns that come from the validated file's summary."""
    return {
        "sop_class_uid": summary.sop_class_uid,
        "sop_instance_uid": summary.sop_instance_uid,
        "series_instance_uid": summary.series_instance_uid,
        "study_instance_uid": summary.study_instance_uid,
        "patient_id": summary.patient_id,
        "transfer_syntax_uid": summary.transfer_syntax_uid,
        # A Modality is CS, 16 characters; Orthanc takes longer ones, and so does the
        # intake: the file goes on unchanged, the row keeps what its column holds.
        "modality": summary.modality[:_MODALITY_WIDTH] if summary.modality else None,
        "warnings": list(summary.warnings) or None,
    }


@dataclass(frozen=True)
class Receipt:
    """What the site is told about an accepted upload."""

    upload_id: int
    receipt: str
    state: State
    status: str  # Orthanc's word for it: Success, AlreadyStored, or FilteredOut (held)
    ids: OrthancIds
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    reason: str | None = None  # a quarantine's (conflict, foreign_study)


@dataclass(frozen=True)
class Arrival:
    """One file as it arrived: whose, from where, under which receipt, and when."""

    site: AuthenticatedSite
    remote_addr: str | None
    receipt: str
    received_at: datetime
    extra_instance: bool = False  # not the request's first: quotas.take_stored counts it
    expected_study: str | None = None  # STOW-RS /studies/{uid}


@dataclass(frozen=True)
class _Placement:
    """Where one accepted file goes, decided from the site's own rows of its instance."""

    state: State
    status: str  # what the site is told, in Orthanc's words
    reason: str | None = None  # a quarantine's
    duplicate_of: int | None = None
    other: int | None = None  # the upload whose copy a conflict collides with


def _place(prior: Any, sha256: str, owner: int | None, site_id: int) -> _Placement:
    """The rules of docs/ARCHITECTURE.md ("Identity"), as one decision.

    ``prior`` are this site's rows of the same Orthanc instance; ``owner`` the site that
    opened the instance's Orthanc study (None: nobody, or shared studies allowed).
    """
    same = next((p for p in prior if p.sha256 == sha256), None)
    if same is not None:
        # The same bytes again. "Stored" only if that copy is in Orthanc or on its way
        # (queued, forwarded, or a conflict: Orthanc holds the site's first copy).
        held = same.state == State.QUARANTINED and same.reason != "conflict"
        status = Status.FILTERED_OUT if held else Status.ALREADY_STORED
        return _Placement(State.DUPLICATE, status, duplicate_of=same.id)
    if owner is not None and owner != site_id:
        return _Placement(State.QUARANTINED, Status.FILTERED_OUT, FOREIGN_STUDY)
    other = next((p for p in prior if p.state != State.QUARANTINED), None)
    if other is not None:  # other bytes under an Orthanc ID the site already sent
        return _Placement(State.QUARANTINED, Status.ALREADY_STORED, "conflict", other=other.id)
    return _Placement(State.QUEUED, Status.SUCCESS)


def _held_detail(placed: _Placement, summary: Summary, ids: OrthancIds) -> str:
    if placed.reason == FOREIGN_STUDY:
        return (
            f"study {summary.study_instance_uid} (Orthanc study {ids.study}) was opened by "
            "another site's upload; held until an admin releases it (INTAKE_SHARED_STUDIES)"
        )
    return (
        f"instance {ids.instance} (SOP Instance UID {summary.sop_instance_uid}) was already "
        f"received from this site with other bytes (upload #{placed.other}); Orthanc keeps "
        "the first copy and ignores this one"
    )


class Ledger:
    """Writes the upload rows: one per accepted file, one per refusal; never an answer
    without its committed row. Runs in worker threads (its methods block)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], spool: Spool) -> None:
        self._settings = settings
        self._sessions = sessions
        self._spool = spool
        self._lock_studies = settings.database_url.startswith("postgresql")

    def record(self, ctx: Arrival, received: Received, summary: Summary) -> Receipt:
        """The accepted file's row, committed; the file moved to queue/ (or quarantine/)."""
        ids = orthanc_ids(
            summary.patient_id,
            summary.study_instance_uid,
            summary.series_instance_uid,
            summary.sop_instance_uid,
        )
        row: dict[str, Any] = {
            "receipt": ctx.receipt,
            "request_id": logs.request_id.get(),
            "node": self._spool.node,
            "site_id": ctx.site.site_id,
            "remote_addr": ctx.remote_addr,
            "received_at": ctx.received_at,
            "byte_size": received.byte_size,
            "sha256": received.sha256,
            **_summary_columns(summary),
            "orthanc_instance_id": ids.instance,
            "orthanc_series_id": ids.series,
            "orthanc_study_id": ids.study,
            "orthanc_patient_id": ids.patient,
            "attempts": 0,
            "failed_answers": 0,
        }
        placed = _Placement(State.QUEUED, Status.SUCCESS)
        kept: Path | None = None
        name = f"{ctx.receipt}.dcm"
        committing = False  # only an error during COMMIT leaves the outcome in doubt
        try:
            # Durable in queue/ (rename + folder fsync) before the transaction, not inside
            # it: the fsync would hold SQLite's single write lock, and every other upload
            # and delivery would wait for it. The rare duplicate or conflict moves it on.
            kept = self._spool.keep(received.path, QUEUE, name)
            with self._sessions() as session:
                if self._lock_studies:
                    session.execute(_STUDY_LOCK, {"study": ids.study})
                prior = session.execute(
                    _PRIOR, {"instance": ids.instance, "site": ctx.site.site_id}
                ).all()
                # In this transaction: no commit, no count.
                quotas.take_stored(
                    session, ctx.site, received.byte_size, ctx.extra_instance, utcnow()
                )
                owner = None
                if not self._settings.shared_studies:
                    owner = session.execute(_OWNER, {"study": ids.study}).scalar()
                placed = _place(prior, received.sha256, owner, ctx.site.site_id)
                state = placed.state
                row["duplicate_of_id"] = placed.duplicate_of
                if placed.reason is not None:
                    row["reason"] = placed.reason
                    row["detail"] = _held_detail(placed, summary, ids)
                if state is State.QUEUED:
                    row["next_attempt_at"] = utcnow()
                if state is not State.DUPLICATE:
                    row["spool_name"] = name
                if state is State.QUARANTINED:
                    kept = self._spool.keep(kept, QUARANTINE, name)
                upload_id = session.execute(_INSERT, {**row, "state": state}).scalar_one()
                committing = True
                session.commit()
        except IntakeError:
            self._spool.discard(kept or received.path)
            raise
        except SQLAlchemyError as exc:
            log.error("database error while recording receipt=%s: %s", ctx.receipt, exc)
            committed = self._committed(ctx.receipt) if committing else False
            if committed is None:
                # The commit may have happened (its answer was lost) and the database
                # cannot tell now: keep the file, so a row that exists keeps its copy.
                # Start-up removes it later if no row holds it (ORPHAN_GRACE_SECONDS).
                log.warning("receipt=%s: commit outcome unknown; its file is kept", ctx.receipt)
            elif committed:
                # The commit happened; only its acknowledgement was lost.
                log.warning("receipt=%s: the commit happened after all", ctx.receipt)
                if placed.state is State.DUPLICATE and kept is not None:
                    self._spool.discard(kept)
                return self._receipt(ctx, committed, placed, ids, summary)
            else:  # no committed row, so no acknowledgement: take the file back out
                self._spool.discard(kept or received.path)
            raise ServiceUnavailable("the intake database is unavailable; try again") from exc
        except BaseException:
            self._spool.discard(kept or received.path)
            raise
        if placed.state is State.DUPLICATE:
            self._spool.discard(kept)
        return self._receipt(ctx, upload_id, placed, ids, summary)

    @staticmethod
    def _receipt(
        ctx: Arrival,
        upload_id: int,
        placed: _Placement,
        ids: OrthancIds,
        summary: Summary,
    ) -> Receipt:
        return Receipt(
            upload_id=upload_id,
            receipt=ctx.receipt,
            state=placed.state,
            status=placed.status,
            ids=ids,
            sop_class_uid=summary.sop_class_uid,
            sop_instance_uid=summary.sop_instance_uid,
            reason=placed.reason,
        )

    def _committed(self, receipt: str) -> int | Literal[False] | None:
        """After a failed commit: the row's id if it was committed after all, False if it
        was not, None if the database cannot tell now (a lost answer to ``COMMIT``)."""
        try:
            with self._sessions() as session:
                found = session.scalar(select(Upload.id).where(Upload.receipt == receipt))
        except SQLAlchemyError:
            return None
        return False if found is None else found

    @staticmethod
    def rejected_row(
        ctx: Arrival,
        received: Received | None,
        error: IntakeError,
        summary: Summary | None = None,
        note: str | None = None,
    ) -> Upload:
        """A `rejected` row; with the file's UIDs when it was refused after validation."""
        return Upload(
            **(_summary_columns(summary) if summary is not None else {}),
            receipt=ctx.receipt,
            request_id=logs.request_id.get(),
            site_id=ctx.site.site_id,
            remote_addr=ctx.remote_addr,
            received_at=ctx.received_at,
            byte_size=received.byte_size if received else 0,
            sha256=received.sha256 if received else None,
            state=State.REJECTED,
            reason=error.reason,
            detail=(f"{note}: {error.detail}" if note else error.detail)[:2000],
            attempts=0,
            failed_answers=0,
        )

    def save_rejections(self, rows: list[Upload]) -> None:
        """Refusals are recorded, in one transaction however many; never fatal."""
        if not rows:
            return
        try:
            with self._sessions() as session:
                session.add_all(rows)
                session.commit()
        except SQLAlchemyError as exc:
            receipts = ", ".join(row.receipt for row in rows[:5])
            log.error("could not record %d refusal(s) (%s): %s", len(rows), receipts, exc)
