"""The public listener: uploads only. No route here reads, lists or deletes anything."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from app.access.sites import AuthenticatedSite
from app.api import openapi
from app.api.deps import HeadDep, IntakeDep, SiteDep
from app.errors import MalformedMultipart, Refused
from app.intake.ledger import Receipt
from app.intake.pipeline import Batch, Intake, Item, Refusal, RequestHead

log = logging.getLogger(__name__)
router = APIRouter(redirect_slashes=False)


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
        **({"IntakeReason": receipt.reason} if receipt.reason else {}),
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
    request: Request, site: AuthenticatedSite, intake: Intake, head: RequestHead
) -> Response:
    """Legacy Orthanc Explorer / browser forms: each file part through the pipeline."""
    batch, _fields = await intake.receive_multipart(
        site,
        head,
        request.stream(),
        keep=lambda _media, filename: filename is not None,
        archives=True,
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
    raise Refused(
        error,
        counted=True,
        detail=f"{len(refused)} of {len(batch.items)} files refused ({accepted} accepted); "
        f"first: {first.name}: {error.detail}",
    )


@router.post(
    "/instances", responses=openapi.INSTANCES_RESPONSES, openapi_extra=openapi.INSTANCES_REQUEST
)
@router.post("/instances/", include_in_schema=False)
async def store_instance(
    request: Request, site: SiteDep, head: HeadDep, intake: IntakeDep
) -> Response:
    """Store DICOM: a raw instance (any Content-Type, optionally gzip), a ZIP, or a form."""
    # The site comes first: nothing of the head is judged before the caller is known.
    try:
        if head.media.name == "multipart/form-data":
            return await _store_form(request, site, intake, head)
        result = await intake.receive(site, head, request.stream())
    except ClientDisconnect:
        # Nobody is left to answer; the partial body is already gone from the spool.
        log.info("site=%s remote=%s disconnected mid-upload", site.name, head.client_address)
        return Response(status_code=400)
    if isinstance(result, Batch):  # a ZIP: an array in archive order (Orthanc 1.8.2+)
        return JSONResponse([_item_answer(item) for item in result.items])
    return JSONResponse(_instance_answer(result))


@router.get("/system", responses=openapi.SYSTEM_RESPONSES)
async def system(site: SiteDep) -> dict[str, Any]:
    """Enough for an Orthanc peer's "test" button; nothing about the private Orthanc."""
    return {"Name": "Orthanc Intake", "ApiVersion": 1, "Site": site.name}
