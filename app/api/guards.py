"""Who may talk to a listener at all: the Host it is called by, and, on the admin listener,
the browser site a state-changing request comes from.

- **Host allow-list** (``PUBLIC_ALLOWED_HOSTS``, ``ADMIN_ALLOWED_HOSTS``): a request whose
  ``Host`` is not listed gets 400 before any route runs. This is what stops DNS
  rebinding, where a page on ``evil.example`` re-points its own name at 127.0.0.1 and
  its scripts then reach the unauthenticated routes (``/metrics``, ``/healthz``) as a
  same-origin page. Like Starlette's ``TrustedHostMiddleware`` (exact names and
  ``*.domain`` wildcards), but answered in the listener's own error shape.
- **Cross-site requests** (admin listener): a browser that once held an admin's
  credentials sends them with any request a foreign page makes it send. Requests that
  change state (not GET, HEAD or OPTIONS) are refused with 403 when the browser says
  they are cross-site (``Sec-Fetch-Site``), when their ``Origin`` is not the listener's
  own, or when their body is one a foreign form can send without asking (form and
  plain-text types): the admin API takes JSON only, which a cross-site page cannot send
  without a CORS preflight the API never grants. Server-side clients (the PHP app, curl)
  send none of these headers and are not affected.

Pure ASGI middleware: bodies stream through untouched.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import log_refusal
from app.api.protocol import ErrorBody
from app.errors import CrossSiteRequest, HostNotAllowed, IntakeError

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# What an HTML form (or a "simple" fetch) can send cross-site without a CORS preflight.
_FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})


def host_name(header: str) -> str:
    """The name in a ``Host`` header, without its port (an IPv6 literal without brackets)."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def host_allowed(name: str, allowed: Sequence[str]) -> bool:
    for pattern in allowed:
        if pattern == "*" or name == pattern:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
    return False


async def _refuse(error: IntakeError, scope: Scope, send: Send, error_body: ErrorBody) -> None:
    log_refusal(scope, error)
    body = json.dumps(error_body(error, scope.get("method", ""), scope.get("path", ""))).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class HostGuardMiddleware:
    def __init__(self, app: ASGIApp, allowed: Sequence[str], error_body: ErrorBody) -> None:
        self.app = app
        self.allowed = [a.lower() for a in allowed]
        self.error_body = error_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.allowed:
            name = host_name(Headers(scope=scope).get("host", ""))
            if not host_allowed(name, self.allowed):
                shown = name[:100] or "no Host header"
                error = HostNotAllowed(f"this listener is not served as {shown!r}")
                await _refuse(error, scope, send, self.error_body)
                return
        await self.app(scope, receive, send)


class CrossSiteGuardMiddleware:
    def __init__(self, app: ASGIApp, error_body: ErrorBody) -> None:
        self.app = app
        self.error_body = error_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in _SAFE_METHODS:
            why = _cross_site(Headers(scope=scope))
            if why is not None:
                await _refuse(CrossSiteRequest(why), scope, send, self.error_body)
                return
        await self.app(scope, receive, send)


def _cross_site(headers: Headers) -> str | None:
    """Why a state-changing request looks like one a foreign page made, or None."""
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return f"a {fetch_site} request (Sec-Fetch-Site) may not change anything here"
    origin = headers.get("origin")
    if origin is not None:
        own = host_name(headers.get("host", ""))
        origin_host = host_name(origin.split("://", 1)[-1].split("/", 1)[0])
        if origin == "null" or origin_host != own:
            return f"a request from origin {origin[:100]!r} may not change anything here"
    media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media in _FORM_TYPES:
        return f"the admin API takes JSON bodies only, not {media}"
    return None
