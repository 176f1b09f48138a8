"""``WS /internal/forward-ws/{device_id}/{path}``: a WebSocket through a device's tunnel,
relayed message by message, as a raw ASGI handler.

The relay opens a tunnel stream (``Tunnel.open_raw``), performs a client handshake on it
with trio-websocket (the agent pipes the stream to its local server), and only then
accepts the caller, with the subprotocol the local server chose. Messages go both ways as
they are (text stays text, bytes stay bytes, up to :data:`MAX_MESSAGE_SIZE`), each side's
backpressure holding up the other.

==================================================  =========================================
what happened                                        the caller gets
==================================================  =========================================
draining / no tunnel / handshake not answered in     503 ``SHUTTING_DOWN`` / 502
``forward_timeout`` / tunnel broke in the handshake  ``TUNNEL_DISCONNECTED`` / 504
or its answer passed ``MAX_HANDSHAKE_RESPONSE``       ``TUNNEL_TIMEOUT`` / 502 ``TUNNEL_ERROR``,
                                                     as HTTP responses (envelope)
the local server refused the upgrade (or the agent   that HTTP status, headers (minus
could not reach it: 502)                             hop-by-hop ones) and body
the local server closed with code C                  close C and its reason (1005, "no
                                                     code": 1000)
the tunnel broke after the handshake                 close 1011
the service started draining                         close 1001 (the agent side too)
the caller left during the handshake                 (nothing; the stream is reset, counted
                                                     as 499)
==================================================  =========================================

The caller closing (any code: hypercorn 0.18 reports every caller-side close as 1006, so
the code is lost) closes the local server's side with 1000.
"""

from __future__ import annotations

import logging

import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from visiona_tunnel import yamux
from visiona_tunnel.forward import abort_stream
from visiona_tunnel.relay import Tunnel

from ..common.http import (
    ApiError,
    Receive,
    Scope,
    Send,
    current_request_id,
    reject_websocket,
    reject_websocket_error,
)
from .http_forward import CLIENT_CLOSED, forwarded_headers, response_headers
from .state import ProxyState

__all__ = ["MAX_MESSAGE_SIZE", "forward_websocket"]

logger = logging.getLogger("visiona_services.remote_proxy.forward_ws")

#: Largest message either way (hypercorn's default for the caller's side, 16 MiB).
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
#: How long a close handshake with the agent's side may take before the stream is closed.
CLOSE_TIMEOUT = 5.0
#: trio-websocket reads 4 KiB at a time by default, which is slow for big messages.
_RECEIVE_BUFFER_SIZE = 64 * 1024
#: The most of the local server's handshake answer read (a refusal's body included):
#: trio-websocket keeps a refusal's whole body in memory.
MAX_HANDSHAKE_RESPONSE = 1024 * 1024
#: Host header of the handshake to the local server (as for HTTP forwards).
_LOCAL_HOST = "localhost"
#: The caller's handshake headers that trio-websocket writes itself.
_HANDSHAKE_HEADERS = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
        b"content-length",
    }
)
#: Close codes that may be sent in a close frame (RFC 6455 7.4).
_SENDABLE = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}


def caller_close(reason: CloseReason | None) -> tuple[int, str]:
    """The close to send the caller when the agent's side ended with ``reason``."""
    if reason is None or reason.code in (1006, 1015):
        return 1011, "tunnel connection lost"
    if reason.code == 1005:  # the local server sent no code
        return 1000, ""
    if reason.code in _SENDABLE or 3000 <= reason.code <= 4999:
        return reason.code, reason.reason or ""
    return 1011, ""


class _WatchedStream(trio.abc.Stream):
    """A tunnel stream that tells when it ended (EOF, or broken) while being read, and
    ends it when the handshake answer grows past :data:`MAX_HANDSHAKE_RESPONSE`.

    trio-websocket 0.12 waits for the handshake forever when its stream ends first.
    """

    def __init__(self, inner: yamux.Stream) -> None:
        self.inner = inner
        self.ended = trio.Event()
        #: Bytes the handshake answer may still take; None once the handshake is done.
        self.handshake_allowance: int | None = MAX_HANDSHAKE_RESPONSE
        self.handshake_too_large = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.ended.set()
            raise
        if not data:
            self.ended.set()
        elif self.handshake_allowance is not None:
            self.handshake_allowance -= len(data)
            if self.handshake_allowance < 0:
                self.handshake_too_large = True
                self.ended.set()
                raise trio.BrokenResourceError("the handshake answer is too large")
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


async def forward_websocket(
    state: ProxyState, scope: Scope, receive: Receive, send: Send, device_id: str, target: bytes
) -> None:
    """The raw ASGI handler for a ``websocket`` scope; see the module docstring."""
    await receive()  # websocket.connect
    with state.inflight:  # a drain waits for the relay's own 1001 close
        status = await _forward(state, scope, receive, send, device_id, target)
    state.metrics.forwards.inc(status=str(status))


async def _forward(
    state: ProxyState, scope: Scope, receive: Receive, send: Send, device_id: str, target: bytes
) -> int:
    """Returns the status to count: 101 once accepted, else the HTTP status answered."""
    if state.draining.is_set():
        return await _refuse(scope, send, ApiError(503, "SHUTTING_DOWN", "shutting down"))
    tunnel = state.tunnels.get(device_id)
    if tunnel is None:
        failure = ApiError(502, "TUNNEL_DISCONNECTED", f"{device_id!r} is not connected")
        return await _refuse(scope, send, failure)
    try:
        stream = _WatchedStream(await tunnel.open_raw())
    except (yamux.SessionClosed, yamux.StreamsExhausted):
        failure = ApiError(502, "TUNNEL_DISCONNECTED", "the device's tunnel is closing")
        return await _refuse(scope, send, failure)
    relay = _Relay(state, tunnel, scope, receive, send, stream)
    clean = False
    try:
        status = await relay.run(target)
        clean = True
        return status
    finally:
        if clean:  # FIN: a close frame still queued reaches the agent (RST would drop it)
            await trio.aclose_forcefully(stream.inner)
        else:
            await abort_stream(stream.inner)


async def _refuse(scope: Scope, send: Send, failure: ApiError) -> int:
    await reject_websocket_error(scope, send, failure.status, failure.code, failure.message)
    return failure.status


class _Relay:
    """The agent's side (a trio-websocket client on the tunnel stream) and the caller's
    (ASGI messages), joined. ``closing`` is set by whichever task starts the end (agent
    closed, caller left, draining); that task alone closes the other side and ends the
    relay."""

    def __init__(
        self,
        state: ProxyState,
        tunnel: Tunnel,
        scope: Scope,
        receive: Receive,
        send: Send,
        stream: _WatchedStream,
    ) -> None:
        self.state = state
        self.tunnel = tunnel
        self.scope = scope
        self.receive = receive
        self.send = send
        self.stream = stream
        self.closing = False

    async def run(self, target: bytes) -> int:
        status = 101
        try:
            # trio-websocket raises a rejection from its reader task, so out of this
            # nursery; the nursery also keeps the reader for the life of the relay.
            async with trio.open_nursery() as nursery:
                ws = await self._handshake(nursery, target)
                await self.send(
                    {"type": "websocket.accept", "subprotocol": ws.subprotocol, "headers": []}
                )
                await self._pump(ws)
                nursery.cancel_scope.cancel()
        except* ConnectionRejected as group:
            status = await self._pass_rejection(group.exceptions[0])
        except* ApiError as group:
            failure = group.exceptions[0]
            assert isinstance(failure, ApiError)
            if status == 101:  # not answered by a rejection in the same group
                status = await _refuse(self.scope, self.send, failure)
        return status

    async def _handshake(self, nursery: trio.Nursery, target: bytes) -> WebSocketConnection:
        """The client handshake to the local server, bounded by ``forward_timeout``."""
        headers = forwarded_headers(
            self.scope["headers"], current_request_id.get(), drop=_HANDSHAKE_HEADERS
        )
        ws: WebSocketConnection | None = None
        caller_left = False
        with trio.move_on_after(self.state.config.forward_timeout) as timer:
            async with trio.open_nursery() as watch:

                async def stop_when_ended() -> None:
                    await self.stream.ended.wait()
                    watch.cancel_scope.cancel()

                async def stop_when_the_caller_leaves() -> None:
                    # Before the accept, the only message left is websocket.disconnect
                    # (a cancelled receive loses nothing).
                    nonlocal caller_left
                    await self.receive()
                    caller_left = True
                    watch.cancel_scope.cancel()

                watch.start_soon(stop_when_ended)
                watch.start_soon(stop_when_the_caller_leaves)
                ws = await wrap_client_stream(
                    nursery,
                    self.stream,  # type: ignore[arg-type]  # any trio stream works
                    _LOCAL_HOST,
                    target.decode("latin-1"),
                    subprotocols=self.scope.get("subprotocols") or None,
                    extra_headers=headers,
                    max_message_size=MAX_MESSAGE_SIZE,
                    receive_buffer_size=_RECEIVE_BUFFER_SIZE,
                )
                watch.cancel_scope.cancel()
        if caller_left:  # even if the handshake just finished: the disconnect is taken
            # Nobody to answer (hypercorn drops what is sent now); the run's nursery
            # ends a WebSocket that did open, and the stream is reset.
            raise ApiError(CLIENT_CLOSED, "CLIENT_CLOSED", "the caller left")
        if ws is not None:
            self.stream.handshake_allowance = None
            return ws
        if timer.cancelled_caught:
            raise ApiError(504, "TUNNEL_TIMEOUT", "the device did not answer in time")
        if self.stream.handshake_too_large:
            message = f"the device's handshake answer is over {MAX_HANDSHAKE_RESPONSE} bytes"
            raise ApiError(502, "TUNNEL_ERROR", message)
        raise ApiError(502, "TUNNEL_ERROR", "the tunnel failed during the handshake")

    async def _pass_rejection(self, exc: BaseException) -> int:
        assert isinstance(exc, ConnectionRejected)
        headers = [
            (name, value)
            for name, value in response_headers(exc.headers)
            if name.lower() != b"content-length"
        ]
        await reject_websocket(self.scope, self.send, exc.status_code, exc.body or b"", headers)
        return int(exc.status_code)

    async def _pump(self, ws: WebSocketConnection) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._agent_to_caller, ws, nursery.cancel_scope)
            nursery.start_soon(self._caller_to_agent, ws, nursery.cancel_scope)
            nursery.start_soon(self._close_when_draining, ws, nursery.cancel_scope)

    async def _agent_to_caller(self, ws: WebSocketConnection, done: trio.CancelScope) -> None:
        try:
            while True:
                message = await ws.get_message()
                if isinstance(message, str):
                    await self.send({"type": "websocket.send", "text": message})
                else:
                    await self.send({"type": "websocket.send", "bytes": message})
        except ConnectionClosed as exc:
            if self.closing:
                return  # we closed it (for the caller, or the shutdown)
            self.closing = True
            code, reason = caller_close(exc.reason)
            await self.send({"type": "websocket.close", "code": code, "reason": reason})
            done.cancel()

    async def _caller_to_agent(self, ws: WebSocketConnection, done: trio.CancelScope) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "websocket.disconnect":
                if self.closing:
                    return  # the side that started closing finishes the relay
                self.closing = True
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await ws.aclose(1000, "caller closed")
                done.cancel()
                return
            if message["type"] != "websocket.receive":
                continue
            text = message.get("text")
            data: str | bytes = text if text is not None else bytes(message.get("bytes") or b"")
            try:
                await ws.send_message(data)
            except ConnectionClosed:
                # The agent's side is closing; _agent_to_caller passes its close on.
                await trio.sleep_forever()

    async def _close_when_draining(self, ws: WebSocketConnection, done: trio.CancelScope) -> None:
        await self.state.draining.wait()
        if self.closing:
            return
        self.closing = True
        reason = "relay shutting down"
        await self.send({"type": "websocket.close", "code": 1001, "reason": reason})
        with trio.move_on_after(CLOSE_TIMEOUT):
            await ws.aclose(1001, reason)
        done.cancel()
