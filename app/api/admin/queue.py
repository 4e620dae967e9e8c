"""Admin routes for the queue and the quarantine: list, retry, discard, inspect conflicts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Literal, TypeVar

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from app.admin.queue import Backlog, ConflictPage, KeptFile, QueueItem, QueuePage, RetryCount
from app.api.admin.deps import ERROR_RESPONSES, AdminDep, ErrorBody, RowId, ServiceDep
from app.db.models import State
from app.service import Service

router = APIRouter(
    prefix="/api",
    tags=["queue"],
    responses={**ERROR_RESPONSES, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
T = TypeVar("T")
_CHUNK = 1024 * 1024
# A keyset cursor is a row id: 64-bit, so a larger number is a 422, never a database error
# (SQLite raised OverflowError, a 500 that schemathesis found).
RowCursor = Annotated[int | None, Query(ge=0, le=2**63 - 1, description="next_cursor")]


class RetryCountOut(BaseModel):
    retried: int = Field(description="requeued + made_due")
    requeued: int = Field(description="Quarantined uploads put back in the queue")
    made_due: int = Field(description="Queued uploads in back-off made due now")
    skipped: int = Field(description="Conflicts, lost files, uploads being forwarded")


class StudyIn(BaseModel):
    site: str
    study_uid: str = Field(min_length=1)


class DiscardIn(BaseModel):
    reason: str = Field(min_length=1, max_length=2000, description="Recorded in the detail")


async def _call(service: Service, action: Callable[[Backlog], T]) -> T:
    return await asyncio.to_thread(action, Backlog(service.sessions, service.spool))


def _count(count: RetryCount) -> RetryCountOut:
    return RetryCountOut(
        retried=count.requeued + count.made_due,
        requeued=count.requeued,
        made_due=count.made_due,
        skipped=count.skipped,
    )


Limit = Annotated[int, Query(ge=1, le=500)]


@router.get("/queue")
async def list_queue(
    _: AdminDep,
    service: ServiceDep,
    state: Literal["queued", "quarantined"] = "queued",
    site: str | None = None,
    reason: str | None = None,
    limit: Limit = 100,
    cursor: RowCursor = None,
) -> QueuePage:
    """What waits for Orthanc (oldest first) or sits in quarantine (newest first)."""
    page = await _call(
        service,
        lambda b: b.page(State(state), site=site, reason=reason, limit=limit, cursor=cursor),
    )
    return page


@router.post("/uploads/{upload_id}/retry")
async def retry_upload(upload_id: RowId, admin: AdminDep, service: ServiceDep) -> QueueItem:
    """Put a quarantined upload back in the queue (attempts reset), or make a queued one due.

    Conflicts (reason `conflict`) are refused with 409: Orthanc already holds that SOP
    instance with other bytes and would answer `AlreadyStored` and keep its copy. Delete
    Orthanc's copy first, or resolve the conflict with `discard` to keep Orthanc's copy.
    A quarantined upload whose spool file is gone is a 409 too (nothing to retry), and so
    is a queued one the forwarder is delivering at this moment.
    """
    item = await _call(service, lambda b: b.retry(upload_id, admin))
    service.wake_forwarder()
    return item


@router.post("/studies/retry")
async def retry_study(body: StudyIn, admin: AdminDep, service: ServiceDep) -> RetryCountOut:
    """Retry every quarantined upload of one study of a site (conflicts are skipped)."""
    count = await _call(service, lambda b: b.retry_study(body.site, body.study_uid, admin))
    service.wake_forwarder()
    return _count(count)


@router.post("/sites/{name}/retry")
async def retry_site(name: str, admin: AdminDep, service: ServiceDep) -> RetryCountOut:
    """Retry every quarantined upload of a site (conflicts are skipped)."""
    count = await _call(service, lambda b: b.retry_site(name, admin))
    service.wake_forwarder()
    return _count(count)


@router.post("/uploads/{upload_id}/discard")
async def discard_upload(
    upload_id: RowId, body: DiscardIn, admin: AdminDep, service: ServiceDep
) -> QueueItem:
    """Give up on a queued or quarantined upload, with a reason; then its file is removed.

    Discarding a conflict resolves it in favour of the copy Orthanc holds.
    """
    return await _call(service, lambda b: b.discard(upload_id, admin, body.reason))


@router.get("/conflicts")
async def list_conflicts(
    _: AdminDep,
    service: ServiceDep,
    site: str | None = None,
    limit: Limit = 100,
    cursor: RowCursor = None,
) -> ConflictPage:
    """Quarantined conflicts (same SOP Instance UID, other bytes), newest first.

    Each comes with the upload it collides with, to compare hashes; fetch the kept bytes
    with `GET /api/uploads/{id}/file`.
    """
    return await _call(service, lambda b: b.conflicts(site=site, limit=limit, cursor=cursor))


@router.get(
    "/uploads/{upload_id}/file",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/dicom": {}}, "description": "The kept file"}},
)
async def upload_file(upload_id: RowId, _: AdminDep, service: ServiceDep) -> StreamingResponse:
    """The bytes kept for a quarantined upload, as stored (preamble zeroed)."""
    kept = await _call(service, lambda b: b.open_file(upload_id))
    return StreamingResponse(
        _stream(kept),
        media_type="application/dicom",
        headers={
            "Content-Length": str(kept.size),
            "Content-Disposition": f'attachment; filename="{kept.name}"',
        },
    )


async def _stream(kept: KeptFile) -> AsyncIterator[bytes]:
    # Opened before the answer starts, so a discard meanwhile cannot cut the body short.
    try:
        while chunk := await asyncio.to_thread(kept.file.read, _CHUNK):
            yield chunk
    finally:
        kept.file.close()
