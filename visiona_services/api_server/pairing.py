"""Pairing: one-time tokens a user creates, that an agent trades for a device and its
device token; and the device token check the remote-proxy asks for.

Tokens are shown once and kept as their SHA-256. The exchange is one transaction: the
token is marked used by a conditional update (of two concurrent exchanges exactly one
changes the row), then the device and its token are created; if any step fails, the
transaction rolls back and the pairing token stays usable (seed Audit M3).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from datetime import datetime, timedelta
from typing import Any

import attrs
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from . import audit
from .audit import iso
from .db import Device, DeviceToken, PairingToken
from .errors import DomainError
from .tenancy import owned

__all__ = [
    "DEVICE_TOKEN_PREFIX",
    "PAIRING_TOKEN_PATTERN",
    "PairedDevice",
    "PairingTokenInvalid",
    "create_pairing_token",
    "exchange_pairing_token",
    "list_pairing_tokens",
    "revoke_pairing_token",
    "verify_device_token",
]

PAIRING_TOKEN_PREFIX = "vAc_"
PAIRING_TOKEN_PATTERN = re.compile(r"vAc_[0-9a-f]{32}")
DEVICE_TOKEN_PREFIX = "vAd_"
#: Longer device tokens than this are not looked up.
MAX_TOKEN_LENGTH = 256


class PairingTokenInvalid(DomainError):
    """Used, expired, revoked or unknown: one answer for all four."""

    status = 401
    code = "PAIRING_TOKEN_INVALID"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _status(token: PairingToken, now: datetime) -> str:
    if token.revoked_at is not None:
        return "revoked"
    if token.used_at is not None:
        return "used"
    if token.expires_at <= now:
        return "expired"
    return "pending"


def _token_json(token: PairingToken, now: datetime) -> dict[str, Any]:
    return {
        "id": token.id,
        "name": token.name,
        "created_at": iso(token.created_at),
        "expires_at": iso(token.expires_at),
        "status": _status(token, now),
        "device_id": token.device_id,
    }


def create_pairing_token(
    db: Session, *, user_id: str, name: str, ttl: timedelta, now: datetime, actor: audit.Actor
) -> dict[str, Any]:
    """A new pending token; the answer is the only place the token itself appears."""
    token = PAIRING_TOKEN_PREFIX + secrets.token_hex(16)
    row = PairingToken(
        id=uuid.uuid4().hex,
        user_id=user_id,
        token_hash=token_hash(token),
        name=name,
        created_at=now,
        expires_at=now + ttl,
    )
    db.add(row)
    audit.record(db, actor, "pairing_token:create", target=f"pairing_token:{row.id}")
    return {"id": row.id, "token": token, "name": name, "expires_at": iso(row.expires_at)}


def list_pairing_tokens(db: Session, *, user_id: str, now: datetime) -> list[dict[str, Any]]:
    rows = db.scalars(
        select(PairingToken)
        .where(PairingToken.user_id == user_id)
        .order_by(PairingToken.created_at.desc(), PairingToken.id)
    )
    return [_token_json(row, now) for row in rows]


def revoke_pairing_token(
    db: Session, *, user_id: str, token_id: str, now: datetime, actor: audit.Actor
) -> dict[str, Any]:
    """Revoke a pending token (revoking one that is no longer pending changes nothing)."""
    row = owned(db, PairingToken, token_id, user_id, "PAIRING_TOKEN_NOT_FOUND")
    if _status(row, now) == "pending":
        row.revoked_at = now
        audit.record(db, actor, "pairing_token:revoke", target=f"pairing_token:{row.id}")
    return _token_json(row, now)


@attrs.frozen
class PairedDevice:
    device_id: str
    device_token: str
    user_id: str
    name: str


def exchange_pairing_token(
    db: Session, *, token: str, now: datetime, actor: audit.Actor
) -> PairedDevice:
    """Trade a pending pairing token for a new device and its device token.

    Raises:
        PairingTokenInvalid: the token is not pending (or not a token at all).
    """
    if not PAIRING_TOKEN_PATTERN.fullmatch(token):
        raise PairingTokenInvalid("the pairing token is not valid")
    hashed = token_hash(token)
    taken = db.execute(
        update(PairingToken)
        .where(
            PairingToken.token_hash == hashed,
            PairingToken.used_at.is_(None),
            PairingToken.revoked_at.is_(None),
            PairingToken.expires_at > now,
        )
        .values(used_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    if taken != 1:
        raise PairingTokenInvalid("the pairing token is not valid")
    pairing = db.scalars(select(PairingToken).where(PairingToken.token_hash == hashed)).one()
    device = Device(id=uuid.uuid4().hex, user_id=pairing.user_id, name=pairing.name, created_at=now)
    device_token = DEVICE_TOKEN_PREFIX + secrets.token_hex(32)
    db.add(device)
    db.flush()  # the device exists before the rows that point at it
    db.add(DeviceToken(token_hash=token_hash(device_token), device_id=device.id, created_at=now))
    pairing.device_id = device.id
    audit.record(
        db,
        actor,
        "device:pair",
        user_id=pairing.user_id,
        target=f"device:{device.id}",
        detail={"pairing_token": pairing.id},
    )
    return PairedDevice(device.id, device_token, pairing.user_id, device.name)


def verify_device_token(db: Session, *, token: str) -> str | None:
    """The device id a device token belongs to, or None (unknown, or the device was
    unpaired: its tokens went with it)."""
    if not token.startswith(DEVICE_TOKEN_PREFIX) or len(token) > MAX_TOKEN_LENGTH:
        return None
    row = db.get(DeviceToken, token_hash(token))
    return row.device_id if row is not None else None
