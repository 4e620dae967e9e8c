"""Engines and sessions; SQLite gets WAL, synchronous=FULL and BEGIN IMMEDIATE."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Update, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 15_000
READ_ONLY = "intake_read_only"


class _WriterConnection(sqlite3.Connection):
    """A pysqlite connection whose write transactions queue on the engine's lock.

    SQLite lets one writer in at a time and makes the others poll (its busy handler
    sleeps 1, 2, 5, 10 … 100 ms between tries), so threads contending for the write lock
    spend most of their time asleep while it is free. In one process, waiting on a
    Python lock instead hands the write lock over the moment it is released. Other
    processes (the forwarder's own, the CLI) still meet SQLite's own busy handling.
    """

    writer_lock: threading.Lock
    holds_writer_lock = False
    busy_timeout_ms = SQLITE_BUSY_TIMEOUT_MS

    def take_writer_lock(self) -> bool:
        """Wait, as long as SQLite's busy timeout, for this process's writer turn; what
        the turn took comes off SQLite's own wait that follows (another process may hold
        the lock), so a writer waits one busy timeout in all, not two."""
        started = time.monotonic()
        self.holds_writer_lock = self.writer_lock.acquire(timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
        if self.holds_writer_lock:
            waited_ms = int((time.monotonic() - started) * 1000)
            # A short turn keeps the whole timeout: no PRAGMA for most transactions.
            left = (
                SQLITE_BUSY_TIMEOUT_MS if waited_ms < 1000 else SQLITE_BUSY_TIMEOUT_MS - waited_ms
            )
            self._busy_timeout(max(1, left))
        return self.holds_writer_lock

    def _busy_timeout(self, ms: int) -> None:
        if ms != self.busy_timeout_ms:
            self.execute(f"PRAGMA busy_timeout={ms}")
            self.busy_timeout_ms = ms

    def _release(self) -> None:
        if self.holds_writer_lock:
            self.holds_writer_lock = False
            self.writer_lock.release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._release()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._release()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._release()


def make_engine(url: str) -> Engine:
    """An engine whose commits are durable: the 200 to a site depends on them."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)

    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    # One lock per engine: its write transactions take turns without polling.
    writer = type("WriterConnection", (_WriterConnection,), {"writer_lock": threading.Lock()})
    engine = create_engine(
        url,
        connect_args={
            "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
            "check_same_thread": False,
            "factory": writer,
        },
        pool_size=10,
        max_overflow=10,
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite would defer it).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        if connection.get_execution_options().get(READ_ONLY):
            # Readers (the admin API's queries) never write: WAL lets them run beside
            # the writers, so they must not take the write lock.
            connection.exec_driver_sql("BEGIN")
            return
        # Take the write lock up front: a deferred transaction that later writes can
        # fail with SQLITE_BUSY without waiting for busy_timeout.
        dbapi_connection = connection.connection.dbapi_connection
        assert isinstance(dbapi_connection, _WriterConnection)
        if not dbapi_connection.take_writer_lock():
            raise OperationalError(
                "BEGIN IMMEDIATE",
                None,
                sqlite3.OperationalError("database is locked (waited for the writer lock)"),
            )
        try:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            dbapi_connection.rollback()  # no transaction began: this releases the lock
            raise

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def make_read_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions for queries only: on SQLite they do not take the write lock."""
    return sessionmaker(engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)


def changed_rows(session: Session, statement: Update) -> int:
    """How many rows an UPDATE changed: claims and retries are decided by it."""
    result = session.execute(statement, execution_options={"synchronize_session": False})
    return cast("CursorResult[Any]", result).rowcount


def is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"
