"""Alembic's environment: online only, on the connection the caller hands over
(:func:`visiona_services.api_server.db.alembic_config`)."""

from __future__ import annotations

import sqlalchemy
from alembic import context

from visiona_services.api_server.db.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,  # SQLite alters tables by copying them
    compare_type=True,
    transaction_per_migration=True,
)
if connection.dialect.name == "postgresql":
    # Two instances starting at once: one migrates, the other waits for it.
    connection.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(3721)"))
with context.begin_transaction():
    context.run_migrations()
