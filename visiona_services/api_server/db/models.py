"""The api-server's tables, as SQLAlchemy 2 declarative models.

Portable types only (SQLite and PostgreSQL run the same migrations). Times are
timezone-aware UTC in Python whatever the database keeps (:class:`UtcDateTime`). Secrets
never reach a table: sessions and pending logins are keyed by the SHA-256 of their id.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "AuditEvent",
    "Base",
    "Cluster",
    "ClusterMember",
    "Device",
    "DeviceToken",
    "LoginSession",
    "Model",
    "PairingToken",
    "PendingLogin",
    "User",
    "UtcDateTime",
]


class UtcDateTime(TypeDecorator[datetime]):
    """An aware UTC ``datetime`` in, the same out (SQLite keeps no zone: stored as UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware UTC time")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: Constraint names that are the same on every database (migrations refer to them).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UtcDateTime}


class User(Base):
    """A person, as one OpenID provider knows them: (issuer, subject) is who they are."""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("issuer", "subject"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    issuer: Mapped[str] = mapped_column(String(255))
    subject: Mapped[str] = mapped_column(String(255))
    email: Mapped[str | None] = mapped_column(String(320))
    name: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime]
    last_login_at: Mapped[datetime]


class LoginSession(Base):
    """A browser's server-side session; the cookie carries its id, this row its hash."""

    __tablename__ = "sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    #: The absolute end (``VISIONA_SESSION_MAX_AGE`` after login).
    expires_at: Mapped[datetime] = mapped_column(index=True)
    #: The provider's session (``sid`` of the ID token), for back-channel logout.
    oidc_sid: Mapped[str | None] = mapped_column(String(255), index=True)
    client_address: Mapped[str | None] = mapped_column(String(64))


class PendingLogin(Base):
    """A login between ``/api/auth/login`` and its callback; single use."""

    __tablename__ = "pending_logins"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(128))
    nonce: Mapped[str] = mapped_column(String(128))
    code_verifier: Mapped[str] = mapped_column(String(128))
    next_path: Mapped[str] = mapped_column(String(2048))
    expires_at: Mapped[datetime] = mapped_column(index=True)


class AuditEvent(Base):
    """Who did what to what, when, from where, and how it ended."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_user_id_id", "user_id", "id"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime]
    #: Not a foreign key: the trail outlives what it names.
    user_id: Mapped[str | None] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(255))
    outcome: Mapped[str] = mapped_column(String(16))
    request_id: Mapped[str | None] = mapped_column(String(128))
    client_address: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class PairingToken(Base):
    """A one-time token a user hands to an agent; the agent trades it for a device."""

    __tablename__ = "pairing_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    #: SHA-256 of the token: the token itself is shown once and never kept.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    #: The device it was traded for.
    device_id: Mapped[str | None] = mapped_column(
        ForeignKey("devices.id", ondelete="SET NULL"), index=True
    )


class Device(Base):
    """A paired edge device; its tunnel is keyed by :attr:`id` at the remote-proxy."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime]
    #: When its tunnel was last seen up (written on tunnel up and down events).
    last_seen_at: Mapped[datetime | None]


class DeviceToken(Base):
    """The credential an agent dials the relay with; kept as its SHA-256."""

    __tablename__ = "device_tokens"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime]


class Cluster(Base):
    """A user's named group of devices."""

    __tablename__ = "clusters"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime]


class ClusterMember(Base):
    __tablename__ = "cluster_members"

    cluster_id: Mapped[str] = mapped_column(
        ForeignKey("clusters.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class Model(Base):
    """An AI model file a user uploads for their devices: pending until its upload is
    finalized, then ready. The bytes are in the Store under :attr:`object_key`."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    filename: Mapped[str] = mapped_column(String(255))
    #: The size declared at init; the upload must match it exactly.
    size: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(255))
    #: The sha256 the user declared at init (checked at finalize), if any.
    declared_sha256: Mapped[str | None] = mapped_column(String(64))
    #: The sha256 of the uploaded bytes (set at finalize).
    sha256: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    object_key: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime]
    #: A pending upload not finalized by then is swept away with its object.
    upload_expires_at: Mapped[datetime] = mapped_column(index=True)
    finalized_at: Mapped[datetime | None]
