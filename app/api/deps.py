"""The dependency both listeners share: the running Service."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.service import Service


async def get_service(request: Request) -> Service:
    # async: FastAPI runs a plain `def` dependency in a worker thread, a hand-off per
    # request that was 11 % of the upload path's CPU (docs/PERFORMANCE.md).
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]
