"""The upload pipeline: receive → validate → persist → enqueue. No web framework here.

Every way in uses it: a raw body (``receive``), a ZIP archive found in one (its
entries, in archive order), and multipart bodies (``receive_multipart``: legacy
form uploads and DICOMweb STOW-RS). Each file then takes the same steps in
``_accept``. A file ends in exactly one of these, before the site gets an answer:
- refused (an IntakeError is raised; a ``rejected`` row records why);
- ``queued``: the file is durable in the spool and its row committed;
- ``duplicate``: the same SOP instance with the same bytes was already taken;
- ``quarantined`` as a conflict: same SOP Instance UID, different bytes. Orthanc
  would keep its first copy and silently ignore this one, so it is kept here for
  an admin instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
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
from app.dicom.validation import Validator
from app.errors import (
    ArchiveTooLarge,
    DicomdirNotAnInstance,
    InstanceTooLarge,
    IntakeError,
    NotDicom,
    Refused,
    RefusedPreamble,
    ServiceUnavailable,
    SpoolFull,
    StudyMismatch,
    TooManyRequests,
)
from app.intake import archive, multipart
from app.intake.spool import QUARANTINE, QUEUE, REFUSED, Received, Spool
from app.metrics import Metrics
from app.orthanc_status import Status
from app.settings import Settings

log = logging.getLogger(__name__)

# The hot path's statements, built once and in Core: the ORM's bulk-insert machinery and
# building a statement per upload were most of _persist's CPU (docs/PERFORMANCE.md).
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
class Refusal:
    """A file that was not taken, and why (its UIDs when it was refused after validation)."""

    error: IntakeError
    receipt: str
    summary: Summary | None = None


@dataclass(frozen=True)
class Item:
    """One file of a many-file upload: a ZIP entry or a multipart part, in body order."""

    name: str | None
    outcome: Receipt | Refusal


@dataclass(frozen=True)
class Batch:
    """The files of one archive or multipart upload; ``skipped`` are what Orthanc skips."""

    items: list[Item]
    skipped: list[tuple[str, str]]  # (entry name, reason): non-DICOM entries, DICOMDIRs

    @property
    def accepted(self) -> int:
        return sum(isinstance(item.outcome, Receipt) for item in self.items)


@dataclass(frozen=True)
class _Context:
    site: AuthenticatedSite
    remote_addr: str | None
    receipt: str
    received_at: datetime
    extra_instance: bool = False  # not the request's first: counted against the rate here
    expected_study: str | None = None  # STOW-RS /studies/{uid}


# Errors that say "later", not "never": once one hits, the rest of a batch gets it too.
_TRY_LATER = (TooManyRequests, ServiceUnavailable, SpoolFull)


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


class Intake:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        spool: Spool,
        validator: Validator,
        on_queued: Callable[[], None] = lambda: None,
        metrics: Metrics | None = None,
    ) -> None:
        self._admission = quotas.Admission(sessions, settings.upload_slot_ttl_seconds)
        self._settings = settings
        self._sessions = sessions
        self._spool = spool
        self._validator = validator
        self._on_queued = on_queued
        self._metrics = metrics or Metrics()
        self._lock_studies = settings.database_url.startswith("postgresql")

    async def receive(
        self,
        site: AuthenticatedSite,
        remote_addr: str | None,
        body: AsyncIterator[bytes],
        content_encoding: str | None = None,
        declared_bytes: int | None = None,
    ) -> Receipt | Batch:
        """One raw body: an instance (refused with an IntakeError) or a ZIP archive."""
        max_bytes = site.policy.max_bytes(self._settings.max_instance_bytes)
        async with self._admitted(site, declared_bytes, max_bytes):
            received = await self._spool.receive(
                body,
                max_bytes=max_bytes,
                content_encoding=content_encoding,
                idle_timeout=self._settings.body_idle_timeout_seconds,
                min_rate=self._settings.body_min_rate_bytes_per_second,
                max_archive_bytes=self._settings.max_request_bytes,
            )
            self._metrics.record_bytes(site.name, received.byte_size)
            if received.archive:
                return await self._unpack_all(site, remote_addr, [(None, received)])
            outcome = await self._accept(self._context(site, remote_addr), received)
            if isinstance(outcome, Refusal):
                raise Refused(outcome.error, counted=True)
            return outcome

    async def receive_multipart(
        self,
        site: AuthenticatedSite,
        remote_addr: str | None,
        body: AsyncIterator[bytes],
        boundary: str,
        keep: multipart.Keep,
        *,
        archives: bool,
        content_encoding: str | None = None,
        declared_bytes: int | None = None,
        expected_study: str | None = None,
    ) -> tuple[Batch, list[multipart.Part]]:
        """A multipart body: each kept part (or, with ``archives``, each ZIP's entries).

        Also returns the parts that were not kept, for the protocol to report.
        """
        max_bytes = site.policy.max_bytes(self._settings.max_instance_bytes)
        async with self._admitted(site, declared_bytes, max_bytes):
            received = await multipart.receive(
                self._spool,
                body,
                boundary,
                limits=multipart.Limits(
                    max_parts=self._settings.max_files_per_request,
                    max_part_bytes=max_bytes,
                    max_archive_bytes=self._settings.max_request_bytes if archives else None,
                    max_body_bytes=self._settings.max_request_bytes,
                ),
                keep=keep,
                content_encoding=content_encoding,
                idle_timeout=self._settings.body_idle_timeout_seconds,
                min_rate=self._settings.body_min_rate_bytes_per_second,
            )
            files = [(p.filename, p.file) for p in received if p.file is not None]
            for _, file in files:
                self._metrics.record_bytes(site.name, file.byte_size)
            batch = await self._unpack_all(site, remote_addr, files, expected_study)
            return batch, [p for p in received if p.file is None]

    @contextlib.asynccontextmanager
    async def _admitted(
        self, site: AuthenticatedSite, declared_bytes: int | None, max_bytes: int
    ) -> AsyncIterator[None]:
        """The site's limits around one request; request-level refusals are counted here,
        and so is a ``Refused`` outcome that its file's own path did not count."""
        started = time.perf_counter()
        limit = max(max_bytes, self._settings.max_request_bytes)
        try:
            if declared_bytes is not None and declared_bytes > limit:
                raise InstanceTooLarge(
                    f"Content-Length {declared_bytes} is over the limit of {limit} bytes"
                )
            async with self._admission.admit(site, declared_bytes):
                yield
        except Refused as refused:
            if not refused.counted:
                self._metrics.record_refusal(
                    site.name, refused.error.reason, time.perf_counter() - started
                )
            raise
        except IntakeError as exc:
            self._metrics.record_refusal(site.name, exc.reason, time.perf_counter() - started)
            raise

    def _context(
        self,
        site: AuthenticatedSite,
        remote_addr: str | None,
        *,
        extra_instance: bool = False,
        expected_study: str | None = None,
    ) -> _Context:
        return _Context(
            site, remote_addr, uuid.uuid4().hex, utcnow(), extra_instance, expected_study
        )

    async def _unpack_all(
        self,
        site: AuthenticatedSite,
        remote_addr: str | None,
        files: list[tuple[str | None, Received]],
        expected_study: str | None = None,
    ) -> Batch:
        """Each file through the pipeline in order; a ZIP's entries in archive order."""
        batch = Batch([], [])
        later: IntakeError | None = None  # a "try later" refusal ends the batch
        try:
            if len(files) > 1 and any(received.archive for _, received in files):
                await self._survey(site, remote_addr, files)
            for name, received in files:
                if later is not None:
                    self._spool.discard(received.path)
                    batch.items.append(Item(name, Refusal(later, uuid.uuid4().hex)))
                elif received.archive:
                    later = await self._unpack(site, remote_addr, name, received, batch)
                else:
                    ctx = self._context(
                        site,
                        remote_addr,
                        extra_instance=bool(batch.items),
                        expected_study=expected_study,
                    )
                    outcome = await self._accept(ctx, received)
                    batch.items.append(Item(name, outcome))
                    if isinstance(outcome, Refusal) and isinstance(outcome.error, _TRY_LATER):
                        later = outcome.error
        finally:
            for _, received in files:
                self._spool.discard(received.path)
        if later is not None and not batch.accepted:
            # Nothing was taken: the whole request is to be sent again later.
            raise Refused(later, counted=True)
        return batch

    def _archive_limits(
        self, site: AuthenticatedSite, used_files: int = 0, used_bytes: int = 0
    ) -> archive.Limits:
        """An archive's caps: the request's, less what its other files already took."""
        return archive.Limits(
            max_entries=self._settings.max_files_per_request - used_files,
            max_inflated_bytes=self._settings.max_archive_inflated_bytes - used_bytes,
            max_ratio=self._settings.max_archive_ratio,
            max_entry_bytes=site.policy.max_bytes(self._settings.max_instance_bytes),
        )

    async def _survey(
        self,
        site: AuthenticatedSite,
        remote_addr: str | None,
        files: list[tuple[str | None, Received]],
    ) -> None:
        """The request's file and inflated-size caps across all its parts and archives,
        checked from the central directories before anything of the request is stored."""
        cap = self._settings.max_files_per_request
        used_files = used_bytes = 0
        for name, received in files:
            try:
                if not received.archive:
                    used_files += 1
                    if used_files > cap:
                        raise ArchiveTooLarge(f"the request holds more than {cap} files")
                    continue
                limits = self._archive_limits(site, used_files, used_bytes)
                with await asyncio.to_thread(archive.Archive, received.path, limits) as opened:
                    used_files += len(opened.entries)
                    used_bytes += sum(entry.size for entry in opened.entries)
            except IntakeError as exc:
                if isinstance(exc, ArchiveTooLarge):
                    exc = ArchiveTooLarge(
                        f"{exc.detail}: its parts and the entries of its archives count "
                        f"together (INTAKE_MAX_FILES_PER_REQUEST={cap}, "
                        "INTAKE_MAX_ARCHIVE_INFLATED_BYTES="
                        f"{self._settings.max_archive_inflated_bytes})"
                    )
                await self._refuse(self._context(site, remote_addr), received, exc, note=name)
                raise Refused(exc, counted=False) from None

    async def _unpack(
        self,
        site: AuthenticatedSite,
        remote_addr: str | None,
        name: str | None,
        received: Received,
        batch: Batch,
    ) -> IntakeError | None:
        """One ZIP archive's entries into ``batch``; a "try later" error if one stopped it."""
        try:
            opened = await asyncio.to_thread(
                archive.Archive, received.path, self._archive_limits(site)
            )
        except IntakeError as exc:
            await self._refuse(self._context(site, remote_addr), received, exc, note=name)
            raise Refused(exc, counted=False) from exc
        skips: list[Upload] = []  # an archive's skipped entries: one transaction, not one each
        with opened:
            try:
                return await self._unpack_entries(site, remote_addr, opened, batch, skips)
            finally:
                await asyncio.to_thread(self._save_rejections, skips)

    async def _unpack_entries(
        self,
        site: AuthenticatedSite,
        remote_addr: str | None,
        opened: archive.Archive,
        batch: Batch,
        skips: list[Upload],
    ) -> IntakeError | None:
        """The entries in archive order; a "try later" error if one stopped the rest."""
        later: IntakeError | None = None
        for entry in opened.entries:
            if later is not None:  # not opened: the site sends the archive again later
                batch.items.append(Item(entry.name, Refusal(later, uuid.uuid4().hex)))
                continue
            ctx = self._context(site, remote_addr, extra_instance=bool(batch.items))
            try:
                part = await asyncio.to_thread(opened.extract, entry, self._spool)
            except archive.Skipped as skip:
                batch.skipped.append((entry.name, skip.reason))
                # Recorded as a refusal of that entry; the answer leaves it out, as Orthanc.
                error = DicomdirNotAnInstance if skip.reason == "dicomdir" else NotDicom
                await self._refuse(ctx, None, error(f"skipped: {skip.detail}"), batch=skips)
                continue
            except IntakeError as exc:
                await self._refuse(ctx, None, exc, note=entry.name)
                self._metrics.record_refusal(site.name, exc.reason, 0.0)
                batch.items.append(Item(entry.name, Refusal(exc, ctx.receipt)))
                later = exc if isinstance(exc, _TRY_LATER) else None
                continue
            outcome = await self._accept(ctx, part)
            if isinstance(outcome, Refusal) and isinstance(outcome.error, DicomdirNotAnInstance):
                batch.skipped.append((entry.name, outcome.error.reason))
                continue
            batch.items.append(Item(entry.name, outcome))
            if isinstance(outcome, Refusal) and isinstance(outcome.error, _TRY_LATER):
                later = outcome.error
        return later

    async def _accept(self, ctx: _Context, received: Received) -> Receipt | Refusal:
        """validate → policy → persist one received file; it is consumed either way."""
        started = time.perf_counter()
        site = ctx.site
        parsed: Summary | None = None  # known once validation passed
        try:
            if received.executable_preamble is not None:
                self._spool.keep(received.path, REFUSED, f"{ctx.receipt}.bin")
                log.warning(
                    "security: site=%s remote=%s receipt=%s sent an executable preamble (%s); "
                    "kept under refused/",
                    site.name,
                    ctx.remote_addr,
                    ctx.receipt,
                    received.executable_preamble,
                )
                raise RefusedPreamble(
                    f"the 128-byte preamble holds an executable header "
                    f"({received.executable_preamble}); such files are refused (CVE-2019-11687)"
                )
            summary = await self._validator.validate(received.path)
            parsed = summary
            site.policy.check_content(site.name, summary)
            if ctx.expected_study is not None and summary.study_instance_uid != (
                ctx.expected_study
            ):
                raise StudyMismatch(
                    f"the instance belongs to study {summary.study_instance_uid}, not to "
                    f"{ctx.expected_study} named in the URL"
                )
            result = await asyncio.to_thread(self._persist, ctx, received, summary)
        except IntakeError as exc:
            self._spool.discard(received.path)
            await self._refuse(ctx, received, exc, summary=parsed)
            self._metrics.record_refusal(site.name, exc.reason, time.perf_counter() - started)
            return Refusal(exc, ctx.receipt, parsed)
        except BaseException:
            self._spool.discard(received.path)
            raise
        if result.state is State.QUEUED:
            self._on_queued()
        self._metrics.record_upload(site.name, result.state, time.perf_counter() - started)
        latency_ms = round((time.perf_counter() - started) * 1000, 1)
        log.info(
            "upload site=%s receipt=%s sop=%s study=%s bytes=%d state=%s ms=%.1f",
            site.name,
            ctx.receipt,
            summary.sop_instance_uid,
            summary.study_instance_uid,
            received.byte_size,
            result.state.value,
            latency_ms,
            extra={  # the upload event (app/logs.py): UIDs, never patient identifiers
                "event": "upload",
                "site": site.name,
                "receipt": ctx.receipt,
                "sop_instance_uid": summary.sop_instance_uid,
                "series_instance_uid": summary.series_instance_uid,
                "study_instance_uid": summary.study_instance_uid,
                "sop_class_uid": summary.sop_class_uid,
                "bytes": received.byte_size,
                "outcome": result.state.value,
                "warnings": list(summary.warnings) or None,
                "latency_ms": latency_ms,
            },
        )
        return result

    async def _refuse(
        self,
        ctx: _Context,
        received: Received | None,
        exc: IntakeError,
        *,
        summary: Summary | None = None,
        note: str | None = None,
        batch: list[Upload] | None = None,
    ) -> None:
        """Log a refusal and keep a ``rejected`` row of it (not for "try later" errors):
        now, or appended to ``batch`` for its caller to save with others in one go."""
        if not isinstance(exc, ServiceUnavailable | TooManyRequests):
            row = self._rejected_row(ctx, received, exc, summary, note)
            if batch is not None:
                batch.append(row)
            else:
                await asyncio.to_thread(self._save_rejections, [row])
        log.info(
            "upload refused site=%s receipt=%s reason=%s detail=%s",
            ctx.site.name,
            ctx.receipt,
            exc.reason,
            exc.detail,
            extra={
                "event": "upload",
                "site": ctx.site.name,
                "receipt": ctx.receipt,
                "sop_instance_uid": summary.sop_instance_uid if summary else None,
                "study_instance_uid": summary.study_instance_uid if summary else None,
                "bytes": received.byte_size if received else None,
                "outcome": "rejected",
                "reason": exc.reason,
                "status": exc.status_code,
            },
        )

    def _persist(self, ctx: _Context, received: Received, summary: Summary) -> Receipt:
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
                quota = ctx.site.policy.bytes_per_day
                if quota is not None:  # counted in this transaction: no commit, no count
                    quotas.take_bytes(
                        session, ctx.site.site_id, quota, received.byte_size, utcnow()
                    )
                rate = ctx.site.policy.instances_per_minute
                if ctx.extra_instance and rate is not None:
                    # Admission counted the request's first instance; the others count here.
                    quotas.take_instance(session, ctx.site.site_id, rate, utcnow())
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
        ctx: _Context,
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

    def _rejected_row(
        self,
        ctx: _Context,
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

    def _save_rejections(self, rows: list[Upload]) -> None:
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
