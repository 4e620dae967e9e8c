"""Rendering of the error tree: Orthanc's JSON shape on the public listener; and the
refusal log's line (app/access/refusals.py) for each refusal nothing else has logged
(a ``Refused`` outcome is in the intake log already, so it gets none)."""

from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from app.access.refusals import Refusal, RefusalLog
from app.errors import IntakeError, MethodNotAllowed, NotFound, Refused

# A request target is echoed at most this long: a 30 KB path answered twice in every 404
# let a client that pipelines requests and reads nothing fill buffers 100 times faster.
_MAX_ECHOED_PATH = 256


def _echoed(path: str) -> str:
    return path if len(path) <= _MAX_ECHOED_PATH else path[:_MAX_ECHOED_PATH] + "…"


def orthanc_error_body(
    error: IntakeError, method: str, path: str, detail: str | None = None
) -> dict[str, object]:
    """The shape Orthanc answers errors with (see shared/ORTHANC.md); ``detail`` in place
    of the error's own, when given."""
    detail = error.detail if detail is None else detail
    body: dict[str, object] = {
        "HttpError": HTTPStatus(error.status_code).phrase,
        "HttpStatus": error.status_code,
        "Message": error.message,
        "Method": method,
        "OrthancError": error.orthanc_error,
        "OrthancStatus": error.orthanc_status,
        "Uri": _echoed(path),
    }
    if detail:
        body["Details"] = detail
    return body


def _client_address(scope: Scope) -> str | None:
    """The client as the site's routes see it (app/api/public.py sets it once known)."""
    known = scope.get("state", {}).get("client_address")
    if known is not None:
        return str(known)
    client = scope.get("client")
    peer = client[0] if client else None
    service = getattr(getattr(scope.get("app"), "state", None), "service", None)
    if service is None:
        return peer
    forwarded = ",".join(Headers(scope=scope).getlist("x-forwarded-for")) or None
    address: str | None = service.access.client_address(peer, forwarded)
    return address


def log_refusal(scope: Scope, error: IntakeError) -> None:
    """The ``upload.refused`` line of a request refused before anything of it was stored,
    on a listener with a refusal log (the public one: ``install_orthanc_errors``)."""
    refusals = getattr(getattr(scope.get("app"), "state", None), "refusals", None)
    if not isinstance(refusals, RefusalLog):
        return
    site = scope.get("state", {}).get("site_name") or error.site
    address = _client_address(scope)
    if not refusals.admits(site, address, error.reason):
        return  # counted for the summary line: a flood costs a few microseconds a request
    declared = Headers(scope=scope).get("content-length", "")
    refusals.log(
        Refusal(
            status=error.status_code,
            reason=error.reason,
            detail=error.detail,
            method=scope.get("method", ""),
            path=scope.get("path", ""),
            site=site,
            remote_addr=address,
            declared_bytes=int(declared) if declared.isdigit() else None,
        )
    )


def install_orthanc_errors(app: FastAPI) -> None:
    app.state.refusals = RefusalLog()

    def _answer(request: Request, error: IntakeError, detail: str | None = None) -> JSONResponse:
        return JSONResponse(
            orthanc_error_body(error, request.method, request.url.path, detail),
            status_code=error.status_code,
            headers=error.headers,
        )

    async def _intake_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, IntakeError)
        log_refusal(request.scope, exc)
        return _answer(request, exc)

    async def _refused(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Refused)
        return _answer(request, exc.error, exc.detail)

    async def _http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        error: IntakeError
        if exc.status_code == 405:
            error = MethodNotAllowed(
                f"{request.method} is not allowed on {_echoed(request.url.path)}"
            )
        else:
            error = NotFound(f"the intake has no resource at {_echoed(request.url.path)}")
        return await _intake_error(request, error)

    app.add_exception_handler(IntakeError, _intake_error)
    app.add_exception_handler(Refused, _refused)
    app.add_exception_handler(StarletteHTTPException, _http_error)
