"""Health for load balancers and monitors: no credentials, nothing about any upload."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.admin.deps import ServiceDep
from app.errors import ForwardError

router = APIRouter(tags=["health"])


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
