"""The PostgreSQL fixtures: the session's server answers, and a module gets a database of
its own."""

from __future__ import annotations

import sqlalchemy
from sqlalchemy.pool import NullPool
from support.postgres import create_database


def _query(url: str, sql: str) -> object:
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return connection.execute(sqlalchemy.text(sql)).scalar_one()
    finally:
        engine.dispose()


def test_select_one(postgres_url: str) -> None:
    assert sqlalchemy.make_url(postgres_url).drivername == "postgresql+psycopg"
    assert _query(postgres_url, "select 1") == 1


def test_module_database(module_database_url: str, postgres_url: str) -> None:
    name = sqlalchemy.make_url(module_database_url).database
    assert name is not None
    assert name.startswith("t_test_postgres_fixture_")
    assert name != sqlalchemy.make_url(postgres_url).database
    assert _query(module_database_url, "select current_database()") == name


def test_create_database_starts_empty(postgres_url: str) -> None:
    url = create_database(postgres_url, "visiona_extra")
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text("create table t (x int)"))
            connection.execute(sqlalchemy.text("insert into t values (42)"))
        assert _query(url, "select x from t") == 42
        # Again, while a connection is open: dropped with it, and made anew without the table.
        with engine.connect() as held:
            assert create_database(postgres_url, "visiona_extra") == url
            held.invalidate()
        assert _query(url, "select count(*) from pg_tables where tablename = 't'") == 0
    finally:
        engine.dispose()
