"""Every request gets an ID: the client's ``X-Request-ID`` if plain, else a new one.

It is set for the request's log lines (app/logs.py), stored with each upload (so the
forwarder's lines carry it too) and sent back in the answer's ``X-Request-ID``. A pure
ASGI middleware: the body streams through untouched.
"""

from __future__ import annotations

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import logs


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = logs.accept_request_id(Headers(scope=scope).get(logs.REQUEST_ID_HEADER))
        token = logs.request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[logs.REQUEST_ID_HEADER] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logs.request_id.reset(token)
