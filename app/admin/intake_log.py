"""The intake log: filtered, newest-first pages of upload records with a keyset cursor.

A page is ordered by ``(received_at, id)`` descending and the next one starts strictly
below the last row's pair, so rows that arrive during a walk never shift it: no
duplicates, no gaps among the rows that existed when the walk began. The order is
served by ``ix_uploads_received``; the selective filters have their own indexes.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import Field
from sqlalchemy import ColumnElement, Select, literal, or_, select, tuple_
from sqlalchemy.orm import Session

from app.db.models import Site, State, Upload, UtcDateTime
from app.errors import BadRequest, InvalidCursor

MAX_LIMIT = 1000
EXPORT_BATCH = 2000


@dataclass(frozen=True)
class Filters:
    """Every filter is optional; given ones are combined with AND."""

    site: str | None = None
    states: Sequence[State] = ()
    received_from: datetime | None = None  # inclusive
    received_to: datetime | None = None  # exclusive
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    patient_id: str | None = None
    orthanc_id: str | None = None  # instance, series, study or patient
    remote_addr: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class UploadRecord:
    """One intake record: what arrived, from whom, and what became of it."""

    id: int
    receipt: str
    site: str
    remote_addr: str | None
    received_at: datetime
    byte_size: int
    sha256: str | None
    sop_class_uid: str | None
    sop_instance_uid: str | None
    series_instance_uid: str | None
    study_instance_uid: str | None
    patient_id: str | None
    transfer_syntax_uid: str | None
    modality: str | None
    warnings: Annotated[
        list[str] | None,
        Field(description="What the file does that Orthanc takes but the standard does not"),
    ]
    orthanc_instance_id: str | None
    orthanc_series_id: str | None
    orthanc_study_id: str | None
    orthanc_patient_id: str | None
    state: State
    reason: str | None
    detail: str | None
    orthanc_status: str | None
    attempts: int
    failed_answers: Annotated[
        int, Field(description="Error answers from Orthanc among the attempts")
    ]
    next_attempt_at: datetime | None
    forwarded_at: datetime | None
    discarded_at: datetime | None
    duplicate_of_id: int | None


FIELDS = tuple(f.name for f in fields(UploadRecord))
_COLUMNS = [Site.name.label("site") if n == "site" else getattr(Upload, n) for n in FIELDS]
_STATE = FIELDS.index("state")


def _record(row: Sequence[Any]) -> UploadRecord:
    """A row as a record. The state column is a plain string in the database and reads
    back as one: made a State here, the type the record (and its JSON schema) declares,
    else pydantic warns on every serialization of it."""
    values = list(row)
    values[_STATE] = State(values[_STATE])
    return UploadRecord(*values)


@dataclass(frozen=True)
class UploadPage:
    items: list[UploadRecord]
    next_cursor: Annotated[
        str | None, Field(description="Pass as `cursor` for the next page; null: end")
    ]


def encode_cursor(received_at: datetime, upload_id: int) -> str:
    raw = json.dumps({"t": received_at.isoformat(), "i": upload_id}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    """The (received_at, id) a cursor points below; InvalidCursor if it is not ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        stamp, upload_id = data["t"], data["i"]
        if not isinstance(stamp, str) or type(upload_id) is not int or upload_id < 0:
            raise ValueError("wrong types")
        received_at = datetime.fromisoformat(stamp)
    except (binascii.Error, ValueError, TypeError, KeyError) as exc:
        raise InvalidCursor("the cursor is not one this API handed out") from exc
    if received_at.tzinfo is None or set(data) != {"t", "i"}:
        raise InvalidCursor("the cursor is not one this API handed out")
    return received_at.astimezone(UTC), upload_id


def below(position: tuple[datetime, int]) -> ColumnElement[bool]:
    """Rows strictly older than ``position`` in (received_at, id) order."""
    stamp, upload_id = position
    return tuple_(Upload.received_at, Upload.id) < tuple_(
        literal(stamp, UtcDateTime), literal(upload_id)
    )


def site_id(session: Session, name: str) -> int | None:
    found: int | None = session.scalar(select(Site.id).where(Site.name == name))
    return found


def conditions(session: Session, filters: Filters) -> list[ColumnElement[bool]] | None:
    """The WHERE clauses for ``filters``; None when nothing can match (unknown site)."""
    where: list[ColumnElement[bool]] = []
    if filters.site is not None:
        found = site_id(session, filters.site)
        if found is None:
            return None
        where.append(Upload.site_id == found)
    if filters.states:
        where.append(Upload.state.in_([State(s).value for s in filters.states]))
    if filters.received_from is not None:
        where.append(Upload.received_at >= filters.received_from)
    if filters.received_to is not None:
        where.append(Upload.received_at < filters.received_to)
    exact: list[tuple[Any, str | None]] = [
        (Upload.study_instance_uid, filters.study_uid),
        (Upload.series_instance_uid, filters.series_uid),
        (Upload.sop_instance_uid, filters.sop_uid),
        (Upload.patient_id, filters.patient_id),
        (Upload.remote_addr, filters.remote_addr),
        (Upload.reason, filters.reason),
    ]
    where.extend(column == value for column, value in exact if value is not None)
    if filters.orthanc_id is not None:
        where.append(
            or_(
                Upload.orthanc_instance_id == filters.orthanc_id,
                Upload.orthanc_series_id == filters.orthanc_id,
                Upload.orthanc_study_id == filters.orthanc_id,
                Upload.orthanc_patient_id == filters.orthanc_id,
            )
        )
    return where


def _query(where: list[ColumnElement[bool]]) -> Select[Any]:
    return (
        select(*_COLUMNS)
        .join(Site, Site.id == Upload.site_id)
        .where(*where)
        .order_by(Upload.received_at.desc(), Upload.id.desc())
    )


def search(
    session: Session, filters: Filters, limit: int = 100, cursor: str | None = None
) -> UploadPage:
    """One page of matching records, newest first, and the cursor of the next one."""
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}")
    position = decode_cursor(cursor) if cursor else None
    where = conditions(session, filters)
    if where is None:
        return UploadPage([], None)
    if position is not None:
        where.append(below(position))
    rows = session.execute(_query(where).limit(limit + 1)).all()
    items = [_record(row) for row in rows[:limit]]
    more = len(rows) > limit
    return UploadPage(items, encode_cursor(items[-1].received_at, items[-1].id) if more else None)


def show(session: Session, upload_id: int) -> UploadRecord | None:
    row = session.execute(_query([Upload.id == upload_id])).first()
    return _record(row) if row else None


def export(
    session_factory: Any, filters: Filters, max_rows: int, batch: int = EXPORT_BATCH
) -> Iterator[list[UploadRecord]]:
    """Matching records in batches, newest first, at most ``max_rows`` of them.

    Each batch is read in its own short session (on SQLite every transaction holds the
    write lock), positioned with the keyset cursor, so memory and locks stay bounded.
    """
    position: tuple[datetime, int] | None = None
    left = max_rows
    while left > 0:
        with session_factory() as session:
            where = conditions(session, filters)
            if where is None:
                return
            if position is not None:
                where.append(below(position))
            rows = session.execute(_query(where).limit(min(batch, left))).all()
        if not rows:
            return
        records = [_record(row) for row in rows]
        yield records
        left -= len(records)
        position = (records[-1].received_at, records[-1].id)
