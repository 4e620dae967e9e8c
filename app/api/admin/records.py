"""Admin routes for what arrived: the intake log (JSON and CSV), studies, daily stats."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from app.admin import intake_log, stats, studies
from app.api.admin.deps import ERROR_RESPONSES, AdminDep, ErrorBody, RowId, ServiceDep
from app.db.models import State
from app.errors import NotFound
from app.logs import escape_controls
from app.service import Service

router = APIRouter(
    prefix="/api",
    responses={**ERROR_RESPONSES, 400: {"model": ErrorBody}, 404: {"model": ErrorBody}},
)
T = TypeVar("T")
CSV_MAX_ROWS = 1_000_000

Since = Annotated[
    datetime | None, Query(description="ISO 8601, inclusive; without an offset it is UTC")
]
Until = Annotated[
    datetime | None, Query(description="ISO 8601, exclusive; without an offset it is UTC")
]


class StudyOut(BaseModel):
    site: str
    study_instance_uid: str
    orthanc_study_id: str | None
    patient_id: str | None
    instances: int = Field(description="Distinct SOP Instance UIDs among non-rejected uploads")
    series: int
    bytes: int = Field(description="Bytes of every upload of the study, as received")
    first_received: datetime
    last_received: datetime
    states: dict[str, int] = Field(description="Uploads by state")
    quiet: bool = Field(description="No new instance for INTAKE_STUDY_QUIET_SECONDS")


class StudyPage(BaseModel):
    items: list[StudyOut]
    next_cursor: str | None


class SeriesOut(BaseModel):
    series_instance_uid: str
    instances: int
    bytes: int
    last_received: datetime


class StudyDetail(StudyOut):
    series_list: list[SeriesOut]
    uploads: intake_log.UploadPage = Field(
        description="The newest uploads; continue with /api/uploads"
    )


class DayOut(BaseModel):
    day: date
    uploads: int
    bytes: int
    accepted: int
    rejected: int
    rejections: dict[str, int] = Field(description="Rejected uploads by reason")
    forwarded: int
    latency_ms: dict[str, float] | None = Field(
        description="p50/p90/p99 of forwarded_at - received_at for the day's forwarded uploads"
    )


class SiteStatsOut(BaseModel):
    site: str
    queue_depth: int = Field(description="Queued now")
    quarantined: int = Field(description="Quarantined now")
    days: list[DayOut]


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _quiet_seconds(service: Service) -> float:
    return service.settings.study_quiet_seconds


async def _call(service: Service, action: Callable[[Session], T]) -> T:
    def run() -> T:
        with service.readers() as session:
            return action(session)

    return await asyncio.to_thread(run)


async def _upload_filters(  # async: no worker thread for a few assignments
    site: str | None = None,
    state: Annotated[list[State] | None, Query(description="Repeatable")] = None,
    received_from: Since = None,
    received_to: Until = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_id: str | None = None,
    orthanc_id: Annotated[
        str | None, Query(description="An Orthanc instance, series, study or patient ID")
    ] = None,
    remote_addr: str | None = None,
    reason: str | None = None,
) -> intake_log.Filters:
    return intake_log.Filters(
        site=site,
        states=tuple(state or ()),
        received_from=_utc(received_from),
        received_to=_utc(received_to),
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        patient_id=patient_id,
        orthanc_id=orthanc_id,
        remote_addr=remote_addr,
        reason=reason,
    )


UploadFilters = Annotated[intake_log.Filters, Depends(_upload_filters)]


@router.get("/uploads", tags=["uploads"])
async def list_uploads(
    _: AdminDep,
    service: ServiceDep,
    filters: UploadFilters,
    limit: Annotated[int, Query(ge=1, le=intake_log.MAX_LIMIT)] = 100,
    cursor: str | None = None,
) -> intake_log.UploadPage:
    """The intake log, newest first, with keyset pagination stable under new arrivals."""
    return await _call(service, lambda s: intake_log.search(s, filters, limit, cursor))


@router.get(
    "/uploads.csv",
    tags=["uploads"],
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}, "description": "A header row, then records"}},
)
async def export_uploads(
    _: AdminDep, service: ServiceDep, filters: UploadFilters
) -> StreamingResponse:
    """The filtered log as CSV, newest first, streamed in batches; at most 1,000,000 rows
    (narrow ``received_from``/``received_to`` to export more, range by range)."""

    def lines() -> Iterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(intake_log.FIELDS)
        for batch in intake_log.export(service.readers, filters, CSV_MAX_ROWS):
            writer.writerows(_csv_row(r) for r in batch)
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
        yield buffer.getvalue()

    # A plain iterator: Starlette runs it in a worker thread, off the event loop.
    return StreamingResponse(
        lines(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="uploads.csv"'},
    )


def _csv_row(record: intake_log.UploadRecord) -> list[object]:
    return [csv_cell(getattr(record, name)) for name in intake_log.FIELDS]


# A cell a spreadsheet would run as a formula (OWASP, "CSV Injection"): sites choose
# PatientIDs, Modalities, file and entry names, and the admin opens the export.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """One CSV cell that a spreadsheet shows as text: control characters escaped
    (terminal escape sequences, line breaks), a leading formula character quoted."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list):  # warnings
        value = ";".join(str(v) for v in value)
    if not isinstance(value, str):
        return value  # numbers and booleans are the intake's own
    if value.startswith(_FORMULA_START):
        value = "'" + value
    return escape_controls(value)


@router.get("/uploads/{upload_id}", tags=["uploads"])
async def show_upload(
    upload_id: RowId, _: AdminDep, service: ServiceDep
) -> intake_log.UploadRecord:
    """One intake record in full."""
    found = await _call(service, lambda s: intake_log.show(s, upload_id))
    if found is None:
        raise NotFound(f"no upload #{upload_id}")
    return found


def _study(study: studies.Study) -> StudyOut:
    return StudyOut.model_validate(study, from_attributes=True)


@router.get("/studies", tags=["studies"])
async def list_studies(
    _: AdminDep,
    service: ServiceDep,
    site: str | None = None,
    received_from: Since = None,
    received_to: Until = None,
    study_uid: str | None = None,
    patient_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=studies.MAX_LIMIT)] = 50,
    cursor: str | None = None,
) -> StudyPage:
    """One row per (site, Study Instance UID), the most recently added-to first.

    ``received_from``/``received_to`` bound ``last_received``. A study that receives a
    new instance during a walk moves to the top and is not repeated further down."""
    filters = studies.StudyFilters(
        site, _utc(received_from), _utc(received_to), study_uid, patient_id
    )
    quiet = _quiet_seconds(service)
    page = await _call(service, lambda s: studies.latest(s, filters, quiet, limit, cursor))
    return StudyPage(items=[_study(s) for s in page.items], next_cursor=page.next_cursor)


@router.get("/studies/{site}/{study_uid}", tags=["studies"])
async def show_study(site: str, study_uid: str, _: AdminDep, service: ServiceDep) -> StudyDetail:
    """One study: its aggregate, its series and its newest uploads."""
    quiet = _quiet_seconds(service)

    def run(
        session: Session,
    ) -> tuple[tuple[studies.Study, list[studies.Series]] | None, intake_log.UploadPage]:
        found = studies.show(session, site, study_uid, quiet)
        if found is None:
            return None, intake_log.UploadPage([], None)
        return found, intake_log.search(session, intake_log.Filters(site=site, study_uid=study_uid))

    found, uploads = await _call(service, run)
    if found is None:
        raise NotFound(f"no study {study_uid} from site {site}")
    study, series = found
    return StudyDetail(
        **_study(study).model_dump(),
        series_list=[SeriesOut.model_validate(s, from_attributes=True) for s in series],
        uploads=uploads,
    )


@router.get("/stats/daily", tags=["stats"])
async def daily_stats(
    _: AdminDep,
    service: ServiceDep,
    site: str | None = None,
    first: Annotated[
        date | None, Query(alias="from", description="UTC day; default: 6 days ago")
    ] = None,
    last: Annotated[
        date | None, Query(alias="to", description="UTC day, inclusive; default: today")
    ] = None,
) -> list[SiteStatsOut]:
    """Per site and UTC day (at most 92 days): uploads, bytes, rejections by reason,
    forward latency percentiles; with each site's queue depth and quarantine now."""
    last = last or datetime.now(UTC).date()
    first = first or last - timedelta(days=6)
    result = await _call(service, lambda s: stats.daily(s, site, first, last))
    return [SiteStatsOut.model_validate(r, from_attributes=True) for r in result]
