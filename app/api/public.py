"""The public listener: uploads only. No route here reads, lists or deletes anything."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from app import sites
from app.api.deps import ServiceDep
from app.errors import MalformedMultipart
from app.intake import Batch, Item, Receipt, Refusal
from app.parts import MediaType
from app.service import Service
from app.tls import CLIENT_CERT_STATE

log = logging.getLogger(__name__)
router = APIRouter(redirect_slashes=False)


async def get_site(request: Request, service: ServiceDep) -> sites.AuthenticatedSite:
    """Authenticate from headers alone, before a byte of the body is read."""
    peer = request.client.host if request.client else None
    # Repeated header lines form one list (RFC 9110 §5.3); some proxies add a line.
    forwarded = ",".join(request.headers.getlist("x-forwarded-for")) or None
    address = service.access.client_address(peer, forwarded)
    request.state.client_address = address
    return await service.access.authenticate(
        request.headers.get("authorization"),
        address,
        getattr(request.state, CLIENT_CERT_STATE, None),  # set by app/tls.py's protocol
    )


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


def _item_answer(item: Item) -> dict[str, Any]:
    """One file of a ZIP or form upload: Orthanc's object, or a Failure with the reason."""
    outcome = item.outcome
    if isinstance(outcome, Receipt):
        answer = _instance_answer(outcome)
    else:
        error = outcome.error
        answer = {
            "Status": "Failure",  # Orthanc's StoreStatus_Failure
            "HttpStatus": error.status_code,
            "Message": error.message,
            "Details": error.detail,
            "IntakeReason": error.reason,
            "IntakeReceipt": outcome.receipt,
        }
    if item.name is not None:
        answer["IntakeEntry"] = item.name
    return answer


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "").lower()


async def _store_form(
    request: Request, site: sites.AuthenticatedSite, service: Service, media: MediaType
) -> Response:
    """Legacy Orthanc Explorer / browser forms: each file part through the pipeline."""
    batch, _fields = await service.intake.receive_multipart(
        site,
        request.state.client_address,
        request.stream(),
        media.boundary(),
        keep=lambda _media, filename: filename is not None,
        archives=True,
        content_encoding=request.headers.get("content-encoding"),
        declared_bytes=declared_bytes(request),
    )
    if not batch.items and not batch.skipped:
        raise MalformedMultipart("the form holds no file part")
    if _wants_json(request):
        return JSONResponse([_item_answer(item) for item in batch.items])
    refused = [i for i in batch.items if isinstance(i.outcome, Refusal)]
    if not refused:
        return Response(status_code=200)  # what Orthanc answers a form upload
    first = refused[0]
    assert isinstance(first.outcome, Refusal)
    error = first.outcome.error
    accepted = len(batch.items) - len(refused)
    error.detail = (
        f"{len(refused)} of {len(batch.items)} files refused ({accepted} accepted); "
        f"first: {first.name}: {error.detail}"
    )
    raise error


def declared_bytes(request: Request) -> int | None:
    declared = request.headers.get("content-length", "")
    return int(declared) if declared.isdigit() else None


@router.post("/instances")
@router.post("/instances/", include_in_schema=False)
async def store_instance(request: Request, site: SiteDep, service: ServiceDep) -> Response:
    """Store DICOM: a raw instance (any Content-Type, optionally gzip), a ZIP, or a form."""
    address: str | None = request.state.client_address
    media = MediaType.parse(request.headers.get("content-type"))
    try:
        if media.name == "multipart/form-data":
            return await _store_form(request, site, service, media)
        result = await service.intake.receive(
            site,
            address,
            request.stream(),
            request.headers.get("content-encoding"),
            declared_bytes=declared_bytes(request),
        )
    except ClientDisconnect:
        # Nobody is left to answer; the partial body is already gone from the spool.
        log.info("site=%s remote=%s disconnected mid-upload", site.name, address)
        return Response(status_code=400)
    if isinstance(result, Batch):  # a ZIP: an array in archive order (Orthanc 1.8.2+)
        return JSONResponse([_item_answer(item) for item in result.items])
    return JSONResponse(_instance_answer(result))


@router.get("/system")
async def system(site: SiteDep) -> dict[str, Any]:
    """Enough for an Orthanc peer's "test" button; nothing about the private Orthanc."""
    return {"Name": "Orthanc Intake", "ApiVersion": 1, "Site": site.name}
