"""The per-user realtime feed behind ``WS /api/events``: a broker with one bounded memory
channel per subscriber. Publishing never waits: a subscriber too slow to keep up is
dropped (its channel closed; the browser reconnects and re-reads the state)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

__all__ = ["Broker"]

logger = logging.getLogger("visiona_services.api_server.realtime")

#: Messages a subscriber may fall behind by before it is dropped.
SUBSCRIBER_BUFFER = 256


class Broker:
    def __init__(self, buffer: int = SUBSCRIBER_BUFFER) -> None:
        self._buffer = buffer
        self._subscribers: dict[str, set[trio.MemorySendChannel[dict[str, Any]]]] = {}

    @asynccontextmanager
    async def subscribe(
        self, user_id: str
    ) -> AsyncIterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        """``user_id``'s messages for the block; the channel ends if the subscriber is
        dropped."""
        send, receive = trio.open_memory_channel[dict[str, Any]](self._buffer)
        self._subscribers.setdefault(user_id, set()).add(send)
        try:
            async with receive:
                yield receive
        finally:
            subscribers = self._subscribers.get(user_id, set())
            subscribers.discard(send)
            if not subscribers:
                self._subscribers.pop(user_id, None)
            send.close()

    def publish(self, user_id: str, message: dict[str, Any]) -> None:
        for send in list(self._subscribers.get(user_id, ())):
            try:
                send.send_nowait(message)
            except trio.WouldBlock:
                logger.warning("a slow event subscriber was dropped", extra={"user": user_id})
                self._subscribers[user_id].discard(send)
                send.close()
            except trio.BrokenResourceError:
                self._subscribers[user_id].discard(send)

    def subscriber_count(self) -> int:
        return sum(len(subscribers) for subscribers in self._subscribers.values())
