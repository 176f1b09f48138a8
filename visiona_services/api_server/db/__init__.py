"""The api-server's database: models, engine and migrations."""

from .engine import Database, alembic_config, make_engine
from .models import AuditEvent, Base, LoginSession, PendingLogin, User

__all__ = [
    "AuditEvent",
    "Base",
    "Database",
    "LoginSession",
    "PendingLogin",
    "User",
    "alembic_config",
    "make_engine",
]
