"""TLS on the public listener: modern settings, reload without downtime, client certificates.

- TLS 1.2 and 1.3 only; for 1.2, forward-secret AEAD suites only (1.3's are all AEAD);
  no TLS compression, no renegotiation.
- The certificate and key are reloaded into the live SSLContext when their files change
  (checked every ``TLS_RELOAD_CHECK_SECONDS``) or on SIGHUP: new handshakes get the new
  certificate, connections already open keep theirs, nothing is restarted.
- Mutual TLS (``TLS_CLIENT_CAFILE``): client certificates are verified against that CA
  during the handshake; app/api/protocol.py puts the SHA-256 of the DER certificate a
  connection presented in each request's ASGI ``state`` for the site check.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from pathlib import Path

from app.settings import Settings

log = logging.getLogger(__name__)

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
