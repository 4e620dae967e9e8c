"""The public listener: uploads only. No route here reads, lists or deletes anything."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import ClientDisconnect

from app import auth, sites
from app.errors import InstanceTooLarge, ServiceUnavailable
from app.intake import Receipt
from app.service import Service

log = logging.getLogger(__name__)
router = APIRouter(redirect_slashes=False)


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


async def get_site(request: Request, service: ServiceDep) -> sites.AuthenticatedSite:
    """Authenticate from headers alone, before a byte of the body is read."""
    credentials = auth.parse_authorization(request.headers.get("authorization"))

    def lookup() -> sites.AuthenticatedSite:
        with service.sessions() as session:
            return sites.authenticate(session, credentials)

    try:
        return await asyncio.to_thread(lookup)
    except SQLAlchemyError as exc:
        raise ServiceUnavailable("the intake database is unavailable; try again") from exc


SiteDep = Annotated[sites.AuthenticatedSite, Depends(get_site)]


def _instance_answer(receipt: Receipt) -> dict[str, Any]:
    return {
        "ID": receipt.ids.instance,
        "ParentPatient": receipt.ids.patient,
        "ParentSeries": receipt.ids.series,
        "ParentStudy": receipt.ids.study,
        "Path": f"/instances/{receipt.ids.instance}",
        "Status": receipt.status,
        # Intake-specific, beside Orthanc's fields.
        "IntakeReceipt": receipt.receipt,
        "IntakeState": receipt.state.value,
    }


@router.post("/instances")
@router.post("/instances/", include_in_schema=False)
async def store_instance(request: Request, site: SiteDep, service: ServiceDep) -> Response:
    """Store one DICOM instance, sent raw (any Content-Type, optionally gzip-encoded)."""
    declared = request.headers.get("content-length")
    limit = service.settings.max_instance_bytes
    if declared and declared.isdigit() and int(declared) > limit:
        raise InstanceTooLarge(f"Content-Length {declared} is over the limit of {limit} bytes")
    client = request.client.host if request.client else None
    try:
        receipt = await service.intake.receive(
            site, client, request.stream(), request.headers.get("content-encoding")
        )
    except ClientDisconnect:
        # Nobody is left to answer; the partial body is already gone from the spool.
        log.info("site=%s remote=%s disconnected mid-upload", site.name, client)
        return Response(status_code=400)
    return JSONResponse(_instance_answer(receipt))


@router.get("/system")
async def system(site: SiteDep) -> dict[str, Any]:
    """Enough for an Orthanc peer's "test" button; nothing about the private Orthanc."""
    return {"Name": "Orthanc Intake", "ApiVersion": 1, "Site": site.name}
