"""A subscriber of the remote-proxy's ``GET /internal/events`` for tests: h11 over a trio
TCP stream, one JSON object per line, each awaited as it arrives (bounded)."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from .internalapi import AUTH
from .tunnelhttp import HttpExchange

#: How long one wait for a line may take.
LINE_TIMEOUT = 10.0
EVENTS = "/internal/events"

Event = dict[str, Any]


class EventStream:
    """The lines of one ``GET /internal/events`` response, read as they come."""

    def __init__(self, exchange: HttpExchange, headers: dict[str, str]) -> None:
        self.exchange = exchange
        #: The response's headers (lower-case names).
        self.headers = headers
        #: Every line taken so far, in order.
        self.events: list[Event] = []
        self.ended = False
        self._buffer = bytearray()

    async def next(self, timeout: float = LINE_TIMEOUT) -> Event:
        """The next line, whatever its type."""
        with trio.fail_after(timeout):
            while b"\n" not in self._buffer:
                piece = await self.exchange.receive_body_piece()
                if not piece:
                    self.ended = True
                    raise AssertionError(f"the stream ended; unfinished line: {self._buffer!r}")
                self._buffer += piece
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        event = json.loads(line)
        assert isinstance(event, dict), line
        self.events.append(event)
        return event

    async def next_change(self, timeout: float = LINE_TIMEOUT) -> Event:
        """The next line that is not a heartbeat."""
        with trio.fail_after(timeout):
            while (event := await self.next())["type"] == "heartbeat":
                pass
        return event

    async def rest(self, timeout: float = LINE_TIMEOUT) -> list[Event]:
        """Every line up to the end of the response (which must end, cleanly)."""
        lines: list[Event] = []
        with trio.fail_after(timeout):
            while not self.ended:
                piece = await self.exchange.receive_body_piece()
                if not piece:
                    self.ended = True
                self._buffer += piece
                while b"\n" in self._buffer:
                    line, _, rest = bytes(self._buffer).partition(b"\n")
                    self._buffer = bytearray(rest)
                    lines.append(json.loads(line))
        assert not self._buffer, f"unfinished line at the end: {self._buffer!r}"
        self.events += lines
        return lines


async def _connect(port: int, receive_buffer: int | None) -> trio.SocketStream:
    if receive_buffer is None:
        return await trio.open_tcp_stream("127.0.0.1", port)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Before the connect, so that the window offered is small from the start.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


@asynccontextmanager
async def subscribe(
    port: int,
    *,
    headers: Sequence[tuple[str, str]] = (AUTH,),
    receive_buffer: int | None = None,
) -> AsyncIterator[EventStream]:
    """``GET /internal/events`` (with the internal secret unless ``headers`` say otherwise),
    the response head read: a 200 of ``application/x-ndjson``. The connection closes when
    the block ends. ``receive_buffer``: our socket's ``SO_RCVBUF``, for a subscriber that
    stops reading and should fill the buffers soon."""
    stream = await _connect(port, receive_buffer)
    async with stream:
        exchange = HttpExchange(stream, port)
        with trio.fail_after(LINE_TIMEOUT):
            await exchange.send_request("GET", EVENTS, headers=list(headers))
            response = await exchange.receive_response()
        fields = {name.decode().lower(): value.decode() for name, value in response.headers}
        assert response.status_code == 200, (response.status_code, fields)
        assert fields["content-type"] == "application/x-ndjson"
        yield EventStream(exchange, fields)
