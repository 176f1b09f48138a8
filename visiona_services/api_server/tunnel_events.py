"""Following the remote-proxy's tunnel events (``GET /internal/events``, NDJSON): who is
online, each device's ``last_seen_at``, and the owners' realtime feeds.

:func:`follow_tunnel_events` runs for the life of the services (their nursery owns it). It
subscribes, rebuilds :class:`~.presence.Presence` from the stream's first line (a
snapshot), then applies ``tunnel.up`` / ``tunnel.down`` as they come. When the stream
ends or goes quiet for :data:`SILENCE_LIMIT` (the proxy sends heartbeats), every device is
taken to be offline until the next snapshot, and it resubscribes with exponential backoff
(1 s doubling to 30 s, reset once a stream is up).
"""

from __future__ import annotations

import functools
import json
import logging
from datetime import UTC, datetime
from typing import Any

import httpx
import trio
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from visiona_tunnel.backoff import backoff

from .audit import iso
from .db import Device
from .devices import touch_last_seen
from .presence import LiveSession
from .services import ApiServices

__all__ = ["SILENCE_LIMIT", "follow_tunnel_events"]

logger = logging.getLogger("visiona_services.api_server.tunnel_events")

#: Seconds without a line (heartbeats included) after which the stream is taken as dead.
SILENCE_LIMIT = 20.0
#: The reason of a ``tunnel.down`` whose device has a newer tunnel already.
REPLACED = "replaced"
#: A line longer than this ends the stream (it is not the remote-proxy talking).
MAX_LINE = 1 << 20


async def follow_tunnel_events(
    services: ApiServices, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Subscribe, apply, resubscribe; forever (until cancelled)."""
    task_status.started()
    failures = 0
    while True:
        try:
            if await _follow_once(services):
                failures = 0
        except (httpx.HTTPError, ValueError, KeyError, TypeError, SQLAlchemyError) as exc:
            # Never fatal: this task runs beside the server for the life of the process.
            logger.warning("the remote-proxy's event stream failed", extra={"error": str(exc)})
        try:
            await _all_offline(services)
        except SQLAlchemyError as exc:
            logger.warning("could not record devices going offline", extra={"error": str(exc)})
        failures += 1
        await trio.sleep(backoff(failures))


async def _follow_once(services: ApiServices) -> bool:
    """One subscription, until its stream ends; True if it got its snapshot."""
    config = services.config
    url = f"{config.proxy_internal_url}/internal/events"
    headers = {"authorization": f"Bearer {config.internal_secret}"}
    timeout = httpx.Timeout(10.0, read=SILENCE_LIMIT)
    async with services.http.stream("GET", url, headers=headers, timeout=timeout) as response:
        if response.status_code != 200:
            raise ValueError(f"the remote-proxy answered {response.status_code}")
        synced = False
        async for line in response.aiter_lines():
            if len(line) > MAX_LINE:
                raise ValueError("an event line is too long")
            if not line.strip():
                continue
            event = json.loads(line)
            if not isinstance(event, dict):
                raise ValueError("an event is not a JSON object")
            if event.get("type") == "snapshot":
                synced = True
                logger.info("following the remote-proxy's tunnels")
            await apply_event(services, event)
        return synced


async def apply_event(services: ApiServices, event: dict[str, Any]) -> None:
    """One line of the stream: presence, ``last_seen_at`` and the feeds follow it."""
    kind = event.get("type")
    at = _time(event.get("at"))
    if kind == "snapshot":
        sessions = [LiveSession.from_json(session) for session in event["sessions"]]
        online, offline = services.presence.replace(sessions)
        await _changed(services, online, offline, at, seen=[s.device_id for s in sessions])
    elif kind == "tunnel.up":
        session = LiveSession.from_json({**event.get("session", {}), **event})
        online = {session.device_id} if services.presence.up(session) else set()
        await _changed(services, online, set(), at, seen=[session.device_id])
    elif kind == "tunnel.down" and event.get("reason") == REPLACED:
        pass  # the newer tunnel's tunnel.up follows at once: no offline blip
    elif kind == "tunnel.down":
        device_id = str(event["device_id"])
        offline = {device_id} if services.presence.down(device_id) else set()
        await _changed(services, set(), offline, at, seen=[device_id])
    elif kind == "shutdown":
        await _all_offline(services)
    # heartbeats, and kinds a newer remote-proxy may add, change nothing


async def _all_offline(services: ApiServices) -> None:
    gone = services.presence.clear()
    if gone:
        await _changed(services, set(), gone, datetime.now(UTC), seen=[])


async def _changed(
    services: ApiServices,
    online: set[str],
    offline: set[str],
    at: datetime,
    *,
    seen: list[str],
) -> None:
    """Write ``last_seen_at`` and tell each device's owner what changed."""
    changed = sorted(online | offline)
    if not changed and not seen:
        return
    owners = await services.db.run(
        functools.partial(_owners_and_touch, device_ids=changed, seen=seen, at=at)
    )
    for device_id in changed:
        user_id = owners.get(device_id)
        if user_id is None:  # a device the database does not know (a static token)
            continue
        kind = "device.online" if device_id in online else "device.offline"
        services.broker.publish(user_id, {"type": kind, "device_id": device_id, "at": iso(at)})


def _owners_and_touch(
    db: Session, *, device_ids: list[str], seen: list[str], at: datetime
) -> dict[str, str]:
    if seen:
        touch_last_seen(db, device_ids=seen, at=at)
    if not device_ids:
        return {}
    rows = db.execute(select(Device.id, Device.user_id).where(Device.id.in_(device_ids)))
    return {device_id: user_id for device_id, user_id in rows}


def _time(value: object) -> datetime:
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return datetime.now(UTC)
