"""Admin routes: webhooks (being written)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.admin.deps import ERROR_RESPONSES

router = APIRouter(prefix="/api", responses=ERROR_RESPONSES)
