"""The dependency both listeners share: the running Service."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.service import Service


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]
