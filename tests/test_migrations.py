"""The alembic migrations build exactly the models' schema, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.orm import Session

from alembic import command
from app.migrations import alembic_config, upgrade
from app.models import Base, Site


def test_autogenerate_finds_nothing_to_do(database_url: str) -> None:
    upgrade(database_url)
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_upgrade_is_idempotent_and_downgrade_empties(database_url: str) -> None:
    upgrade(database_url)
    upgrade(database_url)
    command.downgrade(alembic_config(database_url), "base")
    engine = create_engine(database_url)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_from_0001_keeps_sites_and_gives_them_an_open_policy(database_url: str) -> None:
    """Rows written by the first schema survive 0002, with no restrictions added."""
    command.upgrade(alembic_config(database_url), "0001")
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO sites (name, created_at) VALUES ('old-site', :now)"),
                {"now": datetime.now(UTC).replace(tzinfo=None)},
            )
        upgrade(database_url)
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
