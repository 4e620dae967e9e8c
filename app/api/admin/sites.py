"""Admin routes for sites, their tokens and policy: the same service layer as the CLI."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from app.access import sites
from app.api.admin.deps import ERROR_RESPONSES, AdminDep, ErrorBody, ServiceDep
from app.service import Service

router = APIRouter(
    prefix="/api/sites",
    tags=["sites"],
    responses={**ERROR_RESPONSES, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
T = TypeVar("T")


class SiteOut(BaseModel):
    id: int
    name: str
    status: str = Field(description="active, disabled or deleted")
    created_at: datetime
    disabled_at: datetime | None
    deleted_at: datetime | None
    policy: dict[str, Any]
    tokens: tuple[sites.TokenView, ...]


class NewTokenOut(BaseModel):
    site: str
    token: str = Field(description="Shown once; only its digest is stored.")
    token_id: int
    expires_at: datetime | None
    orthanc_peer: dict[str, Any] = Field(description="OrthancPeers entry, HTTP Basic form")
    orthanc_peer_bearer: dict[str, Any] = Field(description="OrthancPeers entry, Bearer form")
    dicomweb_server: dict[str, Any] = Field(
        description="DicomWeb.Servers entry for a site Orthanc pushing with STOW-RS"
    )
    warnings: list[str] = Field(
        description="What is wrong with the URL the entries carry, for a remote site "
        "(INTAKE_PUBLIC_URL unset, plain HTTP)"
    )


class SiteIn(BaseModel):
    name: str
    label: str | None = None


class RotateIn(BaseModel):
    grace_days: float | None = Field(
        default=None, ge=0, le=36500, description="Default: 30 days; at most 100 years."
    )
    label: str | None = None


class RevokeIn(BaseModel):
    token_prefix: str | None = Field(default=None, description="Omit to revoke every token.")


class PolicyIn(BaseModel):
    """Only the fields given change; null removes a limit, [] an allow-list."""

    allowed_cidrs: list[str] | None = None
    allowed_modalities: list[str] | None = None
    allowed_sop_classes: list[str] | None = None
    max_instance_bytes: int | None = Field(default=None, ge=1)
    instances_per_minute: int | None = Field(default=None, ge=1)
    bytes_per_day: int | None = Field(default=None, ge=1)
    max_concurrent_uploads: int | None = Field(default=None, ge=1)


def _site(view: sites.SiteView) -> SiteOut:
    return SiteOut(
        id=view.id,
        name=view.name,
        status=view.status,
        created_at=view.created_at,
        disabled_at=view.disabled_at,
        deleted_at=view.deleted_at,
        policy=view.policy,
        tokens=view.tokens,
    )


async def _call(service: Service, action: Callable[[Session], T], *, change: bool = True) -> T:
    """Run a sites.* operation in a session off the event loop.

    Its errors are leaves of the one tree (``SiteNotFound`` 404, ``SiteExists`` 409,
    ``InvalidChange`` 400) and render as they are. A change also empties this process's
    credential cache, so it applies at once here.
    """

    def run() -> T:
        with (service.sessions if change else service.readers)() as session:
            return action(session)

    result = await asyncio.to_thread(run)
    if change:
        service.access.forget()
    return result


def _new_token(service: Service, created: sites.NewToken) -> NewTokenOut:
    settings = service.settings
    return NewTokenOut(
        site=created.site,
        token=created.token,
        token_id=created.token_id,
        expires_at=created.expires_at,
        **sites.site_snippets(settings.peer_url, created.site, created.token),
        warnings=sites.url_warnings(settings.public_url, settings.peer_url),
    )


def _lifetime(service: Service) -> timedelta:
    return timedelta(days=service.settings.token_lifetime_days)


@router.get("")
async def list_sites(
    _: AdminDep, service: ServiceDep, include_deleted: bool = False
) -> list[SiteOut]:
    """All sites, with their tokens (visible prefixes only) and policy."""
    views = await _call(service, lambda s: sites.list_sites(s, include_deleted), change=False)
    return [_site(v) for v in views]


@router.post("", status_code=201)
async def add_site(body: SiteIn, _: AdminDep, service: ServiceDep) -> NewTokenOut:
    """Create a site; the answer holds its first token, once."""
    created = await _call(
        service, lambda s: sites.add(s, body.name, body.label, _lifetime(service))
    )
    return _new_token(service, created)


@router.get("/{name}")
async def show_site(name: str, _: AdminDep, service: ServiceDep) -> SiteOut:
    return _site(await _call(service, lambda s: sites.show(s, name), change=False))


@router.post("/{name}/rotate")
async def rotate_token(name: str, body: RotateIn, _: AdminDep, service: ServiceDep) -> NewTokenOut:
    """A new token; the site's other tokens stay valid for the grace period."""
    days = (
        service.settings.token_rotation_grace_days if body.grace_days is None else body.grace_days
    )
    created = await _call(
        service,
        lambda s: sites.rotate(s, name, timedelta(days=days), body.label, _lifetime(service)),
    )
    return _new_token(service, created)


@router.post("/{name}/revoke")
async def revoke_tokens(
    name: str, body: RevokeIn, _: AdminDep, service: ServiceDep
) -> dict[str, int]:
    """Revoke one token (by prefix) or all of them, at once."""
    count = await _call(service, lambda s: sites.revoke(s, name, body.token_prefix))
    return {"revoked": count}


@router.post("/{name}/disable")
async def disable_site(name: str, _: AdminDep, service: ServiceDep) -> SiteOut:
    return _site(await _call(service, lambda s: sites.set_disabled(s, name, True)))


@router.post("/{name}/enable")
async def enable_site(name: str, _: AdminDep, service: ServiceDep) -> SiteOut:
    return _site(await _call(service, lambda s: sites.set_disabled(s, name, False)))


@router.delete("/{name}")
async def delete_site(name: str, _: AdminDep, service: ServiceDep) -> SiteOut:
    """Retire a site: tokens revoked, uploads refused, its intake history kept."""
    return _site(await _call(service, lambda s: sites.delete(s, name)))


@router.patch("/{name}/policy")
async def set_policy(name: str, body: PolicyIn, _: AdminDep, service: ServiceDep) -> SiteOut:
    changes = body.model_dump(exclude_unset=True)
    changes = {k: ([] if v is None and k in sites.POLICY_LISTS else v) for k, v in changes.items()}
    return _site(await _call(service, lambda s: sites.set_policy(s, name, **changes)))
