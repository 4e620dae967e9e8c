"""The public listener: uploads only. No route here reads, lists or deletes anything."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from app.access import sites
from app.api.deps import ServiceDep
from app.api.protocol import CLIENT_CERT_STATE
from app.errors import MalformedMultipart, Refused
from app.intake.ledger import Receipt
from app.intake.multipart import MediaType
from app.intake.pipeline import Batch, Item, Refusal
from app.service import Service

log = logging.getLogger(__name__)
router = APIRouter(redirect_slashes=False)


async def get_site(request: Request, service: ServiceDep) -> sites.AuthenticatedSite:
    """Authenticate from headers alone, before a byte of the body is read."""
    peer = request.client.host if request.client else None
    # Repeated header lines form one list (RFC 9110 §5.3); some proxies add a line.
    forwarded = ",".join(request.headers.getlist("x-forwarded-for")) or None
    address = service.access.client_address(peer, forwarded)
    request.state.client_address = address
    site = await service.access.authenticate(
        request.headers.get("authorization"),
        address,
        getattr(request.state, CLIENT_CERT_STATE, None),  # set by app/api/protocol.py
    )
    request.state.site_name = site.name  # for the refusal log (app/api/errors.py)
    return site


SiteDep = Annotated[sites.AuthenticatedSite, Depends(get_site)]

# --- The OpenAPI contract (documentation only: nothing below changes an answer) -----------
# The public listener serves no /openapi.json, so strangers have nothing to enumerate; the
# document is generated offline with ``create_public_app(settings).openapi()``, and
# tests/test_schemas.py checks the live listener against it with schemathesis.

BINARY_SCHEMA: dict[str, Any] = {"type": "string", "format": "binary"}
ORTHANC_ERROR_SCHEMA: dict[str, Any] = {
    "title": "OrthancError",
    "description": "Orthanc's error shape; `Details` says precisely why (docs/VALIDATION.md).",
    "type": "object",
    "required": [
        "HttpError",
        "HttpStatus",
        "Message",
        "Method",
        "OrthancError",
        "OrthancStatus",
        "Uri",
    ],
    "properties": {
        "HttpError": {"type": "string"},
        "HttpStatus": {"type": "integer"},
        "Message": {"type": "string"},
        "Method": {"type": "string"},
        "OrthancError": {"type": "string"},
        "OrthancStatus": {"type": "integer"},
        "Uri": {"type": "string"},
        "Details": {"type": "string"},
    },
}
_ORTHANC_ID: dict[str, Any] = {"type": "string", "pattern": "^[0-9a-f]{8}(-[0-9a-f]{8}){4}$"}
INSTANCE_SCHEMA: dict[str, Any] = {
    "title": "StoredInstance",
    "description": "Orthanc's answer to a stored instance, plus the intake's receipt.",
    "type": "object",
    "required": [
        "ID",
        "ParentPatient",
        "ParentSeries",
        "ParentStudy",
        "Path",
        "Status",
        "IntakeReceipt",
        "IntakeState",
    ],
    "properties": {
        "ID": _ORTHANC_ID,
        "ParentPatient": _ORTHANC_ID,
        "ParentSeries": _ORTHANC_ID,
        "ParentStudy": _ORTHANC_ID,
        "Path": {"type": "string"},
        "Status": {
            "type": "string",
            "enum": ["Success", "AlreadyStored", "FilteredOut"],
            "description": "Success: new, on its way to the archive; AlreadyStored: the "
            "archive has (or is getting) this site's copy of this Orthanc instance; "
            "FilteredOut: taken but held, not stored (IntakeReason says why)",
        },
        "IntakeReceipt": {"type": "string"},
        "IntakeState": {"type": "string", "enum": ["queued", "duplicate", "quarantined"]},
        "IntakeReason": {
            "type": "string",
            "description": "why a quarantined upload is held: conflict, foreign_study",
        },
        "IntakeEntry": {"type": "string", "description": "ZIP entry or form part file name"},
    },
}
_FAILED_FILE_SCHEMA: dict[str, Any] = {
    "title": "RefusedFile",
    "description": "One refused file of a ZIP or form upload.",
    "type": "object",
    "required": ["Status", "HttpStatus", "Message", "Details", "IntakeReason", "IntakeReceipt"],
    "properties": {
        "Status": {"type": "string", "enum": ["Failure"]},
        "HttpStatus": {"type": "integer"},
        "Message": {"type": "string"},
        "Details": {"type": "string"},
        "IntakeReason": {"type": "string"},
        "IntakeReceipt": {"type": "string"},
        "IntakeEntry": {"type": "string"},
    },
}
_ERROR_DESCRIPTIONS = {
    400: "Not an acceptable instance, or a body that cannot be read (Details says why)",
    401: "No or wrong site credentials",
    403: "The site's policy refuses this address, content or client certificate",
    406: "An Accept the answer cannot be sent in",
    408: "The body stalled, or arrived under the minimum rate",
    413: "Over a size, entry or part cap",
    415: "A Content-Encoding or Content-Type this route does not take",
    429: "Over the site's rate, quota or concurrent uploads, or too many failed logins",
    503: "The intake's database is unavailable",
    507: "The intake's spool is full",
}
_ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}},
    429: {"Retry-After": {"schema": {"type": "string"}, "required": True}},
    503: {"Retry-After": {"schema": {"type": "string"}, "required": True}},
    507: {"Retry-After": {"schema": {"type": "string"}, "required": True}},
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for refusals, in Orthanc's error shape."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        response: dict[str, Any] = {
            "description": _ERROR_DESCRIPTIONS[status],
            "content": {"application/json": {"schema": ORTHANC_ERROR_SCHEMA}},
        }
        if status in _ERROR_HEADERS:
            response["headers"] = _ERROR_HEADERS[status]
        responses[status] = response
    return responses


UPLOAD_ERRORS = (400, 401, 403, 408, 413, 415, 429, 503, 507)
_INSTANCES_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "A raw instance: the stored instance. A ZIP archive: an array, one object per DICOM"
            " entry in archive order (non-DICOM entries and DICOMDIRs are left out, as Orthanc"
            " does). A form: an empty body when every file was taken (Orthanc's answer), or,"
            " with `Accept: application/json`, an array, one object per file."
        ),
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [
                        INSTANCE_SCHEMA,
                        {
                            "type": "array",
                            "items": {"anyOf": [INSTANCE_SCHEMA, _FAILED_FILE_SCHEMA]},
                        },
                    ]
                }
            }
        },
    },
    **error_responses(*UPLOAD_ERRORS),
}
_INSTANCES_REQUEST: dict[str, Any] = {
    "parameters": [
        {
            "name": "Content-Encoding",
            "in": "header",
            "required": False,
            "description": "A gzip body is inflated as a stream, its inflated size capped",
            "schema": {"type": "string", "enum": ["gzip", "x-gzip", "identity"]},
        }
    ],
    "requestBody": {
        "required": True,
        "description": (
            "One DICOM Part 10 file (any Content-Type but the two below), a ZIP archive of"
            " DICOM files (found by its magic bytes), or a multipart/form-data form whose file"
            " parts are DICOM files or ZIP archives."
        ),
        "content": {
            "application/dicom": {"schema": BINARY_SCHEMA},
            "application/octet-stream": {"schema": BINARY_SCHEMA},
            "application/zip": {"schema": BINARY_SCHEMA},
            "multipart/form-data": {
                "schema": {"type": "object", "additionalProperties": BINARY_SCHEMA},
            },
        },
    },
}
_SYSTEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Enough for an Orthanc peer's test button",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["Name", "ApiVersion", "Site"],
                    "properties": {
                        "Name": {"type": "string"},
                        "ApiVersion": {"type": "integer"},
                        "Site": {"type": "string"},
                    },
                    "additionalProperties": False,
                }
            }
        },
    },
    **error_responses(401, 403, 429, 503),
}


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
    raise Refused(
        error,
        counted=True,
        detail=f"{len(refused)} of {len(batch.items)} files refused ({accepted} accepted); "
        f"first: {first.name}: {error.detail}",
    )


def declared_bytes(request: Request) -> int | None:
    declared = request.headers.get("content-length", "")
    return int(declared) if declared.isdigit() else None


@router.post("/instances", responses=_INSTANCES_RESPONSES, openapi_extra=_INSTANCES_REQUEST)
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


@router.get("/system", responses=_SYSTEM_RESPONSES)
async def system(site: SiteDep) -> dict[str, Any]:
    """Enough for an Orthanc peer's "test" button; nothing about the private Orthanc."""
    return {"Name": "Orthanc Intake", "ApiVersion": 1, "Site": site.name}
