"""The audit trail: one row per state change, login, logout and failed login.

:func:`record` adds the row to the caller's database session, so it commits (or rolls
back) with the change it describes. Actions are ``<resource>:<verb>`` (``auth:login``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import attrs
from sqlalchemy import select
from sqlalchemy.orm import Session

from .db import AuditEvent

__all__ = ["Actor", "AuditPage", "list_events", "record"]

SUCCESS = "success"
FAILURE = "failure"


@attrs.frozen
class Actor:
    """Who acts (``None`` before login) and the request they act through."""

    user_id: str | None
    request_id: str | None
    client_address: str | None


def record(
    db: Session,
    actor: Actor,
    action: str,
    *,
    target: str | None = None,
    outcome: str = SUCCESS,
    detail: dict[str, Any] | None = None,
    user_id: str | None = None,
) -> None:
    """Add one event; ``user_id`` overrides the actor's (a login names who logged in)."""
    db.add(
        AuditEvent(
            at=datetime.now(UTC),
            user_id=user_id if user_id is not None else actor.user_id,
            action=action,
            target=target,
            outcome=outcome,
            request_id=actor.request_id,
            client_address=actor.client_address,
            detail=detail,
        )
    )


@attrs.frozen
class AuditPage:
    events: list[dict[str, Any]]
    #: Pass as ``before`` for the next (older) page; None at the end.
    next_before: int | None


def list_events(db: Session, user_id: str, *, limit: int, before: int | None) -> AuditPage:
    """``user_id``'s events, newest first, ``limit`` at most, older than id ``before``."""
    query = select(AuditEvent).where(AuditEvent.user_id == user_id)
    if before is not None:
        query = query.where(AuditEvent.id < before)
    rows = db.scalars(query.order_by(AuditEvent.id.desc()).limit(limit + 1)).all()
    events = [_event_json(row) for row in rows[:limit]]
    return AuditPage(events, rows[limit - 1].id if len(rows) > limit else None)


def _event_json(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "at": iso(event.at),
        "action": event.action,
        "target": event.target,
        "outcome": event.outcome,
        "request_id": event.request_id,
        "client_address": event.client_address,
        "detail": event.detail,
    }


def iso(moment: datetime) -> str:
    """ISO 8601 UTC with milliseconds and ``Z``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
