"""Webhook deliveries as an admin sees them: list, show, retry a failed one."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db.models import Site, WebhookDelivery, utcnow
from app.db.sessions import changed_rows
from app.errors import DeliveryNotFailed, DeliveryNotFound
from app.webhooks.notifier import FAILED, PENDING


@dataclass(frozen=True)
class DeliveryView:
    id: int
    site: str
    study_instance_uid: str
    orthanc_study_id: str | None
    instance_count: int
    url: str
    state: str
    attempts: int
    next_attempt_at: datetime | None
    last_status: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    payload: dict[str, Any]


def _view(row: WebhookDelivery, site: str) -> DeliveryView:
    return DeliveryView(
        id=row.id,
        site=site,
        study_instance_uid=row.study_instance_uid,
        orthanc_study_id=row.orthanc_study_id,
        instance_count=row.instance_count,
        url=row.url,
        state=row.state,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        last_status=row.last_status,
        last_error=row.last_error,
        created_at=row.created_at,
        delivered_at=row.delivered_at,
        payload=row.payload,
    )


def list_deliveries(
    session: Session,
    *,
    state: str | None = None,
    site: str | None = None,
    limit: int = 100,
    before: int | None = None,
) -> list[DeliveryView]:
    """Newest first; ``before`` (an id) continues a listing page by page."""
    query = select(WebhookDelivery, Site.name).join(Site, Site.id == WebhookDelivery.site_id)
    if state is not None:
        query = query.where(WebhookDelivery.state == state)
    if site is not None:
        query = query.where(Site.name == site)
    if before is not None:
        query = query.where(WebhookDelivery.id < before)
    rows = session.execute(query.order_by(WebhookDelivery.id.desc()).limit(limit)).all()
    return [_view(row, name) for row, name in rows]


def show(session: Session, delivery_id: int) -> DeliveryView:
    found = session.execute(
        select(WebhookDelivery, Site.name)
        .join(Site, Site.id == WebhookDelivery.site_id)
        .where(WebhookDelivery.id == delivery_id)
    ).first()
    if found is None:
        raise DeliveryNotFound(f"no webhook delivery #{delivery_id}")
    return _view(found[0], found[1])


def retry(session: Session, delivery_id: int) -> DeliveryView:
    """A failed delivery becomes pending now, with its full series of attempts again."""
    changed = changed_rows(
        session,
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.state == FAILED)
        .values(state=PENDING, attempts=0, next_attempt_at=utcnow()),
    )
    session.commit()
    view = show(session, delivery_id)
    if changed != 1:
        raise DeliveryNotFailed(
            f"webhook delivery #{delivery_id} is {view.state}; only failed ones are retried"
        )
    return view
