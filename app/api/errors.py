"""Rendering of the error tree: Orthanc's JSON shape on the public listener."""

from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import IntakeError, MethodNotAllowed, NotFound

# A request target is echoed at most this long: a 30 KB path answered twice in every 404
# let a client that pipelines requests and reads nothing fill buffers 100 times faster.
_MAX_ECHOED_PATH = 256


def _echoed(path: str) -> str:
    return path if len(path) <= _MAX_ECHOED_PATH else path[:_MAX_ECHOED_PATH] + "…"


def orthanc_error_body(error: IntakeError, method: str, path: str) -> dict[str, object]:
    """The shape Orthanc answers errors with (see shared/ORTHANC.md)."""
    body: dict[str, object] = {
        "HttpError": HTTPStatus(error.status_code).phrase,
        "HttpStatus": error.status_code,
        "Message": error.message,
        "Method": method,
        "OrthancError": error.orthanc_error,
        "OrthancStatus": error.orthanc_status,
        "Uri": _echoed(path),
    }
    if error.detail:
        body["Details"] = error.detail
    return body


def install_orthanc_errors(app: FastAPI) -> None:
    async def _intake_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, IntakeError)
        return JSONResponse(
            orthanc_error_body(exc, request.method, request.url.path),
            status_code=exc.status_code,
            headers=exc.headers,
        )

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
    app.add_exception_handler(StarletteHTTPException, _http_error)
