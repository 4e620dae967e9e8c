"""DICOMweb STOW-RS on the public listener: ``POST /dicom-web/studies[/{study}]``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from app.access.sites import AuthenticatedSite
from app.api import openapi
from app.api.deps import HeadDep, IntakeDep, SiteDep
from app.dicom.summary import MAX_IDENTIFIER_BYTES, UID_CHARS
from app.errors import InvalidUid, MalformedMultipart, NotAcceptable, UnsupportedMediaType
from app.intake import stow
from app.intake.multipart import MediaType
from app.intake.pipeline import Intake, RequestHead

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
    request: Request, site: AuthenticatedSite, head: RequestHead, intake: Intake, study: str | None
) -> Response:
    _check_accept(request)
    media = head.media
    kind = media.params.get("type", _DICOM).lower()
    if media.name != "multipart/related" or kind != _DICOM:
        raise UnsupportedMediaType(
            f'send multipart/related; type="{_DICOM}" (got {media.name or "no Content-Type"}'
            + (f', type="{kind}"' if media.name == "multipart/related" else "")
            + "); metadata with bulk data is not taken"
        )
    try:
        batch, unkept = await intake.receive_multipart(
            site, head, request.stream(), keep=_is_dicom, archives=False, expected_study=study
        )
    except ClientDisconnect:
        return Response(status_code=400)
    if not batch.items and not unkept:
        raise MalformedMultipart("the body holds no part")
    status, body = stow.response(batch, unkept)
    return JSONResponse(body, status_code=status, media_type=stow.MEDIA_TYPE)


@router.post(
    "/dicom-web/studies", responses=openapi.STOW_RESPONSES, openapi_extra=openapi.STOW_REQUEST
)
async def store_instances(
    request: Request, site: SiteDep, head: HeadDep, intake: IntakeDep
) -> Response:
    """STOW-RS Store Instances (PS3.18 §10.5)."""
    return await _store(request, site, head, intake, None)


@router.post(
    "/dicom-web/studies/{study}",
    responses=openapi.STOW_RESPONSES,
    openapi_extra=openapi.STOW_REQUEST,
)
async def store_study_instances(
    study: str, request: Request, site: SiteDep, head: HeadDep, intake: IntakeDep
) -> Response:
    """STOW-RS into one study: instances of another study are refused one by one."""
    if len(study) > MAX_IDENTIFIER_BYTES or not UID_CHARS.fullmatch(study):
        raise InvalidUid(
            f"the study UID in the URL ({study[:80]!r}) is not a UID: printable ASCII "
            f"without spaces or backslashes, at most {MAX_IDENTIFIER_BYTES} characters"
        )
    return await _store(request, site, head, intake, study)
