"""The api-server's database: models, engine and migrations."""

from .engine import Database, alembic_config, make_engine
from .models import (
    AuditEvent,
    Base,
    Cluster,
    ClusterMember,
    Device,
    DeviceToken,
    LoginSession,
    Model,
    PairingToken,
    PendingLogin,
    User,
)

__all__ = [
    "AuditEvent",
    "Base",
    "Cluster",
    "ClusterMember",
    "Database",
    "Device",
    "DeviceToken",
    "LoginSession",
    "Model",
    "PairingToken",
    "PendingLogin",
    "User",
    "alembic_config",
    "make_engine",
]
