"""The admin listener (127.0.0.1 by default): health for now; the admin API grows here."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from app.errors import ForwardError
from app.service import Service

router = APIRouter()


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(service: ServiceDep) -> JSONResponse:
    """The database and the private Orthanc answer, and the spool takes files."""
    checks: dict[str, Any] = {"database": await asyncio.to_thread(service.database_ready)}
    try:
        await service.orthanc.system()
        checks["orthanc"] = True
    except ForwardError:
        checks["orthanc"] = False
    try:
        service.spool.check_free_space()
        checks["spool"] = True
    except Exception:
        checks["spool"] = False
    ready = all(checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)
