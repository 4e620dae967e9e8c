"""Schema migrations: `orthanc-intake migrate`, the tests and the service all use these."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from alembic import command

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "alembic"))
    config.attributes["url"] = url
    config.attributes["configure_logger"] = False
    return config


# Any constant: the key of the PostgreSQL advisory lock that serialises migrations.
_MIGRATION_LOCK = 0x0A17A4E


def upgrade(url: str) -> None:
    """Bring the database at ``url`` to the newest schema.

    Several processes may start at once against one PostgreSQL (scale-out): an advisory
    lock lets one migrate while the others wait, then find nothing left to do. SQLite's
    own write lock serialises them there.
    """
    if not url.startswith("postgresql"):
        command.upgrade(alembic_config(url), "head")
        return
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK})
            try:
                command.upgrade(alembic_config(url), "head")
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK})
                conn.commit()
    finally:
        engine.dispose()
