"""The migrations build the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import inspect

from visiona_services.api_server.db import Database, alembic_config


def test_migrations_build_exactly_the_models(database_url: str) -> None:
    database = Database(database_url)
    try:
        database.migrate()
        with database.engine.begin() as connection:
            command.check(alembic_config(connection))  # raises on any difference
        tables = set(inspect(database.engine).get_table_names())
    finally:
        database.dispose()
    assert {"users", "sessions", "pending_logins", "audit_events"} <= tables


def test_migrating_twice_changes_nothing(database_url: str) -> None:
    database = Database(database_url)
    try:
        database.migrate()
        database.migrate()
    finally:
        database.dispose()


def test_every_migration_can_be_undone(database_url: str) -> None:
    database = Database(database_url)
    try:
        database.migrate()
        with database.engine.begin() as connection:
            command.downgrade(alembic_config(connection), "base")
        assert set(inspect(database.engine).get_table_names()) <= {"alembic_version"}
        database.migrate()
    finally:
        database.dispose()


@pytest.mark.parametrize("pragma, expected", [("foreign_keys", 1), ("journal_mode", "wal")])
def test_sqlite_runs_with_wal_and_foreign_keys(
    tmp_path: object, pragma: str, expected: object
) -> None:
    database = Database(f"sqlite:///{tmp_path}/x.db")
    try:
        with database.engine.connect() as connection:
            assert connection.exec_driver_sql(f"PRAGMA {pragma}").scalar() == expected
    finally:
        database.dispose()
