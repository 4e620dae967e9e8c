"""The listeners' HTTP protocol: uvicorn's, plus a header deadline and the TLS client
certificate of the connection in each request's ASGI ``state``."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

CLIENT_CERT_STATE = "tls_client_cert_sha256"


class IntakeProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, plus two things it lacks.

    - A header deadline: from the connection's start, and from each request's first
      byte, the headers must be complete within ``header_timeout`` seconds, or the
      connection is closed (slowloris; uvicorn waits for ever).
    - The TLS client certificate's fingerprint, in each request's ``state``.
    """

    header_timeout: float = 20.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline()
        ssl_object: Any = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der:
            # app_state is copied into every request's scope["state"]: per connection here.
            self.app_state = {**self.app_state, CLIENT_CERT_STATE: hashlib.sha256(der).hexdigest()}

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(
                self.header_timeout, self._headers_too_slow
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
                self.client[0] if self.client else "?",
                self.header_timeout,
            )
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)


def protocol(header_timeout: float) -> type[IntakeProtocol]:
    """The protocol class for a listener, with its header deadline."""
    return type("IntakeProtocol", (IntakeProtocol,), {"header_timeout": header_timeout})
