"""The upload pipeline: receive → validate → persist → enqueue. No web framework here.

Every way in uses it: a raw body (``receive``), a ZIP archive found in one (its
entries, in archive order), and multipart bodies (``receive_multipart``: legacy
form uploads and DICOMweb STOW-RS). Each file then takes the same steps in
``_accept``. A file ends in exactly one of these, before the site gets an answer:
- refused (a ``Refusal``, raised to the route as ``Refused``; a ``rejected`` row records
  why);
- ``queued``: the file is durable in the spool and its row committed;
- ``duplicate``: this site already sent the same Orthanc instance with the same bytes;
- ``quarantined``: as a ``conflict`` (the same Orthanc instance from this site with other
  bytes: Orthanc would keep its first copy and silently ignore this one), or as
  ``foreign_study`` (another site opened the study); kept for an admin either way.
Identity is Orthanc's (patient, study, series and SOP Instance UID): app/intake/ledger.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from app.access import quotas
from app.access.sites import AuthenticatedSite
from app.db.models import State, Upload, utcnow
from app.dicom.summary import Summary
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
from app.intake.ledger import Arrival, Ledger, Receipt
from app.intake.spool import REFUSED, Received, Spool
from app.metrics import Metrics
from app.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestHead:
    """What the pipeline reads of a request's head, parsed once (app/api/deps.py)."""

    client_address: str | None  # the client as the site's policy sees it (X-Forwarded-For)
    media: multipart.MediaType
    content_encoding: str | None = None
    declared_bytes: int | None = None  # Content-Length, when the client sent one


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


# Errors that say "later", not "never": once one hits, the rest of a batch gets it too.
_TRY_LATER = (TooManyRequests, ServiceUnavailable, SpoolFull)


class Intake:
    """The upload pipeline: every way in hands it a site, a request head and a body; each
    file comes out stored (a Receipt) or refused (a Refusal), with its row committed."""

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
        self._ledger = Ledger(settings, sessions, spool)

    async def receive(
        self, site: AuthenticatedSite, head: RequestHead, body: AsyncIterator[bytes]
    ) -> Receipt | Batch:
        """One raw body: an instance (a refusal raised as ``Refused``) or a ZIP archive."""
        remote_addr = head.client_address
        max_bytes = site.policy.max_bytes(self._settings.max_instance_bytes)
        async with self._admitted(site, head.declared_bytes, max_bytes):
            received = await self._spool.receive(
                body,
                max_bytes=max_bytes,
                content_encoding=head.content_encoding,
                idle_timeout=self._settings.body_idle_timeout_seconds,
                min_rate=self._settings.body_min_rate_bytes_per_second,
                max_archive_bytes=self._settings.max_request_bytes,
            )
            self._metrics.record_bytes(site.name, received.byte_size)
            if received.archive:
                return await self._unpack_all(site, remote_addr, [(None, received)])
            outcome = await self._accept(self._arrival(site, remote_addr), received)
            if isinstance(outcome, Refusal):
                raise Refused(outcome.error, counted=True)
            return outcome

    async def receive_multipart(
        self,
        site: AuthenticatedSite,
        head: RequestHead,
        body: AsyncIterator[bytes],
        keep: multipart.Keep,
        *,
        archives: bool,
        expected_study: str | None = None,
    ) -> tuple[Batch, list[multipart.Part]]:
        """A multipart body: each kept part (or, with ``archives``, each ZIP's entries).

        Also returns the parts that were not kept, for the protocol to report.
        """
        remote_addr = head.client_address
        boundary = head.media.boundary()  # refused before the site's limits are counted
        max_bytes = site.policy.max_bytes(self._settings.max_instance_bytes)
        async with self._admitted(site, head.declared_bytes, max_bytes):
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
                content_encoding=head.content_encoding,
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

    def _arrival(
        self,
        site: AuthenticatedSite,
        remote_addr: str | None,
        *,
        extra_instance: bool = False,
        expected_study: str | None = None,
    ) -> Arrival:
        return Arrival(
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
                    ctx = self._arrival(
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
                await self._refuse(self._arrival(site, remote_addr), received, exc, note=name)
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
            await self._refuse(self._arrival(site, remote_addr), received, exc, note=name)
            raise Refused(exc, counted=False) from exc
        skips: list[Upload] = []  # an archive's skipped entries: one transaction, not one each
        with opened:
            try:
                return await self._unpack_entries(site, remote_addr, opened, batch, skips)
            finally:
                await asyncio.to_thread(self._ledger.save_rejections, skips)

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
            ctx = self._arrival(site, remote_addr, extra_instance=bool(batch.items))
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

    async def _accept(self, ctx: Arrival, received: Received) -> Receipt | Refusal:
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
            result = await asyncio.to_thread(self._ledger.record, ctx, received, summary)
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
        ctx: Arrival,
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
            row = self._ledger.rejected_row(ctx, received, exc, summary, note)
            if batch is not None:
                batch.append(row)
            else:
                await asyncio.to_thread(self._ledger.save_rejections, [row])
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
