"""The alembic migrations build exactly the models' schema, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, func, inspect, select, text
from sqlalchemy.orm import Session

from alembic import command
from app.db.migrations import alembic_config, upgrade
from app.db.models import Base, Site
from app.db.sessions import make_engine, make_read_sessionmaker, make_sessionmaker


def test_autogenerate_finds_nothing_to_do(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    engine = create_engine(empty_database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_upgrade_is_idempotent_and_downgrade_empties(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    upgrade(empty_database_url)
    command.downgrade(alembic_config(empty_database_url), "base")
    engine = create_engine(empty_database_url)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_from_0001_keeps_sites_and_gives_them_an_open_policy(
    empty_database_url: str,
) -> None:
    """Rows written by the first schema survive 0002, with no restrictions added."""
    command.upgrade(alembic_config(empty_database_url), "0001")
    engine = create_engine(empty_database_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO sites (name, created_at) VALUES ('old-site', :now)"),
                {"now": datetime.now(UTC).replace(tzinfo=None)},
            )
        upgrade(empty_database_url)
        with Session(engine) as session:
            site = session.scalars(select(Site)).one()
            assert site.name == "old-site"
            assert (site.allowed_cidrs, site.allowed_modalities, site.allowed_sop_classes) == (
                [],
                [],
                [],
            )
            assert site.instances_per_minute is None
    finally:
        engine.dispose()


def test_sqlite_readers_do_not_wait_for_a_writer(tmp_path: Path) -> None:
    """Admin queries run beside an upload's open write transaction (WAL, deferred BEGIN)."""
    url = f"sqlite:///{tmp_path / 'rw.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        writer = make_sessionmaker(engine)()
        writer.execute(text("DELETE FROM sites"))  # holds SQLite's write lock from here on
        started = time.monotonic()
        with make_read_sessionmaker(engine)() as reader:
            assert reader.scalar(select(func.count()).select_from(Site)) == 0
        assert time.monotonic() - started < 1.0  # a writer would wait 15 s (busy_timeout)
        writer.rollback()
        writer.close()
    finally:
        engine.dispose()
