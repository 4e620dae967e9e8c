"""Fresh PostgreSQL databases for tests, on the machine's server (127.0.0.1:5432)."""

from __future__ import annotations

import os
import secrets

import psycopg
from sqlalchemy.engine import make_url

# Trust auth ignores the password; a server set up by scripts/test-deps.sh checks it.
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres:postgres@127.0.0.1:5432/postgres"


def admin_url() -> str:
    return os.environ.get("INTAKE_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL)


def _connect() -> psycopg.Connection[tuple[object, ...]]:
    url = make_url(admin_url())
    return psycopg.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password or None,
        dbname=url.database or "postgres",
        autocommit=True,
        connect_timeout=10,
    )


def create_database(template: str | None = None) -> str:
    """Create a database, empty or a copy of ``template`` (a URL); return its URL."""
    name = f"intake_test_{secrets.token_hex(6)}"
    copy = f' TEMPLATE "{make_url(template).database}"' if template else ""
    with _connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"{copy}')  # names are ours: hex only
    return make_url(admin_url()).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    name = make_url(url).database
    with _connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
