"""The listeners' HTTP protocol: uvicorn's, plus a header deadline, header size and count
caps, and the TLS client certificate of the connection in each request's ASGI ``state``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.errors import HeadersTooLarge, IntakeError, UriTooLong

log = logging.getLogger(__name__)

CLIENT_CERT_STATE = "tls_client_cert_sha256"

# How a listener renders a refusal: (error, method, path) -> its JSON error body.
ErrorBody = Callable[[IntakeError, str, str], dict[str, object]]


@dataclass(frozen=True)
class HeaderLimits:
    """What one request's head may take before the app sees it."""

    timeout: float = 20.0  # seconds, from the connection's start and each request's first byte
    max_bytes: int = 64 * 1024  # request line and header lines together
    max_count: int = 100  # header lines


class IntakeProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, plus what it lacks against hostile clients.

    - A header deadline: from the connection's start, and from each request's first
      byte, the headers must be complete within ``limits.timeout`` seconds, or the
      connection is closed (slowloris; uvicorn waits for ever).
    - Header caps: a request target past ``limits.max_bytes`` gets 414, a head past it
      or with more than ``limits.max_count`` lines gets 431, and the connection closes.
      httptools buffers a header line until it ends, so the size is counted from the
      bytes received while the head is incomplete: memory stays within the cap plus
      one read.
    - The TLS client certificate's fingerprint, in each request's ``state``.
    """

    limits = HeaderLimits()
    error_body: ErrorBody

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._in_head = True
        self._head_began = False  # a request's first byte arrived in the current read
        self._head_bytes = 0
        self._head_lines = 0
        self._refusal: IntakeError | None = None
        self._arm_header_deadline()
        ssl_object: Any = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der:
            # app_state is copied into every request's scope["state"]: per connection here.
            self.app_state = {**self.app_state, CLIENT_CERT_STATE: hashlib.sha256(der).hexdigest()}

    # --- header deadline ---------------------------------------------------------------

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(
                self.limits.timeout, self._headers_too_slow
            )

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            log.info(
                "closed a connection from %s: no complete request headers within %gs",
                self._peer(),
                self.limits.timeout,
            )
            self.transport.close()

    # --- header caps -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return  # answered and closing: the rest is not read
        self._head_began = False
        super().data_received(data)
        if self._refusal is not None or not self._in_head or self.transport.is_closing():
            return
        if self._head_began:  # the head started inside this read: count what was parsed
            self._head_bytes = self._parsed_head_bytes()
        else:
            self._head_bytes += len(data)
        if self._head_bytes > self.limits.max_bytes:
            self._refuse(self._too_large(), parsing=False)

    def _parsed_head_bytes(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _too_large(self) -> IntakeError:
        return HeadersTooLarge(
            f"the request head is over {self.limits.max_bytes} bytes "
            f"(INTAKE_MAX_HEADER_BYTES), or {self.limits.max_count} header lines"
        )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_began = True
        self._head_bytes = 0
        self._head_lines = 0
        self._arm_header_deadline()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_bytes:
            self._refuse(
                UriTooLong(
                    f"the request target is over {self.limits.max_bytes} bytes "
                    "(INTAKE_MAX_HEADER_BYTES)"
                )
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_lines += 1
        if self._head_lines > self.limits.max_count:
            self._refuse(self._too_large())
        super().on_header(name, value)

    def _refuse(self, error: IntakeError, *, parsing: bool = True) -> None:
        """Answer ``error`` and close; inside a parser callback, also stop the parser
        (uvicorn then calls ``send_400_response``, which sends this answer instead)."""
        self._refusal = error
        if parsing:
            raise _Refused
        self._send_refusal()

    def send_400_response(self, msg: str) -> None:
        if self._refusal is None:
            super().send_400_response(msg)
        else:
            self._send_refusal()

    def _send_refusal(self) -> None:
        error = self._refusal
        assert error is not None
        self._disarm_header_deadline()
        try:
            method = self.parser.get_method().decode("ascii", "replace")
        except Exception:  # the request line itself was not complete
            method = ""
        path = self.url.split(b"?", 1)[0][:256].decode("ascii", "replace")
        log.info(
            "refused a request from %s with %d: %s", self._peer(), error.status_code, error.detail
        )
        body = json.dumps(self.error_body(error, method, path)).encode()
        status = HTTPStatus(error.status_code)
        head = [f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode()]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % len(body)
        )
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._parsed_head_bytes() > self.limits.max_bytes:
            self._refuse(self._too_large())
        self._disarm_header_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _peer(self) -> str:
        return str(self.client[0]) if self.client else "?"


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing a refused request."""


def protocol(limits: HeaderLimits, error_body: ErrorBody) -> type[IntakeProtocol]:
    """The protocol class for a listener: its header limits and error shape."""
    return type(
        "IntakeProtocol",
        (IntakeProtocol,),
        {"limits": limits, "error_body": staticmethod(error_body)},
    )
