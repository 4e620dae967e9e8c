"""TLS on the public listener: modern settings, reload without downtime, client certificates;
and the listeners' HTTP protocol (header deadline, client certificate per request).

- TLS 1.2 and 1.3 only; for 1.2, forward-secret AEAD suites only (1.3's are all AEAD);
  no TLS compression, no renegotiation.
- The certificate and key are reloaded into the live SSLContext when their files change
  (checked every ``TLS_RELOAD_CHECK_SECONDS``) or on SIGHUP: new handshakes get the new
  certificate, connections already open keep theirs, nothing is restarted.
- Mutual TLS (``TLS_CLIENT_CAFILE``): client certificates are verified against that CA
  during the handshake; the SHA-256 of the DER certificate a connection presented is put
  in each request's ASGI ``state`` for the site check (a site may be bound to one).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
from pathlib import Path
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.settings import Settings

log = logging.getLogger(__name__)

CLIENT_CERT_STATE = "tls_client_cert_sha256"
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def _pair(settings: Settings) -> tuple[Path, Path]:
    if settings.tls_certfile is None or settings.tls_keyfile is None:
        raise ValueError("TLS needs both INTAKE_TLS_CERTFILE and INTAKE_TLS_KEYFILE")
    return settings.tls_certfile, settings.tls_keyfile


def make_context(settings: Settings) -> ssl.SSLContext:
    certfile, keyfile = _pair(settings)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.load_cert_chain(certfile, keyfile)
    if settings.tls_client_cafile is not None:
        context.load_verify_locations(cafile=settings.tls_client_cafile)
        required = settings.tls_client_cert == "required"
        context.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    return context


class CertificateReloader:
    """Puts a renewed certificate and key into the live context."""

    def __init__(self, context: ssl.SSLContext, settings: Settings) -> None:
        self._context = context
        self._settings = settings
        self._seen = self._stamp()

    def _files(self) -> list[Path]:
        files = [self._settings.tls_certfile, self._settings.tls_keyfile]
        return [f for f in files if f is not None]

    def _stamp(self) -> tuple[tuple[int, int], ...]:
        stamps = []
        for path in self._files():
            try:
                info = os.stat(path)
            except OSError:
                stamps.append((0, 0))
            else:
                stamps.append((info.st_mtime_ns, info.st_size))
        return tuple(stamps)

    def reload(self) -> bool:
        """Load the files now; False (and the old certificate kept) if they are unusable."""
        certfile, keyfile = _pair(self._settings)
        self._seen = self._stamp()
        try:
            # A scratch context first: a half-written or mismatched pair never goes live.
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certfile, keyfile)
            self._context.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS certificate not reloaded, the current one stays: %s", exc)
            return False
        log.info("TLS certificate reloaded from %s", certfile.name)
        return True

    def changed(self) -> bool:
        return self._stamp() != self._seen

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.changed():
                self.reload()


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
