"""Schema migrations: `orthanc-intake migrate`, the tests and the service all use these.

alembic is imported only when there is something to migrate: a database already at the
newest revision is recognised by reading its ``alembic_version`` table and the revision
ids in ``alembic/versions``, so `serve` (which migrates first by default) does not carry
alembic's modules for the rest of its life.
"""

from __future__ import annotations

import ast
import enum
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

if TYPE_CHECKING:
    from alembic.config import Config

ROOT = Path(__file__).resolve().parents[2]
VERSIONS = ROOT / "alembic" / "versions"


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "alembic"))
    config.attributes["url"] = url
    config.attributes["configure_logger"] = False
    return config


def head_revision() -> str | None:
    """The one head of ``alembic/versions``, read without alembic; None unless certain.

    Each file's module-level ``revision`` and ``down_revision`` literals are read; the
    head is the revision no other file names as its ``down_revision``. Anything else
    (a file without them, a merge, branches) gives None, and alembic decides.
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in VERSIONS.glob("*.py"):
        values = _literals(path, ("revision", "down_revision"))
        revision, down = values.get("revision"), values.get("down_revision", ...)
        if not isinstance(revision, str) or not (down is None or isinstance(down, str)):
            return None
        revisions.add(revision)
        if down is not None:
            parents.add(down)
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def _literals(path: Path, names: tuple[str, ...]) -> dict[str, object]:
    """The literal values a Python file assigns to ``names`` at module level."""
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (SyntaxError, ValueError):
        return {}
    found: dict[str, object] = {}
    for node in tree.body:
        targets: list[ast.expr]
        if isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        elif isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name) and target.id in names:
                try:
                    found[target.id] = ast.literal_eval(value)
                except (ValueError, TypeError, SyntaxError, RecursionError):
                    found[target.id] = ...  # not a literal: neither a str nor None
    return found


def _at(conn: Connection, head: str) -> bool:
    # alembic's default version table: alembic/env.py does not rename it.
    if not inspect(conn).has_table("alembic_version"):
        return False
    found = set(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
    return found == {head}


def is_current(url: str) -> bool:
    """Whether the database at ``url`` is already at the newest revision (no alembic)."""
    head = head_revision()
    if head is None:
        return False
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return _at(conn, head)
    except SQLAlchemyError:
        return False  # e.g. no database file yet: alembic creates it, or says what is wrong
    finally:
        engine.dispose()


class Schema(enum.Enum):
    """What a database holds, as far as the intake is concerned."""

    MISSING = "missing"  # no SQLite file, or no intake schema in the database
    CURRENT = "current"  # the newest revision: ready to use
    OTHER = "other"  # another revision (older: `migrate`; or newer than this code)


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for another backend, memory, or a ``file:`` URI)."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return None if database.startswith("file:") else Path(database)


def schema_of(url: str) -> Schema:
    """What the database at ``url`` holds, without creating anything: a missing SQLite
    file is not opened (opening it would create it). ``SQLAlchemyError`` when the
    database cannot be reached (PostgreSQL down, a wrong password, not a database)."""
    path = sqlite_file(url)
    if path is not None and not path.is_file():
        return Schema.MISSING
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return Schema.MISSING
            found = set(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
    finally:
        engine.dispose()
    if not found:
        return Schema.MISSING
    return Schema.CURRENT if found == _heads() else Schema.OTHER


def _heads() -> set[str]:
    head = head_revision()
    if head is not None:
        return {head}
    from alembic.script import ScriptDirectory  # only when the versions are not plain

    return set(ScriptDirectory.from_config(alembic_config("")).get_heads())


# Any constant: the key of the PostgreSQL advisory lock that serialises migrations.
_MIGRATION_LOCK = 0x0A17A4E


def upgrade(url: str) -> None:
    """Bring the database at ``url`` to the newest schema.

    Nothing is imported or locked when it is there already. Several processes may start
    at once against one PostgreSQL (scale-out): an advisory lock lets one migrate while
    the others wait, then find nothing left to do. SQLite's own write lock serialises
    them there.
    """
    if is_current(url):
        return
    from alembic import command

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
