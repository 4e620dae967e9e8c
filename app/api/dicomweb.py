"""DICOMweb STOW-RS on the public listener: ``POST /dicom-web/studies[/{study}]``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from app import stow
from app.api.deps import ServiceDep
from app.api.public import SiteDep, declared_bytes
from app.errors import MalformedMultipart, NotAcceptable, UnsupportedMediaType
from app.parts import MediaType

router = APIRouter(redirect_slashes=False)

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


@router.post("/dicom-web/studies")
async def store_instances(request: Request, site: SiteDep, service: ServiceDep) -> Response:
    """STOW-RS Store Instances (PS3.18 §10.5)."""
    return await _store(request, site, service, None)


@router.post("/dicom-web/studies/{study}")
async def store_study_instances(
    study: str, request: Request, site: SiteDep, service: ServiceDep
) -> Response:
    """STOW-RS into one study: instances of another study are refused one by one."""
    return await _store(request, site, service, study)
