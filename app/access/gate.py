"""Who is asking, and may they: client address, throttling, token check, address policy.

The upload path pays no slow hash and, most of the time, no database round trip: a
token's lookup is cached for ``auth_cache_seconds`` (default 5), so a revoked or
expired token, a disabled site or a changed policy takes effect within that time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app.access import sites, tokens
from app.access.policy import parse_address, parse_networks
from app.access.sites import AuthenticatedSite
from app.access.throttle import AuthThrottle
from app.db.models import utcnow
from app.errors import (
    AddressNotAllowed,
    ClientCertificateMismatch,
    ClientCertificateRequired,
    ServiceUnavailable,
    TooManyFailedLogins,
    Unauthenticated,
)
from app.settings import Settings

log = logging.getLogger(__name__)

_CACHE_SIZE = 10_000


class Access:
    """The public listener's gate: the client address (trusted proxies only), the failed-
    login throttle, the token (a short in-process cache in front of the database), and
    the site's address and client-certificate policy; raises from the error tree."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self._settings = settings
        self._sessions = sessions
        self._trusted = parse_networks(settings.trusted_proxies)
        self.throttle = AuthThrottle(
            max_failures=settings.auth_max_failures,
            window_seconds=60.0,
            block_seconds=settings.auth_block_seconds,
        )
        self._cache: OrderedDict[str, tuple[float, AuthenticatedSite | None]] = OrderedDict()
        self._touched: dict[int, tuple[float, str | None]] = {}

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """The client: the direct peer, or from X-Forwarded-For when the peer is trusted."""
        if not forwarded_for or not self._is_trusted(peer):
            return peer
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        # Walk from the right (the hop nearest to us); the first untrusted one is the client.
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop if parse_address(hop) else peer
        return hops[0] if hops else peer

    def _is_trusted(self, address: str | None) -> bool:
        parsed = parse_address(address or "")
        return parsed is not None and any(parsed in net for net in self._trusted)

    async def authenticate(
        self, authorization: str | None, address: str | None, client_cert: str | None = None
    ) -> AuthenticatedSite:
        """The site behind the credentials; ``client_cert`` is the TLS client certificate's
        SHA-256 when one was presented in the handshake (already verified against the CA)."""
        credentials = tokens.parse_authorization(authorization)
        well_formed = credentials is not None and tokens.is_well_formed(credentials.token)
        digest = tokens.digest(credentials.token) if credentials and well_formed else None
        wait = self.throttle.blocked_for(address, digest)
        if wait > 0:
            raise TooManyFailedLogins(
                "too many failed authentications from this address; try again later",
                retry_after=math.ceil(wait),
            )
        if credentials is None and not tokens.is_presented(authorization):
            raise Unauthenticated("no credentials: use HTTP Basic (site name + token) or Bearer")
        try:
            if credentials is None:
                raise Unauthenticated(
                    "the Authorization header holds neither HTTP Basic (site name + token) "
                    "nor Bearer credentials"
                )
            if digest is None:
                raise Unauthenticated("the token is not a well-formed intake token")
            found = await self._lookup(digest)
            if found is None:
                raise Unauthenticated("unknown site or token")
            now = utcnow()
            site = sites.check(found, credentials.site_name, now)
        except Unauthenticated:
            self.throttle.failed(address)
            raise
        try:
            site.policy.check_address(site.name, address)
        except AddressNotAllowed:
            log.warning(
                "security: site=%s refused from address %s (allow-list)", site.name, address
            )
            raise
        try:
            site.policy.check_client_cert(site.name, client_cert)
        except (ClientCertificateRequired, ClientCertificateMismatch):
            log.warning("security: site=%s refused: client certificate", site.name)
            raise
        self.throttle.succeeded(address, digest)
        self._touch(site, address)
        return site

    async def _lookup(self, digest: str) -> AuthenticatedSite | None:
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and now - cached[0] < self._settings.auth_cache_seconds:
            return cached[1]

        def query() -> AuthenticatedSite | None:
            with self._sessions() as session:
                return sites.lookup(session, digest)

        try:
            found = await asyncio.to_thread(query)
        except SQLAlchemyError as exc:
            raise ServiceUnavailable("the intake database is unavailable; try again") from exc
        self._cache[digest] = (now, found)
        self._cache.move_to_end(digest)
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return found

    def forget(self) -> None:
        """Drop cached lookups (tests and admin changes in this process)."""
        self._cache.clear()

    def _touch(self, site: AuthenticatedSite, address: str | None) -> None:
        """Record last use at most every ``token_touch_seconds`` (or on a new address)."""
        now = time.monotonic()
        last = self._touched.get(site.token_id)
        if (
            last is not None
            and last[1] == address
            and now - last[0] < self._settings.token_touch_seconds
        ):
            return
        self._touched[site.token_id] = (now, address)
        if len(self._touched) > _CACHE_SIZE:
            self._touched.clear()

        def write() -> None:
            try:
                with self._sessions() as session:
                    sites.touch(session, site.token_id, address, utcnow())
            except SQLAlchemyError as exc:
                log.warning("could not record token use for site=%s: %s", site.name, exc)

        task = asyncio.get_running_loop().run_in_executor(None, write)
        task.add_done_callback(lambda _: None)
