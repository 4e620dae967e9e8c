"""Health and metrics for load balancers and monitors: no credentials, nothing about a patient.

These routes are open because the admin listener is bound to loopback
(``INTAKE_ADMIN_HOST``, 127.0.0.1 by default): only the host's own monitoring
reaches them. Metrics labels carry site names and reasons, never a token or a UID.
"""

from __future__ import annotations

import asyncio
import os
import uuid

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from app.api.admin.deps import ServiceDep
from app.errors import ForwardError, SpoolFull
from app.intake.spool import TMP
from app.metrics import CONTENT_TYPE
from app.service import Service

router = APIRouter(tags=["health"])

# A monitor polls /readyz; a hung Orthanc must not hold the answer for a minute.
_ORTHANC_CHECK_SECONDS = 5.0


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, bool] = Field(description="database, orthanc, spool, forwarder")
    failing: dict[str, str] = Field(description="Why each failing check failed")


@router.get("/", include_in_schema=False)
async def index() -> dict[str, str]:
    """Where the admin API's description is: for whoever opens the listener's URL."""
    return {
        "service": "Orthanc Intake admin API",
        "docs": "/docs",
        "openapi": "/openapi.json",
        "health": "/healthz",
    }


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


async def _database(service: Service) -> str | None:
    ok = await asyncio.to_thread(service.database_ready)
    return None if ok else "the database does not answer"


async def _orthanc(service: Service) -> str | None:
    timeout = min(_ORTHANC_CHECK_SECONDS, service.settings.orthanc_timeout_seconds)
    try:
        await asyncio.wait_for(service.orthanc.system(), timeout)
    except ForwardError as exc:
        return f"the private Orthanc does not answer: {exc.detail}"
    except TimeoutError:
        return f"the private Orthanc did not answer within {timeout:g}s"
    except ValueError:
        return "the private Orthanc's /system answer is not JSON"
    return None


def _spool_check(service: Service) -> str | None:
    """Create, fsync and remove a small file in tmp/, then check the free-space floor."""
    probe = service.spool.path(TMP, f"readyz-{uuid.uuid4().hex}.probe")
    try:
        with probe.open("wb") as file:
            file.write(b"ready")
            file.flush()
            os.fsync(file.fileno())
        probe.unlink()
    except OSError as exc:
        return f"the spool is not writable: {exc.strerror or type(exc).__name__}"
    try:
        service.spool.check_free_space()
    except SpoolFull as exc:
        return exc.detail
    except OSError as exc:
        return f"the spool's free space is unknown: {exc.strerror or type(exc).__name__}"
    return None


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "A check failed"}},
)
async def readyz(service: ServiceDep) -> JSONResponse:
    """The database and the private Orthanc answer, the spool takes files above its floor,
    and the forwarder runs (its own process may be starting or restarting)."""
    database, orthanc, spool = await asyncio.gather(
        _database(service), _orthanc(service), asyncio.to_thread(_spool_check, service)
    )
    forwarder = None
    if not service.forwarder_running():
        forwarder = "the forwarder process is not running: starting, or restarting (see the log)"
    problems = {"database": database, "orthanc": orthanc, "spool": spool, "forwarder": forwarder}
    failing = {name: problem for name, problem in problems.items() if problem is not None}
    body = Readiness(
        ready=not failing,
        checks={name: problem is None for name, problem in problems.items()},
        failing=failing,
    )
    return JSONResponse(body.model_dump(), status_code=503 if failing else 200)


@router.get("/metrics", response_class=Response)
async def metrics(service: ServiceDep) -> Response:
    """Prometheus text format: per-site uploads, bytes, forwards, latency, queue depth."""
    content = await asyncio.to_thread(service.metrics.render)
    return Response(content, media_type=CONTENT_TYPE)
