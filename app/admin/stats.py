"""Daily figures per site: uploads, bytes, rejections by reason, forward latency.

Days are UTC days. Grouping by day is done in SQL with a per-dialect expression
(``date()`` on SQLite's text timestamps, ``AT TIME ZONE 'UTC'`` on PostgreSQL), over
rows found through ``ix_uploads_received``/``ix_uploads_site_received``; latency
percentiles are computed here, from that range's forwarded rows.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Float, String, func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import FunctionElement

from app.admin import intake_log
from app.db.models import Site, State, Upload
from app.errors import BadRequest

MAX_DAYS = 92
PERCENTILES = (50, 90, 99)


class _UtcDay(FunctionElement[str]):
    """A timestamp's UTC day as 'YYYY-MM-DD' text, on either backend."""

    type = String()
    inherit_cache = True


@compiles(_UtcDay, "sqlite")
def _utc_day_sqlite(element: _UtcDay, compiler: Any, **kw: Any) -> str:
    # SQLite keeps naive UTC text ("YYYY-MM-DD HH:MM:SS.ffffff", see UtcDateTime);
    # its first ten characters are the day, several times cheaper than date().
    return f"substr({compiler.process(element.clauses, **kw)}, 1, 10)"


@compiles(_UtcDay, "postgresql")
def _utc_day_postgresql(element: _UtcDay, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.clauses, **kw)
    return f"to_char(({column}) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"


class _Milliseconds(FunctionElement[float]):
    """``later - earlier`` in milliseconds, as a float, on either backend."""

    type = Float()
    inherit_cache = True


@compiles(_Milliseconds, "sqlite")
def _ms_sqlite(element: _Milliseconds, compiler: Any, **kw: Any) -> str:
    # Whole seconds through julianday() (exact once rounded; strftime('%s') is several
    # times slower), then the microseconds from the text: a bare julianday() difference
    # is off by up to ~50 µs.
    later, earlier = (compiler.process(c, **kw) for c in element.clauses)
    seconds = (
        f"round((julianday(substr({later}, 1, 19)) - julianday(substr({earlier}, 1, 19))) * 86400)"
    )
    micros = (
        f"(CAST(substr({later}, 21, 6) AS INTEGER) - CAST(substr({earlier}, 21, 6) AS INTEGER))"
    )
    return f"({seconds} * 1000.0 + {micros} / 1000.0)"


@compiles(_Milliseconds, "postgresql")
def _ms_postgresql(element: _Milliseconds, compiler: Any, **kw: Any) -> str:
    later, earlier = (compiler.process(c, **kw) for c in element.clauses)
    return f"(EXTRACT(EPOCH FROM ({later} - {earlier})) * 1000.0)"


@dataclass
class Day:
    day: date
    uploads: int = 0
    bytes: int = 0
    accepted: int = 0
    rejected: int = 0
    rejections: dict[str, int] = field(default_factory=dict)
    forwarded: int = 0
    latency_ms: dict[str, float] | None = None


@dataclass
class SiteDays:
    site: str
    queue_depth: int = 0
    quarantined: int = 0
    days: list[Day] = field(default_factory=list)


def percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (as PostgreSQL's percentile_cont)."""
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def daily(session: Session, site: str | None, first: date, last: date) -> list[SiteDays]:
    """Per site, per UTC day from ``first`` to ``last`` inclusive."""
    if last < first:
        raise BadRequest("'to' is before 'from'")
    if (last - first).days + 1 > MAX_DAYS:
        raise BadRequest(f"at most {MAX_DAYS} days at a time")
    start = datetime.combine(first, time(), UTC)
    end = datetime.combine(last + timedelta(days=1), time(), UTC)
    where: list[ColumnElement[bool]] = [Upload.received_at >= start, Upload.received_at < end]
    now_where: list[ColumnElement[bool]] = []
    if site is not None:
        site_id = intake_log.site_id(session, site)
        if site_id is None:
            return []
        where.append(Upload.site_id == site_id)
        now_where.append(Upload.site_id == site_id)

    day = _UtcDay(Upload.received_at)
    days: dict[tuple[int, str], Day] = {}

    def entry(site_id: int, text: str) -> Day:
        return days.setdefault((site_id, text), Day(date.fromisoformat(text)))

    # One pass over the range (ix_uploads_site_received / ix_uploads_received): grouping
    # in SQL costs SQLite a temporary B-tree, and the latencies need every row anyway.
    latency = _Milliseconds(Upload.forwarded_at, Upload.received_at)
    latencies: dict[tuple[int, str], list[float]] = defaultdict(list)
    rows = session.execute(
        select(Upload.site_id, day, Upload.state, Upload.reason, Upload.byte_size, latency).where(
            *where
        )
    )
    for site_id, utc_day, state, reason, size, ms in rows:
        figures = entry(site_id, utc_day)
        figures.uploads += 1
        figures.bytes += size
        if state == State.REJECTED:
            figures.rejected += 1
            why = reason or "unknown"
            figures.rejections[why] = figures.rejections.get(why, 0) + 1
        else:
            figures.accepted += 1
        if ms is not None:
            latencies[(site_id, utc_day)].append(ms)
    for key, values in latencies.items():
        values.sort()
        figures = entry(*key)
        figures.forwarded = len(values)
        figures.latency_ms = {f"p{q}": round(percentile(values, q), 3) for q in PERCENTILES}

    waiting = session.execute(
        select(Upload.site_id, Upload.state, func.count())
        .where(Upload.state.in_([State.QUEUED.value, State.QUARANTINED.value]), *now_where)
        .group_by(Upload.site_id, Upload.state)
    ).all()

    site_ids = {k[0] for k in days} | {row[0] for row in waiting}
    names = dict(session.execute(select(Site.id, Site.name).where(Site.id.in_(site_ids))).all())
    result = {site_id: SiteDays(names[site_id]) for site_id in site_ids}
    for site_id, state, count in waiting:
        if state == State.QUEUED:
            result[site_id].queue_depth = count
        else:
            result[site_id].quarantined = count
    for (site_id, _), figures in sorted(days.items(), key=lambda kv: kv[1].day):
        result[site_id].days.append(figures)
    return sorted(result.values(), key=lambda s: s.site)
