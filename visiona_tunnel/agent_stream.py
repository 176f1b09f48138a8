"""The agent's end of a tunnel stream: one HTTP/1.1 request in, one response out.

The relay opens a stream per request and writes the request on it; the agent reads it
with an h11 server ``Connection``, replays it to the local server over a new TCP
connection with an h11 client ``Connection``, and writes the local server's response
back, streamed in both directions (64 KiB at a time, backpressure through the
streams). h11 does all the parsing and framing; method, target and headers (order and
case) go through unchanged.

How a stream ends:

============================================  ============================================
what happened                                  what the agent does
============================================  ============================================
response complete                              FIN; read the rest of the request (if any)
                                               until its end, so the relay can read the
                                               response first; then close
local server unreachable, or it failed         answer 502 ``local server unreachable``
before the response head                       (text/plain), then as above
malformed request                              answer 400 (h11's ``error_status_hint``)
local server failed after the response head    reset the stream (close it, if it cannot be
                                               reset): never a truncated "complete" answer
relay reset the stream, or (by default) sent   stop the local request, close
EOF after the request before the response
was complete: it gave up
nothing moved either way for ``idle_timeout``  reset the stream, close the local connection
``Upgrade`` request (WebSocket ...)            write the request raw to the local server,
                                               then :func:`pipe` bytes both ways
============================================  ============================================

The relay's end is :func:`visiona_tunnel.httpstream.http_exchange`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

import h11
import trio

__all__ = [
    "CHUNK_SIZE",
    "MAX_HEAD_SIZE",
    "UNREACHABLE_BODY",
    "abort_stream",
    "header_tokens",
    "pipe",
    "serve_tunnel_stream",
]

logger = logging.getLogger(__name__)

#: Largest read from either side; at most this much of a body is in flight per direction.
CHUNK_SIZE = 64 * 1024
#: Largest request or response head (h11's ``max_incomplete_event_size``).
MAX_HEAD_SIZE = 64 * 1024
#: The body of the 502 answered when the local server cannot be reached.
UNREACHABLE_BODY = b"local server unreachable\n"


@runtime_checkable
class _Resettable(Protocol):
    async def reset(self) -> None: ...


async def abort_stream(stream: trio.abc.AsyncResource) -> None:
    """End ``stream`` as a failure: ``reset()`` it where it can be (a yamux stream), then
    close it. Never blocks, and is not a cancellation point (so it is safe in an
    ``except`` block that re-raises); fine on a stream already closed or broken."""
    with trio.CancelScope(shield=True):
        if isinstance(stream, _Resettable):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.reset()
        await trio.aclose_forcefully(stream)


async def pipe(
    a: trio.abc.Stream,
    b: trio.abc.Stream,
    *,
    chunk_size: int = CHUNK_SIZE,
    on_progress: Callable[[], object] | None = None,
) -> None:
    """Copy bytes both ways between ``a`` and ``b`` until both directions end; close both.

    EOF is passed on with ``send_eof`` where the destination is a
    ``trio.abc.HalfCloseableStream``; where it is not, the first EOF ends both
    directions. If either stream breaks (``trio.BrokenResourceError``), or the pipe is
    cancelled, both are aborted (:func:`abort_stream`) instead of closed; broken
    streams do not raise. ``on_progress`` is called after each chunk is written.
    """
    failed = True

    async def copy(src: trio.abc.Stream, dst: trio.abc.Stream, scope: trio.CancelScope) -> None:
        nonlocal failed
        try:
            while data := await src.receive_some(chunk_size):
                await dst.send_all(data)
                if on_progress is not None:
                    on_progress()
            if isinstance(dst, trio.abc.HalfCloseableStream):
                await dst.send_eof()
                return
        except trio.BrokenResourceError as exc:
            logger.debug("pipe: %r", exc)
            scope.cancel()
            return
        failed = False  # an EOF that cannot be passed on ends both directions cleanly
        scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(copy, a, b, nursery.cancel_scope)
            nursery.start_soon(copy, b, a, nursery.cancel_scope)
        if not nursery.cancel_scope.cancel_called:
            failed = False  # both directions reached EOF
    finally:
        for stream in (a, b):
            if failed:
                await abort_stream(stream)
            else:
                await trio.aclose_forcefully(stream)


def header_tokens(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> set[bytes]:
    """The comma-separated tokens of every ``name`` header, lower-cased (``name`` too)."""
    return {
        token.strip().lower()
        for key, value in headers
        if key.lower() == name
        for token in value.split(b",")
        if token.strip()
    }


def _is_upgrade(request: h11.Request) -> bool:
    """``Upgrade: websocket``, or any ``Upgrade`` with ``Connection: upgrade``."""
    upgrade = header_tokens(request.headers, b"upgrade")
    connection = header_tokens(request.headers, b"connection")
    return b"websocket" in upgrade or (bool(upgrade) and b"upgrade" in connection)


class _Failed(Exception):
    """This exchange cannot go on; the tunnel stream must be reset."""


class _AgentExchange:
    """One request on one tunnel stream; see the module docstring."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        local_addr: tuple[str, int],
        touch: Callable[[], None],
        *,
        connect_timeout: float,
        abort_on_relay_eof: bool,
    ) -> None:
        self.stream = stream
        self.local_addr = local_addr
        self.touch = touch
        self.connect_timeout = connect_timeout
        self.abort_on_relay_eof = abort_on_relay_eof
        self.relay = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)
        self.failure: BaseException | None = None
        self.response_started = False

    # -- the relay's side -------------------------------------------------------------------

    async def relay_event(self) -> h11.Event:
        """The next event from the relay; ``h11.RemoteProtocolError`` for a bad request."""
        while True:
            event = self.relay.next_event()
            if isinstance(event, h11.Event):
                return event
            if event is h11.PAUSED:
                raise _Failed("the relay sent more after its request")
            data = await self.stream.receive_some(CHUNK_SIZE)
            self.touch()
            self.relay.receive_data(bytes(data))

    async def to_relay(self, event: h11.Event) -> None:
        data = self.relay.send(event)
        if data:
            await self.stream.send_all(data)
            self.touch()

    async def answer(self, status: int, body: bytes) -> None:
        """A whole short text/plain response."""
        headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
        ]
        await self.to_relay(h11.Response(status_code=status, headers=headers))
        await self.to_relay(h11.Data(data=body))
        await self.to_relay(h11.EndOfMessage())

    async def finish(self) -> None:
        """After a complete response: FIN, then read what is left of the request (the
        relay reads the response before it stops writing; closing first could reset
        the stream under it and lose the answer)."""
        if isinstance(self.stream, trio.abc.HalfCloseableStream):
            await self.stream.send_eof()
        try:
            while self.relay.their_state is h11.SEND_BODY:
                if isinstance(await self.relay_event(), h11.ConnectionClosed):
                    break
        except (_Failed, h11.RemoteProtocolError, trio.BrokenResourceError):
            pass

    # -- the whole exchange ------------------------------------------------------------------

    async def run(self) -> bool:
        """True if the stream may be closed normally, False if it must be reset."""
        try:
            event = await self.relay_event()
        except h11.RemoteProtocolError as exc:
            logger.debug("bad request from the relay: %s", exc)
            await self.answer(exc.error_status_hint, f"bad request: {exc}\n".encode())
            return True
        if not isinstance(event, h11.Request):
            return True  # the relay closed the stream without a request
        local = await self.connect()
        if local is None:
            await self.answer(502, UNREACHABLE_BODY)
            await self.finish()
            return True
        headers = event.headers.raw_items()
        names = {name for name, _ in event.headers}
        if b"transfer-encoding" in names:  # RFC 9112 6.3: h11 read it chunked; say only that
            headers = [
                (name, value) for name, value in headers if name.lower() != b"content-length"
            ]
        if b"host" not in names:  # an HTTP/1.0 request; h11 sends 1.1, which needs Host
            headers.append((b"Host", "{}:{}".format(*self.local_addr).encode()))
        request = h11.Request(method=event.method, target=event.target, headers=headers)
        async with local:
            if _is_upgrade(event):
                await self.upgrade(request, local)
                return True
            return await self.forward(request, local)

    async def connect(self) -> trio.SocketStream | None:
        host, port = self.local_addr
        with trio.move_on_after(self.connect_timeout):
            try:
                return await trio.open_tcp_stream(host, port)
            except OSError as exc:
                logger.info("local server %s:%d unreachable: %s", host, port, exc)
                return None
        logger.info("local server %s:%d: no connection in %ss", host, port, self.connect_timeout)
        return None

    async def upgrade(self, request: h11.Request, local: trio.SocketStream) -> None:
        head = h11.Connection(h11.CLIENT).send(request)
        assert head is not None
        # Whatever the relay sent after the head (a body, the first frames) goes first.
        early, _ = self.relay.trailing_data
        try:
            await local.send_all(head + early)
        except trio.BrokenResourceError:
            await abort_stream(local)
            await abort_stream(self.stream)
            return
        await pipe(self.stream, local, on_progress=self.touch)

    async def forward(self, request: h11.Request, local: trio.SocketStream) -> bool:
        local_conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_SIZE)
        async with trio.open_nursery() as nursery:

            def fail(exc: BaseException) -> None:
                if self.failure is None:
                    self.failure = exc
                nursery.cancel_scope.cancel()

            nursery.start_soon(self.upload, request, local, local_conn, fail)
            try:
                await self.download(local, local_conn)
            except (_Failed, trio.BrokenResourceError, h11.ProtocolError) as exc:
                fail(exc)
            nursery.cancel_scope.cancel()  # the response is complete: stop uploading
        if self.failure is not None:
            logger.debug("stream ends in failure: %r", self.failure)
            return False
        await self.finish()
        return True

    async def upload(
        self,
        request: h11.Request,
        local: trio.SocketStream,
        local_conn: h11.Connection,
        fail: Callable[[BaseException], None],
    ) -> None:
        """Request head and body, relay -> local; then watch the relay for giving up."""
        local_ok = True

        async def to_local(event: h11.Event) -> None:
            nonlocal local_ok
            data = local_conn.send(event)
            if local_ok and data:
                try:
                    await local.send_all(data)
                except trio.BrokenResourceError:
                    # The local server stopped reading (it may still answer): keep
                    # reading the request so the relay is not blocked, drop the rest.
                    local_ok = False
                self.touch()

        try:
            await to_local(request)
            while True:
                event = await self.relay_event()
                if isinstance(event, h11.Data):
                    await to_local(event)
                elif isinstance(event, h11.EndOfMessage):
                    await to_local(event)
                    break
                else:
                    raise _Failed(f"unexpected event in the request body: {event!r}")
            if not self.abort_on_relay_eof:
                return
            # The relay sends nothing after the request: its EOF means it gave up.
            while await self.stream.receive_some(CHUNK_SIZE):
                pass
            raise _Failed("the relay ended the stream before the response was complete")
        except (_Failed, h11.ProtocolError, trio.BrokenResourceError) as exc:
            fail(exc)

    async def download(self, local: trio.SocketStream, local_conn: h11.Connection) -> None:
        """The local server's response, local -> relay."""
        while True:
            try:
                event = local_conn.next_event()
                if event is h11.NEED_DATA:
                    data = await local.receive_some(CHUNK_SIZE)
                    self.touch()
                    local_conn.receive_data(bytes(data))
                    continue
            except (h11.RemoteProtocolError, trio.BrokenResourceError) as exc:
                if self.response_started:
                    raise _Failed(f"the local server broke the response: {exc!r}") from exc
                logger.info("local server failed before answering: %r", exc)
                await self.answer(502, UNREACHABLE_BODY)
                return
            if isinstance(event, h11.InformationalResponse):
                if event.status_code != 101:
                    await self.to_relay(event)
            elif isinstance(event, h11.Response):
                self.response_started = True
                await self.to_relay(
                    h11.Response(
                        status_code=event.status_code,
                        reason=event.reason,
                        headers=event.headers.raw_items(),
                    )
                )
            elif isinstance(event, h11.Data):
                await self.to_relay(event)
            elif isinstance(event, h11.EndOfMessage):
                await self.to_relay(h11.EndOfMessage())  # trailers are dropped
                return
            else:  # ConnectionClosed before a response, PAUSED
                if self.response_started:
                    raise _Failed(f"unexpected event from the local server: {event!r}")
                await self.answer(502, UNREACHABLE_BODY)
                return


async def serve_tunnel_stream(
    stream: trio.abc.Stream,
    local_addr: tuple[str, int],
    *,
    idle_timeout: float = 300.0,
    connect_timeout: float = 10.0,
    abort_on_relay_eof: bool = True,
) -> None:
    """Serve the one HTTP/1.1 request that arrives on ``stream`` from ``local_addr``.

    Returns when the exchange is over, with ``stream`` closed (or reset); never raises
    for what the relay or the local server did (that is logged at DEBUG/INFO), so an
    accept loop can ``start_soon`` it per stream. Cancellation resets the stream.

    Args:
        idle_timeout: give up (reset) when no byte moved either way for this long;
            ``math.inf`` for never. Applies to upgraded connections too.
        connect_timeout: for the TCP connection to ``local_addr`` (then 502).
        abort_on_relay_eof: take EOF from the relay after the request as "the relay
            gave up" (stop the local request) -- hashicorp/yamux relays (and gorelay)
            can only signal that with FIN. False: answer anyway, for a relay that
            half-closes after its request.
    """
    with trio.CancelScope() as idle:

        def touch() -> None:
            idle.deadline = trio.current_time() + idle_timeout

        touch()
        exchange = _AgentExchange(
            stream,
            local_addr,
            touch,
            connect_timeout=connect_timeout,
            abort_on_relay_eof=abort_on_relay_eof,
        )
        clean = False
        try:
            clean = await exchange.run()
        except (_Failed, trio.BrokenResourceError, h11.ProtocolError) as exc:
            logger.debug("tunnel stream failed: %r", exc)
        finally:
            if clean:
                await trio.aclose_forcefully(stream)
            else:
                await abort_stream(stream)
    if idle.cancelled_caught:
        logger.info("tunnel stream idle for %ss: reset", idle_timeout)
