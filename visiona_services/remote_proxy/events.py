"""``GET /internal/events``: the tunnels coming and going, as they happen, for the
api-server's view of which devices are online (docs/remote-proxy.md, "The events stream").

A long-lived response, ``application/x-ndjson``: one JSON object per line, each line its
own ``http.response.body`` message as soon as it is known (a raw ASGI route: no buffering,
and Quart's response timeout does not apply)::

    {"type": "snapshot", "at": "...Z", "sessions": [session, ...]}
    {"type": "tunnel.up", "device_id": "d", "at": "...Z", "session": session}
    {"type": "tunnel.down", "device_id": "d", "at": "...Z", "reason": "..." | null}
    {"type": "heartbeat", "at": "...Z"}
    {"type": "shutdown", "at": "...Z"}          last line: the proxy is shutting down
    {"type": "overflow", "at": "...Z"}          last line: the subscriber fell behind

Each subscriber observes the registry itself (:class:`Subscription`): it subscribes and
takes the snapshot in one synchronous step, so no change falls between them; changes wait
in a bounded queue (``ProxyState.events_buffer`` lines), and a subscriber whose queue is
full is dropped (the observer never waits: the tunnel's task calls it). Per device the
lines always alternate up, down, up ...: when a newer tunnel replaces a device's tunnel,
the subscriber gets ``tunnel.down`` (reason ``"replaced"``) and then ``tunnel.up``, at
once, and nothing when the older tunnel's end comes later. Applied in order, the lines
leave the device online.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType

import trio

from visiona_tunnel.relay import Tunnel, TunnelDown, TunnelEvent, TunnelRegistry, TunnelUp

from ..common.http import Receive, Scope, Send, json_bytes, send_error
from ..common.inflight import InFlight
from .sessions import iso_utc, session_json
from .state import ProxyState

__all__ = ["CONTENT_TYPE", "REPLACED", "Subscription", "stream_events"]

logger = logging.getLogger("visiona_services.remote_proxy.events")

CONTENT_TYPE = "application/x-ndjson"
#: The ``reason`` of a ``tunnel.down`` sent because a newer tunnel took the device's place.
REPLACED = "replaced"
#: The longest ``reason`` (a longer one is cut).
REASON_LIMIT = 200
#: How long the last line (``shutdown``, ``overflow``) may take to go out, where the server
#: lets a write be cancelled (hypercorn's HTTP/1.1 writes cannot be).
FINAL_LINE_TIMEOUT = 1.0

_HEADERS = [(b"content-type", CONTENT_TYPE.encode()), (b"cache-control", b"no-store")]


def _line(payload: Mapping[str, object]) -> bytes:
    return json_bytes(payload) + b"\n"


def _down_line(device_id: str, at: str, reason: str | None) -> bytes:
    return _line({"type": "tunnel.down", "device_id": device_id, "at": at, "reason": reason})


def _reason(event: TunnelDown) -> str | None:
    """Why the tunnel ended, short: the yamux session's close reason (``the peer closed the
    connection``, ``the peer did not answer a keepalive ping`` ...), or None."""
    if event.replaced:
        return REPLACED
    if event.reason is None:
        return None
    return (str(event.reason) or type(event.reason).__name__)[:REASON_LIMIT]


def _by_device(session: dict[str, object]) -> str:
    return str(session["device_id"])


class Subscription:
    """One subscriber's observer of the registry and its bounded queue of lines.

    ``with Subscription(...) as subscription:`` subscribes and takes the snapshot
    (:attr:`snapshot`, a line) in one synchronous step; from then on every change is a line
    in :attr:`lines`. When the queue is full the subscription ends at once (its observer
    leaves, :attr:`overflowed` is set): the subscriber must resync from a new snapshot.
    ``counter`` counts the subscriptions running (``visiona_events_subscribers``).
    """

    def __init__(
        self, tunnels: TunnelRegistry, counter: InFlight, capacity: int, peer: str = ""
    ) -> None:
        self._tunnels = tunnels
        self._counter = counter
        self._peer = peer
        self._queue, self.lines = trio.open_memory_channel[bytes](capacity)
        #: Set when the queue was full and the subscription ended.
        self.overflowed = trio.Event()
        self.snapshot = b""
        #: Per device, the tunnel this subscriber was last told is up (snapshot or
        #: ``tunnel.up``), until its ``tunnel.down``.
        self._shown: dict[str, Tunnel] = {}
        self._subscribed = contextlib.ExitStack()

    def __enter__(self) -> Subscription:
        # No checkpoint from here to the snapshot: no change can fall between them.
        self._subscribed.enter_context(self._counter)
        self._tunnels.add_observer(self._observe)
        self._subscribed.callback(self._tunnels.remove_observer, self._observe)
        live = list(self._tunnels)
        self._shown = {tunnel.key: tunnel for tunnel in live}
        sessions = sorted((session_json(tunnel.stats()) for tunnel in live), key=_by_device)
        self.snapshot = _line({"type": "snapshot", "at": iso_utc(), "sessions": sessions})
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unsubscribe()
        self._queue.close()
        self.lines.close()

    def unsubscribe(self) -> None:
        """Stop observing the registry (again: nothing happens)."""
        self._subscribed.close()

    def _observe(self, event: TunnelEvent) -> None:
        # Called by the tunnel's task: must neither wait nor raise.
        try:
            for line in self._lines_for(event):
                self._queue.send_nowait(line)
        except trio.ClosedResourceError:  # the subscription is over
            self.unsubscribe()
        except trio.WouldBlock:
            self.unsubscribe()
            self.overflowed.set()
            logger.warning(
                "an events subscriber fell behind: disconnected",
                extra={"peer": self._peer, "buffer": self._queue.statistics().max_buffer_size},
            )

    def _lines_for(self, event: TunnelEvent) -> list[bytes]:
        key, tunnel, at = event.key, event.tunnel, iso_utc()
        if isinstance(event, TunnelUp):
            lines = []
            if key in self._shown:  # replaced: the older tunnel's own end comes later
                lines.append(_down_line(key, at, REPLACED))
            self._shown[key] = tunnel
            session = session_json(tunnel.stats())
            up = {"type": "tunnel.up", "device_id": key, "at": at, "session": session}
            return [*lines, _line(up)]
        if self._shown.get(key) is not tunnel:
            # Replaced (its down went out with the newer tunnel's up), or it had left the
            # registry before the snapshot: this subscriber never saw it up.
            return []
        del self._shown[key]
        return [_down_line(key, at, _reason(event))]


async def _send_line(send: Send, line: bytes, *, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": line, "more_body": more})


async def _disconnected(receive: Receive) -> None:
    """Return once the subscriber has gone (``http.disconnect``)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _write_lines(subscription: Subscription, send: Send, heartbeat: float) -> None:
    """Send each queued line as it comes, and a heartbeat every ``heartbeat`` seconds."""
    beat_at = trio.current_time() + heartbeat
    while True:
        line = None
        with trio.move_on_at(beat_at):
            line = await subscription.lines.receive()
        if line is None:
            line = _line({"type": "heartbeat", "at": iso_utc()})
            beat_at = trio.current_time() + heartbeat
        await _send_line(send, line)


async def _stream(
    state: ProxyState, subscription: Subscription, receive: Receive, send: Send
) -> str | None:
    """Write lines until the stream ends; the type of the last line to send
    (``shutdown``, ``overflow``), or None when the subscriber has left."""
    endings: list[str | None] = []
    async with trio.open_nursery() as nursery:

        async def end_when(wait: Callable[[], Awaitable[object]], last: str | None) -> None:
            await wait()
            endings.append(last)
            nursery.cancel_scope.cancel()

        nursery.start_soon(end_when, functools.partial(_disconnected, receive), None)
        nursery.start_soon(end_when, state.draining.wait, "shutdown")
        nursery.start_soon(end_when, subscription.overflowed.wait, "overflow")
        nursery.start_soon(_write_lines, subscription, send, state.config.events_heartbeat)
    return endings[0] if endings else None


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return "{}:{}".format(*client[:2]) if client else ""


async def stream_events(state: ProxyState, scope: Scope, receive: Receive, send: Send) -> None:
    """The raw ASGI handler of ``GET /internal/events`` (behind the middleware, which has
    checked the bearer secret)."""
    if scope["method"] != "GET":
        await send_error(send, 405, "METHOD_NOT_ALLOWED", "GET only", [(b"allow", b"GET")])
        return
    if state.draining.is_set():
        await send_error(send, 503, "SHUTTING_DOWN", "the remote-proxy is shutting down")
        return
    subscription = Subscription(
        state.tunnels, state.event_subscribers, state.events_buffer, _peer(scope)
    )
    with subscription:
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
        await _send_line(send, subscription.snapshot)
        last = await _stream(state, subscription, receive, send)
    if last is not None:
        with trio.move_on_after(FINAL_LINE_TIMEOUT):
            await _send_line(send, _line({"type": last, "at": iso_utc()}), more=False)
