"""Studies as the admin sees them: one row per (site, Study Instance UID), newest first.

The latest page never groups the whole table. It walks the newest uploads backwards
(``ix_uploads_received``, or ``ix_uploads_site_received`` for one site) until it has
seen enough distinct studies, then aggregates only those studies through the
Study UID index. A study's first row met in that walk is its latest one, so the
walk's order is the ``last_received`` order.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, case, distinct, func, select
from sqlalchemy.orm import Session

from app.admin import intake_log
from app.db.models import Site, State, Upload, utcnow
from app.errors import BadRequest

COUNTED_STATES = ("forwarded", "queued", "quarantined", "rejected", "duplicate", "discarded")
MAX_LIMIT = 500
_SCAN_BATCH = 1000

Key = tuple[int, str]  # (site_id, study_instance_uid)


@dataclass(frozen=True)
class StudyFilters:
    site: str | None = None
    received_from: datetime | None = None  # on last_received, inclusive
    received_to: datetime | None = None  # on last_received, exclusive
    study_uid: str | None = None
    patient_id: str | None = None


@dataclass(frozen=True)
class Study:
    site: str
    study_instance_uid: str
    orthanc_study_id: str | None
    patient_id: str | None
    instances: int  # distinct SOP Instance UIDs among rows that were not rejected
    series: int
    bytes: int  # every upload of the study, as received
    first_received: datetime
    last_received: datetime
    states: dict[str, int]
    quiet: bool  # no new instance for the quiet time


@dataclass(frozen=True)
class Series:
    series_instance_uid: str
    instances: int
    bytes: int
    last_received: datetime


@dataclass(frozen=True)
class StudyPage:
    items: list[Study]
    next_cursor: str | None


def _not_rejected(column: Any) -> Any:
    return case((Upload.state != State.REJECTED.value, column))


def aggregate(
    session: Session, keys: list[Key], quiet_seconds: float, now: datetime | None = None
) -> dict[Key, Study]:
    """Aggregates for exactly these studies, through the Study UID index."""
    if not keys:
        return {}
    now = now or utcnow()
    wanted = set(keys)
    state_counts = [
        func.sum(case((Upload.state == s, 1), else_=0)).label(s) for s in COUNTED_STATES
    ]
    rows = session.execute(
        select(
            Upload.site_id,
            Upload.study_instance_uid,
            Site.name,
            func.max(Upload.orthanc_study_id),
            func.max(Upload.patient_id),
            func.count(distinct(_not_rejected(Upload.sop_instance_uid))),
            func.count(distinct(_not_rejected(Upload.series_instance_uid))),
            func.sum(Upload.byte_size),
            func.min(Upload.received_at),
            func.max(Upload.received_at),
            *state_counts,
        )
        .join(Site, Site.id == Upload.site_id)
        .where(
            Upload.study_instance_uid.in_({uid for _, uid in wanted}),
            Upload.site_id.in_({site for site, _ in wanted}),
        )
        .group_by(Upload.site_id, Upload.study_instance_uid, Site.name)
    ).all()
    quiet_after = timedelta(seconds=quiet_seconds)
    found: dict[Key, Study] = {}
    row: Any
    for row in rows:
        key = (row[0], row[1])
        if key not in wanted:  # same Study UID at another site that was not asked for
            continue
        last = row[9]
        found[key] = Study(
            site=row[2],
            study_instance_uid=row[1],
            orthanc_study_id=row[3],
            patient_id=row[4],
            instances=row[5],
            series=row[6],
            bytes=int(row[7] or 0),
            first_received=row[8],
            last_received=last,
            states={s: int(row[10 + i] or 0) for i, s in enumerate(COUNTED_STATES)},
            quiet=now - last >= quiet_after,
        )
    return found


def latest(
    session: Session,
    filters: StudyFilters,
    quiet_seconds: float,
    limit: int = 50,
    cursor: str | None = None,
    now: datetime | None = None,
) -> StudyPage:
    """Studies by ``last_received`` descending; the cursor is the last study's latest row."""
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}")
    position = intake_log.decode_cursor(cursor) if cursor else None
    where: list[ColumnElement[bool]] = [Upload.study_instance_uid.is_not(None)]
    if filters.site is not None:
        found = intake_log.site_id(session, filters.site)
        if found is None:
            return StudyPage([], None)
        where.append(Upload.site_id == found)
    if filters.study_uid is not None:
        where.append(Upload.study_instance_uid == filters.study_uid)
    if filters.patient_id is not None:
        where.append(Upload.patient_id == filters.patient_id)
    if filters.received_to is not None:
        where.append(Upload.received_at < filters.received_to)
    if filters.received_from is not None:
        # A study whose latest row is older than this cannot qualify.
        where.append(Upload.received_at >= filters.received_from)

    chosen: list[tuple[Study, tuple[datetime, int]]] = []
    seen: set[Key] = set()
    scan = position
    while len(chosen) <= limit:
        batch_where = [*where, intake_log.below(scan)] if scan else where
        rows = session.execute(
            select(Upload.site_id, Upload.study_instance_uid, Upload.received_at, Upload.id)
            .where(*batch_where)
            .order_by(Upload.received_at.desc(), Upload.id.desc())
            .limit(_SCAN_BATCH)
        ).all()
        if not rows:
            break
        # A study's first row in this walk is its latest one: its place in the order.
        met: dict[Key, tuple[datetime, int]] = {}
        for site_id, study_uid, received_at, upload_id in rows:
            if study_uid is not None and (site_id, study_uid) not in seen:
                met.setdefault((site_id, study_uid), (received_at, upload_id))
        seen.update(met)
        studies = aggregate(session, list(met), quiet_seconds, now)
        for key, place in met.items():
            study = studies.get(key)
            if study is None or _above(session, key, study, position):
                continue
            if filters.received_to is not None and study.last_received >= filters.received_to:
                continue
            chosen.append((study, place))
        scan = (rows[-1][2], rows[-1][3])
        if len(rows) < _SCAN_BATCH:
            break
    page = chosen[:limit]
    next_cursor = None
    if len(chosen) > limit and page:
        next_cursor = intake_log.encode_cursor(*page[-1][1])
    return StudyPage([study for study, _ in page], next_cursor)


def _above(session: Session, key: Key, study: Study, position: tuple[datetime, int] | None) -> bool:
    """Whether the study has a row at or above the walk's start (an earlier page had it,
    or it has moved to the top since)."""
    if position is None or study.last_received < position[0]:
        return False
    if study.last_received > position[0]:
        return True
    # The same microsecond as the cursor: only the ids can tell.
    return (
        session.scalar(
            select(Upload.id)
            .where(
                Upload.site_id == key[0],
                Upload.study_instance_uid == key[1],
                ~intake_log.below(position),
            )
            .limit(1)
        )
        is not None
    )


def show(
    session: Session, site: str, study_uid: str, quiet_seconds: float
) -> tuple[Study, list[Series]] | None:
    """One study's aggregate and its series, or None."""
    found = intake_log.site_id(session, site)
    if found is None:
        return None
    study = aggregate(session, [(found, study_uid)], quiet_seconds).get((found, study_uid))
    if study is None:
        return None
    rows = session.execute(
        select(
            Upload.series_instance_uid,
            func.count(distinct(_not_rejected(Upload.sop_instance_uid))),
            func.sum(Upload.byte_size),
            func.max(Upload.received_at),
        )
        .where(
            Upload.site_id == found,
            Upload.study_instance_uid == study_uid,
            Upload.series_instance_uid.is_not(None),
        )
        .group_by(Upload.series_instance_uid)
        .order_by(func.min(Upload.received_at))
    ).all()
    series = [Series(r[0] or "", r[1], int(r[2] or 0), r[3]) for r in rows]
    return study, series
