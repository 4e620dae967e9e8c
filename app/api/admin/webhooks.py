"""Admin routes for study-arrived webhook deliveries: list them, retry a failed one."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from app.api.admin.deps import ERROR_RESPONSES, AdminDep, ErrorBody, RowId, ServiceDep
from app.webhooks import deliveries

router = APIRouter(
    prefix="/api/webhooks",
    tags=["webhooks"],
    responses={**ERROR_RESPONSES, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)


class DeliveryOut(BaseModel):
    id: int = Field(description="Also sent as X-Intake-Delivery")
    site: str
    study_instance_uid: str
    orthanc_study_id: str | None
    instance_count: int
    url: str
    state: str = Field(description="pending, delivered or failed")
    attempts: int
    next_attempt_at: datetime | None
    last_status: int | None = Field(description="The receiver's last HTTP status")
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    payload: dict[str, Any] = Field(description="The event body, as signed and sent")


def _out(view: deliveries.DeliveryView) -> DeliveryOut:
    return DeliveryOut.model_validate(view, from_attributes=True)


@router.get("/deliveries")
async def list_deliveries(
    _: AdminDep,
    service: ServiceDep,
    state: Literal["pending", "delivered", "failed"] | None = None,
    site: str | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
    before: int | None = Query(
        default=None, ge=1, le=2**63 - 1, description="Only ids below this (next page)"
    ),
) -> list[DeliveryOut]:
    """Newest first. Each study that went quiet and settled makes one delivery per URL."""

    def run() -> list[deliveries.DeliveryView]:
        with service.readers() as session:
            return deliveries.list_deliveries(
                session, state=state, site=site, limit=limit, before=before
            )

    return [_out(v) for v in await asyncio.to_thread(run)]


@router.get("/deliveries/{delivery_id}")
async def show_delivery(delivery_id: RowId, _: AdminDep, service: ServiceDep) -> DeliveryOut:
    def run() -> deliveries.DeliveryView:
        with service.readers() as session:
            return deliveries.show(session, delivery_id)

    return _out(await asyncio.to_thread(run))


@router.post("/deliveries/{delivery_id}/retry")
async def retry_delivery(delivery_id: RowId, _: AdminDep, service: ServiceDep) -> DeliveryOut:
    """A failed delivery is sent again now, with its full series of attempts (409 otherwise)."""

    def run() -> deliveries.DeliveryView:
        with service.sessions() as session:
            return deliveries.retry(session, delivery_id)

    view = await asyncio.to_thread(run)
    service.webhooks.notify()
    return _out(view)
