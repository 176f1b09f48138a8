"""The database: one SQLAlchemy engine, units of work run in worker threads.

SQLAlchemy's engine is synchronous; :meth:`Database.run` runs a function taking a
:class:`~sqlalchemy.orm.Session` in a trio worker thread (``trio.to_thread.run_sync``,
bounded by a :class:`trio.CapacityLimiter`) inside one transaction: committed when it
returns, rolled back when it raises. Cancellation waits for the thread, so a unit of work
is never half done.

SQLite (the embedded default): WAL, foreign keys on, and every transaction ``BEGIN
IMMEDIATE`` so that concurrent writers queue on the busy timeout instead of failing on a
lock upgrade.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy
import trio
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["Database", "alembic_config", "make_engine"]

T = TypeVar("T")
MIGRATIONS = Path(__file__).parent / "migrations"
#: Seconds a SQLite writer waits for the lock before failing.
SQLITE_BUSY_TIMEOUT = 30.0


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets its pragmas and immediate transactions, and the
    folder of its file is created."""
    parsed = sqlalchemy.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return sqlalchemy.create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sqlalchemy.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT})

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # transactions are ours (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: sqlalchemy.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def alembic_config(connection: sqlalchemy.Connection) -> AlembicConfig:
    """Alembic's configuration for our migrations, working on ``connection``."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


class Database:
    """The engine, a session factory and the thread limiter; close with :meth:`dispose`."""

    def __init__(self, url: str, threads: int = 8) -> None:
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._limiter = trio.CapacityLimiter(max(1, threads))

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    async def run(self, work: Callable[[Session], T]) -> T:
        """``work(session)`` in a worker thread, in one transaction."""
        return await trio.to_thread.run_sync(self._unit, work, limiter=self._limiter)

    def _unit(self, work: Callable[[Session], T]) -> T:
        with self._sessions.begin() as session:
            return work(session)

    def migrate(self) -> None:
        """Apply every migration not applied yet (blocking; call from a thread or at
        start)."""
        with self.engine.begin() as connection:
            command.upgrade(alembic_config(connection), "head")

    async def ping(self) -> float:
        """Round trip of ``SELECT 1`` in seconds.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the database did not answer.
        """
        start = time.perf_counter()
        await self.run(lambda session: session.execute(sqlalchemy.text("SELECT 1")))
        return time.perf_counter() - start

    def dispose(self) -> None:
        self.engine.dispose()
