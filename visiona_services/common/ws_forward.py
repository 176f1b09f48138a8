"""A WebSocket from an ASGI caller relayed, message by message, to an upstream WebSocket
reached over any trio stream: the remote-proxy's into a device's tunnel and the
api-server's to the remote-proxy are both :func:`forward_asgi_websocket`, told by a
:class:`WebSocketUpstream` how to open the stream and where the handshake goes.

The relay opens the stream, performs a client handshake on it with trio-websocket, and
only then accepts the caller, with the subprotocol the upstream chose. Messages go both
ways as they are (text stays text, bytes stay bytes, up to :data:`MAX_MESSAGE_SIZE`), each
side's backpressure holding up the other. The handshake carries the caller's headers as an
HTTP forward does (:func:`.http_forward.forwarded_headers`), plus ``extra_headers``.

==================================================  =========================================
what happened                                        the caller gets
==================================================  =========================================
opening the stream failed / the handshake not        ``upstream.failure(exc)`` /
answered within ``timeout`` / the stream broke in    ``upstream.timeout_error`` /
the handshake or its answer passed                   ``upstream.broken_error``'s status and
``MAX_HANDSHAKE_RESPONSE``                           code, as HTTP responses (envelope)
the upstream refused the upgrade                     that HTTP status, headers (minus
                                                     hop-by-hop ones) and body
the upstream closed with code C                      close C and its reason (1005, "no
                                                     code": 1000)
the upstream's connection was lost after the         close 1011 (``upstream.lost_reason``)
handshake
``upstream.closing`` returned (a shutdown)           close 1001, the upstream's side too
the caller left during the handshake                 (nothing; the stream is reset, counted
                                                     as 499)
==================================================  =========================================

The caller closing (any code: hypercorn 0.18 reports every caller-side close as 1006, so
the code is lost) closes the upstream's side with 1000.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping

import attrs
import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from visiona_tunnel.agent_stream import abort_stream

from .http import (
    ApiError,
    Receive,
    Scope,
    Send,
    current_request_id,
    reject_websocket,
    reject_websocket_api_error,
)
from .http_forward import CLIENT_CLOSED, forwarded_headers, response_headers

__all__ = [
    "MAX_HANDSHAKE_RESPONSE",
    "MAX_MESSAGE_SIZE",
    "WebSocketUpstream",
    "caller_close",
    "forward_asgi_websocket",
]

logger = logging.getLogger("visiona_services.forward_ws")

#: Largest message either way (hypercorn's default for the caller's side, 16 MiB).
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
#: How long a close handshake with the upstream's side may take before the stream is closed.
CLOSE_TIMEOUT = 5.0
#: trio-websocket reads 4 KiB at a time by default, which is slow for big messages.
_RECEIVE_BUFFER_SIZE = 64 * 1024
#: The most of the upstream's handshake answer read (a refusal's body included):
#: trio-websocket keeps a refusal's whole body in memory.
MAX_HANDSHAKE_RESPONSE = 1024 * 1024
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


@attrs.frozen(kw_only=True)
class WebSocketUpstream:
    """Where one WebSocket relay goes, and how its failures are answered."""

    #: The byte stream the upstream's handshake and messages go over (the relay owns it).
    open: Callable[[], Awaitable[trio.abc.Stream]]
    #: ``Host`` and resource (``/path?query``, escaped) of the handshake.
    host: str
    target: str
    #: Seconds for opening the stream, and for the handshake's answer.
    timeout: float
    timeout_error: ApiError
    #: The answer to an exception of ``open``; None: not ours, it propagates.
    failure: Callable[[Exception], ApiError | None]
    #: The answer when the stream breaks during the handshake.
    broken_error: ApiError
    #: Added to the caller's handshake headers (which lose ``drop_request_headers``).
    extra_headers: Iterable[tuple[bytes, bytes]] = ()
    drop_request_headers: frozenset[bytes] = frozenset()
    #: Dropped from an upstream refusal's headers, beyond hop-by-hop ones.
    drop_response_headers: frozenset[bytes] = frozenset()
    #: The reason of the caller's close 1011 when the upstream's connection is lost.
    lost_reason: str = "connection lost"
    #: Returns when the service shuts down: the relay then closes with 1001 both ways.
    closing: Callable[[], Awaitable[object]] | None = None
    log_extra: Mapping[str, object] = attrs.field(factory=dict)
    logger: logging.Logger = logger


def caller_close(reason: CloseReason | None, lost_reason: str) -> tuple[int, str]:
    """The close to send the caller when the upstream's side ended with ``reason``."""
    if reason is None or reason.code in (1006, 1015):
        return 1011, lost_reason
    if reason.code == 1005:  # the upstream sent no code
        return 1000, ""
    if reason.code in _SENDABLE or 3000 <= reason.code <= 4999:
        return reason.code, reason.reason or ""
    return 1011, ""


class _WatchedStream(trio.abc.Stream):
    """The upstream stream, telling when it ended (EOF, or broken) while being read, and
    ending it when the handshake answer grows past :data:`MAX_HANDSHAKE_RESPONSE`.

    trio-websocket 0.12 waits for the handshake forever when its stream ends first.
    """

    def __init__(self, inner: trio.abc.Stream) -> None:
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


async def forward_asgi_websocket(
    scope: Scope, receive: Receive, send: Send, upstream: WebSocketUpstream
) -> int:
    """Relay the ``websocket`` scope (its ``websocket.connect`` already received) to
    ``upstream``; returns the status to count: 101 once accepted, else the HTTP status
    answered (:data:`~.http_forward.CLIENT_CLOSED` if the caller left first). Never raises
    for what the upstream or the caller did."""
    try:
        with trio.fail_after(upstream.timeout):
            inner = await upstream.open()
    except trio.TooSlowError:
        return await reject_websocket_api_error(scope, send, upstream.timeout_error)
    except Exception as exc:
        failure = upstream.failure(exc)
        if failure is None:
            raise
        upstream.logger.info("forward failed", extra={**upstream.log_extra, "error": repr(exc)})
        return await reject_websocket_api_error(scope, send, failure)
    stream = _WatchedStream(inner)
    clean = False
    try:
        status = await _Relay(upstream, scope, receive, send, stream).run()
        clean = True
        return status
    finally:
        if clean:  # FIN: a close frame still queued reaches the upstream (RST would drop it)
            await trio.aclose_forcefully(inner)
        else:
            await abort_stream(inner)


class _Relay:
    """The upstream's side (a trio-websocket client on the stream) and the caller's (ASGI
    messages), joined. ``closing`` is set by whichever task starts the end (upstream
    closed, caller left, shutdown); that task alone closes the other side and ends the
    relay."""

    def __init__(
        self,
        upstream: WebSocketUpstream,
        scope: Scope,
        receive: Receive,
        send: Send,
        stream: _WatchedStream,
    ) -> None:
        self.upstream = upstream
        self.scope = scope
        self.receive = receive
        self.send = send
        self.stream = stream
        self.closing = False

    async def run(self) -> int:
        status = 101
        try:
            # trio-websocket raises a rejection from its reader task, so out of this
            # nursery; the nursery also keeps the reader for the life of the relay.
            async with trio.open_nursery() as nursery:
                ws = await self._handshake(nursery)
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
                status = await reject_websocket_api_error(self.scope, self.send, failure)
        return status

    async def _handshake(self, nursery: trio.Nursery) -> WebSocketConnection:
        """The client handshake to the upstream, bounded by ``timeout``."""
        upstream = self.upstream
        drop = _HANDSHAKE_HEADERS | upstream.drop_request_headers
        headers = forwarded_headers(self.scope["headers"], current_request_id.get(), drop=drop)
        headers += upstream.extra_headers
        ws: WebSocketConnection | None = None
        caller_left = False
        with trio.move_on_after(upstream.timeout) as timer:
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
                    upstream.host,
                    upstream.target,
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
            raise upstream.timeout_error
        broken = upstream.broken_error
        if self.stream.handshake_too_large:
            message = f"the handshake answer is over {MAX_HANDSHAKE_RESPONSE} bytes"
            raise ApiError(broken.status, broken.code, message)
        raise ApiError(broken.status, broken.code, broken.message)

    async def _pass_rejection(self, exc: BaseException) -> int:
        assert isinstance(exc, ConnectionRejected)
        drop = self.upstream.drop_response_headers | {b"content-length"}
        headers = response_headers(exc.headers, drop=drop)
        await reject_websocket(self.scope, self.send, exc.status_code, exc.body or b"", headers)
        return int(exc.status_code)

    async def _pump(self, ws: WebSocketConnection) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._upstream_to_caller, ws, nursery.cancel_scope)
            nursery.start_soon(self._caller_to_upstream, ws, nursery.cancel_scope)
            if self.upstream.closing is not None:
                nursery.start_soon(self._close_when_closing, ws, nursery.cancel_scope)

    async def _upstream_to_caller(self, ws: WebSocketConnection, done: trio.CancelScope) -> None:
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
            code, reason = caller_close(exc.reason, self.upstream.lost_reason)
            await self.send({"type": "websocket.close", "code": code, "reason": reason})
            done.cancel()

    async def _caller_to_upstream(self, ws: WebSocketConnection, done: trio.CancelScope) -> None:
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
                # The upstream's side is closing; _upstream_to_caller passes its close on.
                await trio.sleep_forever()

    async def _close_when_closing(self, ws: WebSocketConnection, done: trio.CancelScope) -> None:
        assert self.upstream.closing is not None
        await self.upstream.closing()
        if self.closing:
            return
        self.closing = True
        reason = "relay shutting down"
        await self.send({"type": "websocket.close", "code": 1001, "reason": reason})
        with trio.move_on_after(CLOSE_TIMEOUT):
            await ws.aclose(1001, reason)
        done.cancel()
