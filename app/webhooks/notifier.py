"""Study-arrived webhooks: notice quiet, settled studies and deliver signed events.

A (site, study) gets an event once no instance of it arrived for
``study_quiet_seconds`` and none of its uploads still waits for Orthanc. The event
becomes one ``webhook_deliveries`` row per URL; the unique index on (site, study,
instance count, URL) makes that insert idempotent across processes, and a study
that grows and goes quiet again makes a new event. Only studies with uploads in
the last day (or two quiet periods, if longer) are scanned, and their counts cover
those uploads.

Delivery is lease-free: a process claims a due row with a conditional UPDATE that
moves ``next_attempt_at`` past the request's timeout, and writes the outcome only
if nobody else did in between. The body is signed with HMAC-SHA256
(``X-Intake-Signature: sha256=<hex>``) over its exact bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import case, distinct, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app import __version__
from app.db.models import Site, State, Upload, WebhookDelivery, utcnow
from app.db.sessions import changed_rows, is_postgresql
from app.settings import Settings

log = logging.getLogger(__name__)

EVENT = "study.arrived"
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
_LOOKBACK = timedelta(days=1)
_SCAN_BATCH = 200
_DELIVER_BATCH = 20
_UNSETTLED = (State.RECEIVED, State.QUEUED)


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def sign(secret: str, body: bytes) -> str:
    """The ``X-Intake-Signature`` value: HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class _Due:
    id: int
    url: str
    payload: dict[str, Any]
    attempts: int


class Webhooks:
    """The background task: scan for quiet studies, deliver what is due."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        secret = settings.webhook_secret
        self._secret = secret.get_secret_value() if secret else ""
        self._client = httpx.AsyncClient(
            timeout=settings.webhook_timeout_seconds,
            follow_redirects=False,
            headers={"User-Agent": f"orthanc-intake/{__version__}"},
            transport=transport,
        )
        self._wake = asyncio.Event()

    def notify(self) -> None:
        """A delivery became due (an admin's retry): deliver now, not at the next poll."""
        self._wake.set()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def run(self) -> None:
        """Scan and deliver until cancelled."""
        poll = self._settings.webhook_poll_seconds
        # Scanning aggregates a day of uploads: no need to do it more often than the
        # quiet period can resolve.
        scan_every = max(poll, self._settings.study_quiet_seconds / 10)
        next_scan = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if loop.time() >= next_scan:
                    next_scan = loop.time() + scan_every
                    await asyncio.to_thread(self.scan)
                while await self.deliver_due():
                    pass
            except SQLAlchemyError as exc:
                log.warning("webhooks: the database did not answer: %s", exc)
            except Exception:
                log.exception("webhooks: unexpected error; carrying on")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), poll)

    def scan(self) -> int:
        """Create the deliveries for studies that went quiet and settled; returns how many."""
        urls = self._settings.webhook_urls
        if not urls:
            return 0
        now = utcnow()
        quiet = timedelta(seconds=self._settings.study_quiet_seconds)
        since = now - max(_LOOKBACK, 2 * quiet)

        def count(*states: State) -> Any:
            return func.coalesce(func.sum(case((Upload.state.in_(states), 1), else_=0)), 0)

        studies = (
            select(
                Upload.site_id,
                Upload.study_instance_uid,
                func.count(
                    distinct(case((Upload.state != State.REJECTED, Upload.sop_instance_uid)))
                ).label("instances"),
                func.count(distinct(Upload.series_instance_uid)).label("series"),
                count(State.FORWARDED).label("forwarded"),
                count(State.QUARANTINED).label("quarantined"),
                count(State.REJECTED).label("rejected"),
                func.min(Upload.received_at).label("first_received_at"),
                func.max(Upload.received_at).label("last_received_at"),
                func.max(Upload.orthanc_study_id).label("orthanc_study_id"),
            )
            .where(Upload.received_at >= since, Upload.study_instance_uid.is_not(None))
            .group_by(Upload.site_id, Upload.study_instance_uid)
            .having(func.max(Upload.received_at) <= now - quiet, count(*_UNSETTLED) == 0)
            .subquery()
        )
        sent = (
            select(func.count())
            .select_from(WebhookDelivery)
            .where(
                WebhookDelivery.site_id == studies.c.site_id,
                WebhookDelivery.study_instance_uid == studies.c.study_instance_uid,
                WebhookDelivery.instance_count == studies.c.instances,
                WebhookDelivery.url.in_(urls),
            )
            .scalar_subquery()
        )
        query = (
            select(studies, Site.name)
            .join(Site, Site.id == studies.c.site_id)
            .where(studies.c.instances > 0, sent < len(urls))
            .order_by(studies.c.last_received_at)
            .limit(_SCAN_BATCH)
        )
        with self._sessions() as session:
            found = session.execute(query).all()
            rows = [self._delivery(study, url, now) for study in found for url in urls]
            if rows and is_postgresql(session):
                session.execute(
                    postgresql.insert(WebhookDelivery).values(rows).on_conflict_do_nothing()
                )
            elif rows:
                session.execute(
                    sqlite.insert(WebhookDelivery).values(rows).on_conflict_do_nothing()
                )
            session.commit()
        for study in found:
            log.info(
                "study arrived site=%s study=%s instances=%d: webhook event queued",
                study.name,
                study.study_instance_uid,
                study.instances,
            )
        return len(rows)

    @staticmethod
    def _delivery(study: Any, url: str, now: datetime) -> dict[str, Any]:
        payload = {
            "event": EVENT,
            "site": study.name,
            "study_instance_uid": study.study_instance_uid,
            "orthanc_study_id": study.orthanc_study_id,
            "instances": study.instances,
            "series": study.series,
            "forwarded": study.forwarded,
            "quarantined": study.quarantined,
            "rejected": study.rejected,
            "first_received_at": study.first_received_at.isoformat(),
            "last_received_at": study.last_received_at.isoformat(),
        }
        return {
            "site_id": study.site_id,
            "study_instance_uid": study.study_instance_uid,
            "orthanc_study_id": study.orthanc_study_id,
            "instance_count": study.instances,
            "url": url,
            "payload": payload,
            "state": PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        }

    async def deliver_due(self) -> int:
        """One batch of due deliveries, sent concurrently; returns how many were claimed."""
        claimed = await asyncio.to_thread(self._claim)
        await asyncio.gather(*(self._send(due) for due in claimed))
        return len(claimed)

    def _claim(self) -> list[_Due]:
        now = utcnow()
        # Past the request's timeout: a claimer that dies mid-request lets the row come back.
        hold = now + timedelta(seconds=2 * self._settings.webhook_timeout_seconds + 5)
        due = WebhookDelivery.state == PENDING, WebhookDelivery.next_attempt_at <= now
        with self._sessions() as session:
            ids = session.scalars(
                select(WebhookDelivery.id)
                .where(*due)
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
                .limit(_DELIVER_BATCH)
            ).all()
            mine = [
                row_id
                for row_id in ids
                if changed_rows(
                    session,
                    update(WebhookDelivery)
                    .where(WebhookDelivery.id == row_id, *due)
                    .values(next_attempt_at=hold),
                )
                == 1
            ]
            session.commit()
            rows = session.execute(
                select(
                    WebhookDelivery.id,
                    WebhookDelivery.url,
                    WebhookDelivery.payload,
                    WebhookDelivery.attempts,
                ).where(WebhookDelivery.id.in_(mine))
            ).all()
        return [_Due(r.id, r.url, r.payload, r.attempts) for r in rows]

    async def _send(self, due: _Due) -> None:
        body = encode(due.payload)
        headers = {
            "Content-Type": "application/json",
            "X-Intake-Event": EVENT,
            "X-Intake-Delivery": str(due.id),
            "X-Intake-Signature": sign(self._secret, body),
        }
        status: int | None = None
        error: str | None = None
        try:
            response = await self._client.post(due.url, content=body, headers=headers)
            status = response.status_code
            if not response.is_success:
                error = f"HTTP {status} {response.reason_phrase}".strip()
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        await asyncio.to_thread(self._record, due, status, error)

    def _record(self, due: _Due, status: int | None, error: str | None) -> None:
        now = utcnow()
        attempts = due.attempts + 1
        values: dict[str, Any] = {"attempts": attempts, "last_status": status, "last_error": error}
        if error is None:
            values |= {"state": DELIVERED, "delivered_at": now, "next_attempt_at": None}
        elif attempts >= self._settings.webhook_max_attempts:
            values |= {"state": FAILED, "next_attempt_at": None}
        else:
            delay = min(
                self._settings.webhook_retry_max_seconds,
                self._settings.webhook_retry_base_seconds * 2 ** min(attempts - 1, 30),
            )
            delay *= random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not cryptography
            values["next_attempt_at"] = now + timedelta(seconds=delay)
        with self._sessions() as session:
            # Only if no other process recorded an attempt since this one claimed the row.
            session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == due.id,
                    WebhookDelivery.state == PENDING,
                    WebhookDelivery.attempts == due.attempts,
                )
                .values(**values)
            )
            session.commit()
        outcome = values.get("state", "retry later")
        log.info(
            "webhook delivery=%d attempt=%d status=%s: %s%s",
            due.id,
            attempts,
            status,
            outcome,
            f" ({error})" if error else "",
        )
