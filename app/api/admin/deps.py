"""What every admin route shares: the service, the authenticated admin, the error shape."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.deps import ServiceDep as ServiceDep  # re-exported for the admin routes
from app.errors import IntakeError


class ErrorBody(BaseModel):
    """Every admin error: a machine-readable ``error`` and a human ``detail``."""

    error: str
    detail: str


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "A request that cannot be carried out as asked"},
    401: {"model": ErrorBody, "description": "No or wrong admin credentials"},
    403: {"model": ErrorBody, "description": "Address outside the admin allow-list"},
    422: {"model": ErrorBody, "description": "A parameter or body that does not validate"},
    429: {"model": ErrorBody, "description": "Too many failed authentications"},
}

# Row ids are 64-bit: a larger number is a 422, never a database error.
RowId = Annotated[int, Path(ge=1, le=2**63 - 1, description="A row id")]


async def get_admin(request: Request, service: ServiceDep) -> str:
    """The admin making the request (HTTP Basic name + password, or a Bearer admin token)."""
    address = request.client.host if request.client else None
    return await service.admin_access.authenticate(request.headers.get("authorization"), address)


AdminDep = Annotated[str, Depends(get_admin)]


def _body(error: str, detail: str, status: int, headers: Any = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def admin_error_body(error: IntakeError, _method: str = "", _path: str = "") -> dict[str, object]:
    """The admin listener's error shape: ``{"error": reason, "detail": ...}``."""
    return {"error": error.reason, "detail": error.detail or error.message}


def install_admin_errors(app: FastAPI) -> None:
    async def _intake_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, IntakeError)  # registered for IntakeError only
        return JSONResponse(admin_error_body(exc), status_code=exc.status_code, headers=exc.headers)

    async def _http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)  # registered for it only
        error = "not_found" if exc.status_code == 404 else "http_error"
        return _body(error, f"{request.method} {request.url.path}: {exc.detail}", exc.status_code)

    async def _invalid(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)  # registered for it only
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return _body("invalid_request", problems, 422)

    app.add_exception_handler(IntakeError, _intake_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
