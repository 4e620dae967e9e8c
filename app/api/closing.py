"""``Connection: close`` on answers after which a connection is not worth keeping.

An answer sent before the request's body was read to its end (a 401 or a 413 decided
from the headers, a 408 for a stalled body) leaves the rest of that body on the wire,
where it would be read as the next request; 408, 413 and 431 close in any case (RFC 9110
§15.5.9, §15.5.14). uvicorn closes the connection once such an answer is sent, and
app/api/protocol.py closes one whose body was left unread even without it. A pure ASGI
middleware: the body streams through untouched.
"""

from __future__ import annotations

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_CLOSING_STATUSES = frozenset({408, 413, 431})


def _has_body(headers: Headers) -> bool:
    return "transfer-encoding" in headers or headers.get("content-length", "0") not in ("", "0")


class CloseUnreadBodiesMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        read = not _has_body(Headers(scope=scope))

        async def receive_noting_the_end() -> Message:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                read = True
            return message

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and (
                not read or message["status"] in _CLOSING_STATUSES
            ):
                MutableHeaders(scope=message)["connection"] = "close"
            await send(message)

        await self.app(scope, receive_noting_the_end, send_closing)
