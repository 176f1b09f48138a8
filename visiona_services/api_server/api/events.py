"""``WS /api/events``: the caller's realtime feed. JSON text messages
``{"type": "device.online" | "device.offline" | "device.paired" | "device.unpaired" |
"device.renamed", "device_id", "at"}``, only about the caller's devices.

The handshake follows the rules of every route (a session, an allowed ``Origin``). The
feed closes with 1008 when the session ends (checked every
``ApiServices.feed_session_recheck`` seconds, 30), and with 1013 (try again later) when the
browser reads too slowly to keep up.
"""

from __future__ import annotations

import json

import quart
import trio
from quart_trio import QuartTrio

from ..policy import SESSION_COOKIE, principal, session_principal
from ..services import current_services

__all__ = ["register"]

POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013


def register(app: QuartTrio) -> None:
    @app.websocket("/api/events")
    async def events() -> None:
        services = current_services()
        user = principal()
        cookie = quart.websocket.cookies.get(SESSION_COOKIE)
        await quart.websocket.accept()
        async with services.broker.subscribe(user.user_id) as feed, trio.open_nursery() as n:

            async def read_until_closed() -> None:
                while True:  # the browser sends nothing we need; this notices it leave
                    await quart.websocket.receive()

            async def check_session() -> None:
                while True:
                    await trio.sleep(services.feed_session_recheck)
                    if await session_principal(services, cookie) is None:
                        await quart.websocket.close(POLICY_VIOLATION, "the session ended")
                        n.cancel_scope.cancel()

            n.start_soon(read_until_closed)
            n.start_soon(check_session)
            async for message in feed:
                await quart.websocket.send(json.dumps(message))
            # the broker dropped us: too slow
            await quart.websocket.close(TRY_AGAIN_LATER, "too slow: reconnect")
            n.cancel_scope.cancel()
