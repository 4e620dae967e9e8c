"""The public listener: uploads only. No route here reads, lists or deletes anything."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from app import sites
from app.api.deps import ServiceDep
from app.intake import Receipt

log = logging.getLogger(__name__)
router = APIRouter(redirect_slashes=False)


async def get_site(request: Request, service: ServiceDep) -> sites.AuthenticatedSite:
    """Authenticate from headers alone, before a byte of the body is read."""
    peer = request.client.host if request.client else None
    # Repeated header lines form one list (RFC 9110 §5.3); some proxies add a line.
    forwarded = ",".join(request.headers.getlist("x-forwarded-for")) or None
    address = service.access.client_address(peer, forwarded)
    request.state.client_address = address
    return await service.access.authenticate(request.headers.get("authorization"), address)


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
    declared = request.headers.get("content-length", "")
    address: str | None = request.state.client_address
    try:
        receipt = await service.intake.receive(
            site,
            address,
            request.stream(),
            request.headers.get("content-encoding"),
            declared_bytes=int(declared) if declared.isdigit() else None,
        )
    except ClientDisconnect:
        # Nobody is left to answer; the partial body is already gone from the spool.
        log.info("site=%s remote=%s disconnected mid-upload", site.name, address)
        return Response(status_code=400)
    return JSONResponse(_instance_answer(receipt))


@router.get("/system")
async def system(site: SiteDep) -> dict[str, Any]:
    """Enough for an Orthanc peer's "test" button; nothing about the private Orthanc."""
    return {"Name": "Orthanc Intake", "ApiVersion": 1, "Site": site.name}
