"""The admin listener's routes: health and metrics open, everything else for admins."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.admin import health, queue, records, sites, webhooks

router = APIRouter()
for module in (health, records, queue, sites, webhooks):
    router.include_router(module.router)
