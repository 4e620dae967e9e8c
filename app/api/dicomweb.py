"""DICOMweb STOW-RS on the public listener: ``POST /dicom-web/studies[/{study}]``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from app.api.deps import ServiceDep
from app.api.public import BINARY_SCHEMA, UPLOAD_ERRORS, SiteDep, declared_bytes, error_responses
from app.dicom.summary import MAX_IDENTIFIER_BYTES, UID_CHARS
from app.errors import InvalidUid, MalformedMultipart, NotAcceptable, UnsupportedMediaType
from app.intake import stow
from app.intake.multipart import MediaType

router = APIRouter(redirect_slashes=False)

# --- The OpenAPI contract (documentation only; see app/api/public.py) ---------------------
_UID_ATTRIBUTE: dict[str, Any] = {
    "type": "object",
    "required": ["vr"],
    "properties": {
        "vr": {"const": "UI"},
        "Value": {"type": "array", "items": {"type": "string"}},
    },
}
_REFERENCED: dict[str, Any] = {
    "type": "object",
    "required": ["00081150", "00081155"],
    "properties": {"00081150": _UID_ATTRIBUTE, "00081155": _UID_ATTRIBUTE},
}
_FAILED: dict[str, Any] = {
    "type": "object",
    "required": ["00081150", "00081155", "00081197"],
    "properties": {
        "00081150": _UID_ATTRIBUTE,
        "00081155": _UID_ATTRIBUTE,
        "00081197": {
            "type": "object",
            "required": ["vr", "Value"],
            "properties": {
                "vr": {"const": "US"},
                "Value": {"type": "array", "items": {"type": "integer"}},
            },
        },
    },
}


def _sequence(items: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["vr"],
        "properties": {"vr": {"const": "SQ"}, "Value": {"type": "array", "items": items}},
    }


_STORE_RESPONSE: dict[str, Any] = {
    "title": "StoreInstancesResponse",
    "description": (
        "PS3.18 §10.5.3 in DICOM JSON: ReferencedSOPSequence (0008,1199), FailedSOPSequence"
        " (0008,1198) with FailureReason (0008,1197)"
    ),
    "type": "object",
    "required": ["00081199"],
    "properties": {"00081199": _sequence(_REFERENCED), "00081198": _sequence(_FAILED)},
}
_STOW_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Every instance was stored",
        "content": {stow.MEDIA_TYPE: {"schema": _STORE_RESPONSE}},
    },
    202: {
        "description": "Some instances were stored, some failed",
        "content": {stow.MEDIA_TYPE: {"schema": _STORE_RESPONSE}},
    },
    409: {
        "description": "No instance was stored",
        "content": {stow.MEDIA_TYPE: {"schema": _STORE_RESPONSE}},
    },
    **error_responses(*UPLOAD_ERRORS, 406),
}
_STOW_REQUEST: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            'multipart/related; type="application/dicom"; boundary=…: one DICOM Part 10 file'
            " per part (parts without a Content-Type are taken as application/dicom)"
        ),
        "content": {"multipart/related": {"schema": {"type": "array", "items": BINARY_SCHEMA}}},
    },
}

_DICOM = "application/dicom"
_ANSWERABLE = {stow.MEDIA_TYPE, "application/json", "application/*", "*/*"}


def _check_accept(request: Request) -> None:
    accept = request.headers.get("accept")
    if not accept:
        return
    wanted = {MediaType.parse(v).name for v in accept.split(",") if v.strip()}
    if not wanted & _ANSWERABLE:
        raise NotAcceptable(f"the Store Instances Response is sent as {stow.MEDIA_TYPE} only")


def _is_dicom(media: MediaType, _filename: str | None) -> bool:
    # A part without Content-Type takes the body's `type` (RFC 2387 §3.1).
    return media.name in (_DICOM, "")


async def _store(
    request: Request, site: SiteDep, service: ServiceDep, study: str | None
) -> Response:
    _check_accept(request)
    media = MediaType.parse(request.headers.get("content-type"))
    kind = media.params.get("type", _DICOM).lower()
    if media.name != "multipart/related" or kind != _DICOM:
        raise UnsupportedMediaType(
            f'send multipart/related; type="{_DICOM}" (got {media.name or "no Content-Type"}'
            + (f', type="{kind}"' if media.name == "multipart/related" else "")
            + "); metadata with bulk data is not taken"
        )
    try:
        batch, unkept = await service.intake.receive_multipart(
            site,
            request.state.client_address,
            request.stream(),
            media.boundary(),
            keep=_is_dicom,
            archives=False,
            content_encoding=request.headers.get("content-encoding"),
            declared_bytes=declared_bytes(request),
            expected_study=study,
        )
    except ClientDisconnect:
        return Response(status_code=400)
    if not batch.items and not unkept:
        raise MalformedMultipart("the body holds no part")
    status, body = stow.response(batch, unkept)
    return JSONResponse(body, status_code=status, media_type=stow.MEDIA_TYPE)


@router.post("/dicom-web/studies", responses=_STOW_RESPONSES, openapi_extra=_STOW_REQUEST)
async def store_instances(request: Request, site: SiteDep, service: ServiceDep) -> Response:
    """STOW-RS Store Instances (PS3.18 §10.5)."""
    return await _store(request, site, service, None)


@router.post("/dicom-web/studies/{study}", responses=_STOW_RESPONSES, openapi_extra=_STOW_REQUEST)
async def store_study_instances(
    study: str, request: Request, site: SiteDep, service: ServiceDep
) -> Response:
    """STOW-RS into one study: instances of another study are refused one by one."""
    if len(study) > MAX_IDENTIFIER_BYTES or not UID_CHARS.fullmatch(study):
        raise InvalidUid(
            f"the study UID in the URL ({study[:80]!r}) is not a UID: printable ASCII "
            f"without spaces or backslashes, at most {MAX_IDENTIFIER_BYTES} characters"
        )
    return await _store(request, site, service, study)
