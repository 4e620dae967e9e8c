"""Admin accounts: people or apps with passwords, for the admin listener.

Passwords are human-chosen, so they get a slow hash (argon2 through passlib's API,
from the maintained ``libpass`` distribution). Nothing here is on the upload path.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from dataclasses import dataclass
from datetime import datetime

from passlib.context import CryptContext
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app.access import tokens
from app.access.policy import parse_address, parse_networks
from app.access.sites import SITE_NAME
from app.access.throttle import AuthThrottle
from app.db.models import Admin, AdminToken, utcnow
from app.errors import (
    AdminExists,
    AdminForbidden,
    AdminNotFound,
    AdminUnauthenticated,
    InvalidChange,
    InvalidName,
    ServiceUnavailable,
    TooManyFailedLogins,
    UnknownTokenPrefix,
)

PASSWORDS = CryptContext(schemes=["argon2"], deprecated="auto")
MIN_PASSWORD_LENGTH = 12


@dataclass(frozen=True)
class AdminView:
    id: int
    name: str
    created_at: datetime


def add(session: Session, name: str, password: str) -> AdminView:
    if not SITE_NAME.fullmatch(name):
        raise InvalidName(f"admin name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidChange(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    admin = Admin(name=name, password_hash=PASSWORDS.hash(password))
    session.add(admin)
    try:
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise AdminExists(f"an admin named {name!r} already exists") from exc
    return AdminView(admin.id, admin.name, admin.created_at)


def list_admins(session: Session) -> list[AdminView]:
    return [
        AdminView(a.id, a.name, a.created_at)
        for a in session.scalars(select(Admin).order_by(Admin.name))
    ]


def remove(session: Session, name: str) -> None:
    admin = session.scalar(select(Admin).where(Admin.name == name))
    if admin is None:
        raise AdminNotFound(f"no admin named {name!r}")
    session.delete(admin)
    session.commit()


def verify(session: Session, name: str, password: str) -> bool:
    """True when the password is right; re-hashes it if the scheme's settings moved on."""
    # A name no admin can have (a NUL, which PostgreSQL refuses in a query) is not looked up.
    admin = (
        session.scalar(select(Admin).where(Admin.name == name))
        if SITE_NAME.fullmatch(name)
        else None
    )
    if admin is None:
        PASSWORDS.dummy_verify()  # same cost whether or not the name exists
        return False
    ok, new_hash = PASSWORDS.verify_and_update(password, admin.password_hash)
    if ok and new_hash:
        admin.password_hash = new_hash
        session.commit()
    return bool(ok)


@dataclass(frozen=True)
class NewAdminToken:
    admin: str
    token: str  # shown once
    prefix: str


def issue_token(session: Session, name: str, label: str | None = None) -> NewAdminToken:
    """A Bearer token for a machine client (the PHP app) acting as this admin."""
    admin = session.scalar(select(Admin).where(Admin.name == name))
    if admin is None:
        raise AdminNotFound(f"no admin named {name!r}")
    token = tokens.new_token(tokens.ADMIN_TOKEN_PREFIX)
    row = AdminToken(
        admin_id=admin.id,
        digest=tokens.digest(token),
        display_prefix=tokens.display_prefix(token),
        label=label,
    )
    session.add(row)
    session.commit()
    return NewAdminToken(admin=name, token=token, prefix=row.display_prefix)


def revoke_token(session: Session, prefix: str) -> None:
    row = session.scalar(
        select(AdminToken).where(
            AdminToken.display_prefix == prefix, AdminToken.revoked_at.is_(None)
        )
    )
    if row is None:
        raise UnknownTokenPrefix(f"no unrevoked admin token with prefix {prefix!r}")
    row.revoked_at = utcnow()
    session.commit()


def token_admin(session: Session, digest: str) -> str | None:
    """The admin a live token belongs to, or None."""
    row = session.execute(
        select(Admin.name)
        .join(AdminToken, AdminToken.admin_id == Admin.id)
        .where(AdminToken.digest == digest, AdminToken.revoked_at.is_(None))
    ).first()
    return None if row is None else str(row[0])


class AdminAccess:
    """Authenticates admin requests without paying argon2 on each one.

    A right password is remembered for ``cache_seconds`` under the SHA-256 of the
    whole credential (never the password itself); a token's lookup for
    ``token_cache_seconds``, so a revoked token stops working within that time.
    Failures are throttled per client address like the sites' are.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        allowed_cidrs: list[str],
        cache_seconds: float = 60.0,
        token_cache_seconds: float = 5.0,
    ) -> None:
        self._sessions = sessions
        self._networks = parse_networks(allowed_cidrs)
        self._cache_seconds = cache_seconds
        self._token_cache_seconds = token_cache_seconds
        self._passed: dict[str, tuple[float, str]] = {}
        self.throttle = AuthThrottle(max_failures=10, window_seconds=60.0, block_seconds=300.0)

    async def authenticate(self, authorization: str | None, address: str | None) -> str:
        """The admin's name, or an IntakeError (401, 403, 429)."""
        if self._networks:
            parsed = parse_address(address or "")
            if parsed is None or not any(parsed in n for n in self._networks):
                raise AdminForbidden(f"the admin API is not open to {address}")
        credentials = tokens.parse_authorization(authorization)
        key = None
        if credentials is not None:
            key = hashlib.sha256(
                f"{credentials.site_name}\0{credentials.token}".encode()
            ).hexdigest()
        wait = self.throttle.blocked_for(address, key)
        if wait > 0:
            raise TooManyFailedLogins(
                "too many failed admin authentications from this address",
                retry_after=math.ceil(wait),
            )
        if credentials is None or key is None:
            if tokens.is_presented(authorization):  # there, but unusable: a failure
                self.throttle.failed(address)
            raise AdminUnauthenticated("admin credentials needed: HTTP Basic or a Bearer token")
        name = await self._verify(credentials, key)
        if name is None:
            self.throttle.failed(address)
            raise AdminUnauthenticated("wrong admin name, password or token")
        self.throttle.succeeded(address, key)
        return name

    async def _verify(self, credentials: tokens.Credentials, key: str) -> str | None:
        now = time.monotonic()
        hit = self._passed.get(key)
        ttl = self._token_cache_seconds if credentials.site_name is None else self._cache_seconds
        if hit is not None and now - hit[0] < ttl:
            return hit[1]

        def check() -> str | None:
            with self._sessions() as session:
                if credentials.site_name is None:
                    if not tokens.is_well_formed(credentials.token, tokens.ADMIN_TOKEN_PREFIX):
                        return None
                    return token_admin(session, tokens.digest(credentials.token))
                if verify(session, credentials.site_name, credentials.token):
                    return credentials.site_name
                return None

        try:
            name = await asyncio.to_thread(check)
        except SQLAlchemyError as exc:
            raise ServiceUnavailable("the intake database is unavailable; try again") from exc
        if name is not None:
            self._passed[key] = (now, name)
            if len(self._passed) > 10_000:
                self._passed.clear()
        return name
