"""Devices: a user's paired edge devices (the database), with their live state (the
remote-proxy's tunnels, :class:`~.presence.Presence`) when shown."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from . import audit
from .audit import iso
from .db import Device
from .errors import Invalid, NotFound
from .presence import LiveSession, Presence
from .tenancy import owned

__all__ = [
    "DEVICE_NOT_FOUND",
    "device_json",
    "get_device",
    "last_seen",
    "list_devices",
    "rename_device",
    "resolve_device",
    "unpair_device",
]

DEVICE_NOT_FOUND = "DEVICE_NOT_FOUND"


def device_json(device: Device, presence: Presence) -> dict[str, Any]:
    live = presence.get(device.id)
    seen = last_seen(device, live)
    return {
        "id": device.id,
        "name": device.name,
        "created_at": iso(device.created_at),
        "online": live is not None,
        "connected_since": live.since if live else None,
        "last_seen_at": iso(seen) if seen else None,
        "remote_address": live.remote_address if live else None,
        "rtt_ms": live.rtt_ms if live else None,
    }


def last_seen(device: Device, live: LiveSession | None) -> datetime | None:
    """When the device was last seen: an online device at least when its tunnel came up
    (presence follows the tunnel events at once; the stored time is written just after,
    and an answer in between must not say "online, never seen")."""
    seen = device.last_seen_at
    if live is not None and live.since:
        try:
            since = datetime.fromisoformat(live.since)
        except ValueError:
            return seen
        if since.tzinfo is not None and (seen is None or since > seen):
            return since
    return seen


def list_devices(db: Session, *, user_id: str) -> list[Device]:
    return list(
        db.scalars(
            select(Device).where(Device.user_id == user_id).order_by(Device.created_at, Device.id)
        )
    )


def get_device(db: Session, *, user_id: str, device_id: str) -> Device:
    return owned(db, Device, device_id, user_id, DEVICE_NOT_FOUND)


def rename_device(
    db: Session, *, user_id: str, device_id: str, name: str, actor: audit.Actor
) -> Device:
    device = owned(db, Device, device_id, user_id, DEVICE_NOT_FOUND)
    if device.name != name:
        audit.record(
            db,
            actor,
            "device:rename",
            target=f"device:{device.id}",
            detail={"from": device.name, "to": name},
        )
        device.name = name
    return device


def unpair_device(db: Session, *, user_id: str, device_id: str, actor: audit.Actor) -> str:
    """Delete the device; its device tokens and cluster memberships go with it."""
    device = owned(db, Device, device_id, user_id, DEVICE_NOT_FOUND)
    db.execute(delete(Device).where(Device.id == device.id))
    audit.record(db, actor, "device:unpair", target=f"device:{device.id}")
    return device.id


def resolve_device(db: Session, *, user_id: str, named: str | None) -> str:
    """The device a forwarded request is for: the one ``named``, or the user's only one.

    Raises:
        NotFound: ``named`` is not one of the user's devices, or the user has none.
        Invalid: none named and the user has several (``DEVICE_REQUIRED``).
    """
    if named:
        return owned(db, Device, named, user_id, DEVICE_NOT_FOUND).id
    ids = list(db.scalars(select(Device.id).where(Device.user_id == user_id).limit(2)))
    if not ids:
        raise NotFound("you have no paired device", DEVICE_NOT_FOUND)
    if len(ids) > 1:
        raise Invalid(
            "several devices: name one (device_id query parameter or X-Device-ID header)",
            "DEVICE_REQUIRED",
        )
    return ids[0]


def touch_last_seen(db: Session, *, device_ids: list[str], at: datetime) -> None:
    """Tunnel events: the devices were seen at ``at`` (unknown ids, and devices unpaired
    meanwhile, are simply not updated)."""
    db.execute(
        update(Device)
        .where(
            Device.id.in_(device_ids),
            or_(Device.last_seen_at.is_(None), Device.last_seen_at < at),
        )
        .values(last_seen_at=at)
        .execution_options(synchronize_session=False)
    )
