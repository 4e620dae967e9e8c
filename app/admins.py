"""Admin accounts: people or apps with passwords, for the admin listener.

Passwords are human-chosen, so they get a slow hash (argon2 through passlib's API,
from the maintained ``libpass`` distribution). Nothing here is on the upload path.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from passlib.context import CryptContext
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.models import Admin
from app.sites import SITE_NAME, SiteError

PASSWORDS = CryptContext(schemes=["argon2"], deprecated="auto")
MIN_PASSWORD_LENGTH = 12


@dataclass(frozen=True)
class AdminView:
    id: int
    name: str
    created_at: datetime


def add(session: Session, name: str, password: str) -> AdminView:
    if not SITE_NAME.match(name):
        raise SiteError(f"admin name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise SiteError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    admin = Admin(name=name, password_hash=PASSWORDS.hash(password))
    session.add(admin)
    try:
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise SiteError(f"an admin named {name!r} already exists") from exc
    return AdminView(admin.id, admin.name, admin.created_at)


def list_admins(session: Session) -> list[AdminView]:
    return [
        AdminView(a.id, a.name, a.created_at)
        for a in session.scalars(select(Admin).order_by(Admin.name))
    ]


def remove(session: Session, name: str) -> None:
    admin = session.scalar(select(Admin).where(Admin.name == name))
    if admin is None:
        raise SiteError(f"no admin named {name!r}")
    session.delete(admin)
    session.commit()


def verify(session: Session, name: str, password: str) -> bool:
    """True when the password is right; re-hashes it if the scheme's settings moved on."""
    admin = session.scalar(select(Admin).where(Admin.name == name))
    if admin is None:
        PASSWORDS.dummy_verify()  # same cost whether or not the name exists
        return False
    ok, new_hash = PASSWORDS.verify_and_update(password, admin.password_hash)
    if ok and new_hash:
        admin.password_hash = new_hash
        session.commit()
    return bool(ok)
