"""The browser upload page on the public listener: static files, no data, no authentication.

The page holds nothing worth protecting; what it sends to ``POST /instances`` is
authenticated there like any other upload. Its files live in ``app/static/`` and are
read once, on first use.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.errors import NotFound

router = APIRouter(include_in_schema=False)

# No inline script or style, nothing from elsewhere, no framing, no form posts: the page
# talks to its own origin with XMLHttpRequest/fetch only. Trusted Types stop any HTML
# sink in the script from being used by accident.
_CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    )
)
_COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# The assets a page loads: name in app/static/ -> media type.
_ASSETS = {
    "upload.js": "text/javascript; charset=utf-8",
    "upload.css": "text/css; charset=utf-8",
}


@dataclass(frozen=True)
class _Asset:
    body: bytes
    media_type: str
    etag: str


@functools.cache
def _load(name: str, media_type: str) -> _Asset:
    body = (resources.files("app") / "static" / name).read_bytes()
    return _Asset(body, media_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


def _page(name: str) -> Response:
    """A page; never cached, so a new version and its CSP apply at once."""
    page = _load(name, "text/html; charset=utf-8")
    headers = {
        **_COMMON_HEADERS,
        "Content-Security-Policy": _CONTENT_SECURITY_POLICY,
        "Cache-Control": "no-store",
    }
    return Response(page.body, media_type=page.media_type, headers=headers)


@router.get("/")
async def front_page() -> Response:
    """What a person who opens the service's URL sees: where to send files. Nothing about
    the archive behind it."""
    return _page("index.html")


@router.get("/upload")
async def upload_page() -> Response:
    """The upload page."""
    return _page("upload.html")


@router.get("/upload/{name}")
async def upload_asset(name: str, request: Request) -> Response:
    """The page's script and style sheet, revalidated by ETag on every load."""
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"the intake has no resource at {request.url.path}")
    asset = _load(name, media_type)
    headers = {**_COMMON_HEADERS, "Cache-Control": "no-cache", "ETag": asset.etag}
    if asset.etag in (tag.strip() for tag in request.headers.get("if-none-match", "").split(",")):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)
