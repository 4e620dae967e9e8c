"""What the routes take: small typed dependencies, each read once per request.

``ServiceDep`` is for the few routes that run the service itself (health, start-up); the
public routes take the site (``SiteDep``, authenticated from the head alone), the
request's head as one value (``HeadDep``) and the pipeline (``IntakeDep``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.access.gate import Access
from app.access.sites import AuthenticatedSite
from app.api.protocol import CLIENT_CERT_STATE
from app.intake.multipart import MediaType
from app.intake.pipeline import Intake, RequestHead
from app.service import Service

# The dependencies are async: FastAPI runs a plain `def` dependency in a worker thread, a
# hand-off per request that was 11 % of the upload path's CPU (docs/PERFORMANCE.md).


async def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


async def get_access(service: ServiceDep) -> Access:
    return service.access


async def get_intake(service: ServiceDep) -> Intake:
    return service.intake


AccessDep = Annotated[Access, Depends(get_access)]
IntakeDep = Annotated[Intake, Depends(get_intake)]


async def get_client_address(request: Request, access: AccessDep) -> str | None:
    """The client as the site's policy sees it: the peer, or X-Forwarded-For from a
    trusted proxy. Kept on the request for the refusal log (app/api/errors.py)."""
    peer = request.client.host if request.client else None
    # Repeated header lines form one list (RFC 9110 §5.3); some proxies add a line.
    forwarded = ",".join(request.headers.getlist("x-forwarded-for")) or None
    address = access.client_address(peer, forwarded)
    request.state.client_address = address
    return address


ClientAddressDep = Annotated[str | None, Depends(get_client_address)]


async def get_site(
    request: Request, access: AccessDep, address: ClientAddressDep
) -> AuthenticatedSite:
    """Authenticate from headers alone, before a byte of the body is read."""
    site = await access.authenticate(
        request.headers.get("authorization"),
        address,
        getattr(request.state, CLIENT_CERT_STATE, None),  # set by app/api/protocol.py
    )
    request.state.site_name = site.name  # for the refusal log (app/api/errors.py)
    return site


SiteDep = Annotated[AuthenticatedSite, Depends(get_site)]


def declared_bytes(request: Request) -> int | None:
    declared = request.headers.get("content-length", "")
    return int(declared) if declared.isdigit() else None


async def get_head(request: Request, address: ClientAddressDep) -> RequestHead:
    """The request's head as the pipeline reads it, parsed once."""
    return RequestHead(
        client_address=address,
        media=MediaType.parse(request.headers.get("content-type")),
        content_encoding=request.headers.get("content-encoding"),
        declared_bytes=declared_bytes(request),
    )


HeadDep = Annotated[RequestHead, Depends(get_head)]
