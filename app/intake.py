"""The upload pipeline: receive → validate → persist → enqueue. No web framework here.

A site's upload ends in exactly one of these, before the site gets an answer:
- refused (an IntakeError is raised; a ``rejected`` row records why);
- ``queued``: the file is durable in the spool and its row committed;
- ``duplicate``: the same SOP instance with the same bytes was already taken;
- ``quarantined`` as a conflict: same SOP Instance UID, different bytes. Orthanc
  would keep its first copy and silently ignore this one, so it is kept here for
  an admin instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app import dicom, usage
from app.errors import (
    InstanceTooLarge,
    IntakeError,
    RefusedPreamble,
    ServiceUnavailable,
    TooManyRequests,
)
from app.metrics import Metrics
from app.models import State, Upload, utcnow
from app.settings import Settings
from app.sites import AuthenticatedSite
from app.spool import QUARANTINE, QUEUE, REFUSED, Received, Spool
from app.validation import Validator

log = logging.getLogger(__name__)

ORTHANC_SUCCESS = "Success"
ORTHANC_ALREADY_STORED = "AlreadyStored"


@dataclass(frozen=True)
class Receipt:
    """What the site is told about an accepted upload."""

    upload_id: int
    receipt: str
    state: State
    status: str  # Orthanc's word for it: Success or AlreadyStored
    ids: dicom.OrthancIds


@dataclass(frozen=True)
class _Context:
    site: AuthenticatedSite
    remote_addr: str | None
    receipt: str
    received_at: datetime


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
        self._admission = usage.Admission(sessions, settings.upload_slot_ttl_seconds)
        self._settings = settings
        self._sessions = sessions
        self._spool = spool
        self._validator = validator
        self._on_queued = on_queued
        self._metrics = metrics or Metrics()

    async def receive(
        self,
        site: AuthenticatedSite,
        remote_addr: str | None,
        body: AsyncIterator[bytes],
        content_encoding: str | None = None,
        declared_bytes: int | None = None,
    ) -> Receipt:
        """Take one upload through the pipeline; an IntakeError says why it was refused."""
        started = time.perf_counter()
        max_bytes = site.policy.max_bytes(self._settings.max_instance_bytes)
        try:
            if declared_bytes is not None and declared_bytes > max_bytes:
                raise InstanceTooLarge(
                    f"Content-Length {declared_bytes} is over the limit of {max_bytes} bytes"
                )
            async with self._admission.admit(site, declared_bytes):
                result = await self._receive(site, remote_addr, body, content_encoding, max_bytes)
        except IntakeError as exc:
            self._metrics.record_refusal(site.name, exc.reason, time.perf_counter() - started)
            raise
        self._metrics.record_upload(site.name, result.state, time.perf_counter() - started)
        return result

    async def _receive(
        self,
        site: AuthenticatedSite,
        remote_addr: str | None,
        body: AsyncIterator[bytes],
        content_encoding: str | None,
        max_bytes: int,
    ) -> Receipt:
        started = time.perf_counter()
        ctx = _Context(site, remote_addr, uuid.uuid4().hex, utcnow())
        received: Received | None = None
        parsed: dicom.Summary | None = None  # known once validation passed
        try:
            received = await self._spool.receive(
                body,
                max_bytes=max_bytes,
                content_encoding=content_encoding,
                idle_timeout=self._settings.body_idle_timeout_seconds,
            )
            self._metrics.record_bytes(site.name, received.byte_size)
            if received.executable_preamble is not None:
                self._spool.keep(received.path, REFUSED, f"{ctx.receipt}.bin")
                log.warning(
                    "security: site=%s remote=%s receipt=%s sent an executable preamble (%s); "
                    "kept under refused/",
                    site.name,
                    remote_addr,
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
            result = await asyncio.to_thread(self._persist, ctx, received, summary)
        except IntakeError as exc:
            if received is not None:
                self._spool.discard(received.path)
            if not isinstance(exc, ServiceUnavailable | TooManyRequests):
                await asyncio.to_thread(self._record_rejection, ctx, received, exc, parsed)
            log.info(
                "upload refused site=%s receipt=%s reason=%s detail=%s",
                site.name,
                ctx.receipt,
                exc.reason,
                exc.detail,
            )
            raise
        except BaseException:
            if received is not None:
                self._spool.discard(received.path)
            raise
        if result.state is State.QUEUED:
            self._on_queued()
        log.info(
            "upload site=%s receipt=%s sop=%s study=%s bytes=%d state=%s ms=%.1f",
            site.name,
            ctx.receipt,
            summary.sop_instance_uid,
            summary.study_instance_uid,
            received.byte_size,
            result.state.value,
            (time.perf_counter() - started) * 1000,
        )
        return result

    def _persist(self, ctx: _Context, received: Received, summary: dicom.Summary) -> Receipt:
        ids = dicom.orthanc_ids(
            summary.patient_id,
            summary.study_instance_uid,
            summary.series_instance_uid,
            summary.sop_instance_uid,
        )
        row = Upload(
            receipt=ctx.receipt,
            site_id=ctx.site.site_id,
            remote_addr=ctx.remote_addr,
            received_at=ctx.received_at,
            byte_size=received.byte_size,
            sha256=received.sha256,
            sop_class_uid=summary.sop_class_uid,
            sop_instance_uid=summary.sop_instance_uid,
            series_instance_uid=summary.series_instance_uid,
            study_instance_uid=summary.study_instance_uid,
            patient_id=summary.patient_id,
            transfer_syntax_uid=summary.transfer_syntax_uid,
            modality=summary.modality,
            orthanc_instance_id=ids.instance,
            orthanc_series_id=ids.series,
            orthanc_study_id=ids.study,
            orthanc_patient_id=ids.patient,
            attempts=0,
            failed_answers=0,
        )
        kept: Path | None = None
        try:
            with self._sessions() as session:
                prior = session.execute(
                    select(Upload.id, Upload.sha256, Upload.state)
                    .where(
                        Upload.sop_instance_uid == summary.sop_instance_uid,
                        Upload.state.in_([State.QUEUED, State.FORWARDED, State.QUARANTINED]),
                    )
                    .order_by(Upload.id)
                ).all()
                same = next((p for p in prior if p.sha256 == received.sha256), None)
                other = next(
                    (
                        p
                        for p in prior
                        if p.sha256 != received.sha256 and p.state != State.QUARANTINED
                    ),
                    None,
                )
                quota = ctx.site.policy.bytes_per_day
                if quota is not None:  # counted in this transaction: no commit, no count
                    usage.take_bytes(session, ctx.site.site_id, quota, received.byte_size, utcnow())
                status = ORTHANC_ALREADY_STORED
                if same is not None:
                    row.state = State.DUPLICATE
                    row.duplicate_of_id = same.id
                elif other is not None:
                    row.state = State.QUARANTINED
                    row.reason = "conflict"
                    row.detail = (
                        f"SOP Instance UID {summary.sop_instance_uid} was already received "
                        f"with different bytes (upload #{other.id}); Orthanc would keep the "
                        "first copy and ignore this one"
                    )
                    row.spool_name = f"{ctx.receipt}.dcm"
                    kept = self._spool.keep(received.path, QUARANTINE, row.spool_name)
                else:
                    status = ORTHANC_SUCCESS
                    row.state = State.QUEUED
                    row.next_attempt_at = utcnow()
                    row.spool_name = f"{ctx.receipt}.dcm"
                    kept = self._spool.keep(received.path, QUEUE, row.spool_name)
                session.add(row)
                session.commit()
        except IntakeError:
            self._spool.discard(kept or received.path)
            raise
        except SQLAlchemyError as exc:
            # No committed row, so no acknowledgement: take the file back out.
            self._spool.discard(kept or received.path)
            log.error("database error while recording receipt=%s: %s", ctx.receipt, exc)
            raise ServiceUnavailable("the intake database is unavailable; try again") from exc
        except BaseException:
            self._spool.discard(kept or received.path)
            raise
        if row.state is State.DUPLICATE:
            self._spool.discard(received.path)
        return Receipt(
            upload_id=row.id, receipt=ctx.receipt, state=row.state, status=status, ids=ids
        )

    def _record_rejection(
        self,
        ctx: _Context,
        received: Received | None,
        error: IntakeError,
        summary: dicom.Summary | None = None,
    ) -> None:
        """A `rejected` row; with the file's UIDs when it was refused after validation."""
        uids: dict[str, str | None] = {}
        if summary is not None:
            uids = {
                "sop_class_uid": summary.sop_class_uid,
                "sop_instance_uid": summary.sop_instance_uid,
                "series_instance_uid": summary.series_instance_uid,
                "study_instance_uid": summary.study_instance_uid,
                "patient_id": summary.patient_id,
                "transfer_syntax_uid": summary.transfer_syntax_uid,
                "modality": summary.modality,
            }
        try:
            with self._sessions() as session:
                session.add(
                    Upload(
                        **uids,
                        receipt=ctx.receipt,
                        site_id=ctx.site.site_id,
                        remote_addr=ctx.remote_addr,
                        received_at=ctx.received_at,
                        byte_size=received.byte_size if received else 0,
                        sha256=received.sha256 if received else None,
                        state=State.REJECTED,
                        reason=error.reason,
                        detail=error.detail[:2000],
                        attempts=0,
                        failed_answers=0,
                    )
                )
                session.commit()
        except SQLAlchemyError as exc:
            log.error("could not record the refusal of receipt=%s: %s", ctx.receipt, exc)
