"""One connection to the tunnel listener (:mod:`visiona_tunnel.listener`): request heads
with h11 until one is a tunnel upgrade or the connection ends, the bounds of
:mod:`visiona_tunnel.limits`, and the tunnel's end (:func:`close_and_drain`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
import socket
import ssl
from collections.abc import Callable

import attrs
import h11
import trio
import wsproto.utilities
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request as WsRequest

from .admission import (
    VERIFIER_UNAVAILABLE,
    Admit,
    Answer,
    Headers,
    ListenerRequest,
    OnRefusal,
    Refusal,
    RequestScope,
    Route,
)
from .limits import AttemptLimiter, Occupancy, Place
from .relay import TunnelRegistry
from .wsconn import RECEIVE_SIZE, WebSocketRequest, WebSocketStream

__all__ = ["MAX_HEAD_SIZE", "ListenerConnection", "close_and_drain"]

logger = logging.getLogger("visiona_tunnel.listener")

#: The largest request head read.
MAX_HEAD_SIZE = 64 * 1024


async def close_and_drain(ws: WebSocketStream, sock: trio.socket.SocketType) -> None:
    """End an accepted tunnel's connection so the agent gets our close code.

    Sends our close frame (unless one was sent, e.g. 4001 on replacement), then half-closes
    ``sock`` -- the connection's socket, which ``ws.aclose()`` only half-closes (its
    transport is a :class:`_KeptOpen`) -- and reads (and drops) what the agent still sends
    until it hangs up.
    Closing a socket with unread data would reset the connection, and an agent still
    writing (a ping, a window update) would see 1006 instead of our code. Closes ``sock``;
    bound it with a timeout (:data:`CLOSE_DRAIN_TIMEOUT`).
    """
    try:
        await ws.aclose()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            while await sock.recv(RECEIVE_SIZE):
                pass
    finally:
        sock.close()


class _KeptOpen(trio.abc.HalfCloseableStream):
    """A connection's TCP stream as the layers above it see it (TLS, h11, the WebSocket):
    closing it sends our FIN but keeps the descriptor, which the listener closes itself
    once the connection is over -- after reading what a tunnel's agent still sends (see
    :func:`close_and_drain`). One descriptor per tunnel, not a ``dup()`` beside it."""

    def __init__(self, tcp: trio.SocketStream) -> None:
        self.tcp = tcp
        #: For :class:`~visiona_tunnel.wsconn.WebSocketStream`'s vectored writes.
        self.socket = tcp.socket

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.tcp.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.tcp.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.tcp.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.tcp.receive_some(max_bytes)

    async def aclose(self) -> None:
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_WR)
        await trio.lowlevel.checkpoint()


@attrs.define
class ListenerConnection:
    """Serves one accepted connection: requests until one ends it, or a tunnel."""

    registry: TunnelRegistry
    admit: Admit
    path: str
    routes: dict[str, Route]
    render: Callable[[Refusal], Answer]
    request_scope: RequestScope
    ssl_context: ssl.SSLContext | None
    max_message_size: int
    handshake_timeout: float
    admit_timeout: float
    keep_alive_timeout: float
    tcp_user_timeout: float | None
    drain_timeout: float
    handshakes: Occupancy
    max_tunnels: int
    attempts: AttemptLimiter | None
    on_refusal: OnRefusal | None
    #: Set once the listener shuts down: no more keep-alive.
    stopping: bool = False
    #: The cancel scopes of connections waiting for a request (head).
    idle: set[trio.CancelScope] = attrs.field(factory=set)

    async def __call__(self, tcp: trio.SocketStream) -> None:
        remote, host = _prepare(tcp, self.tcp_user_timeout)
        place = self.handshakes.take(host)  # until it ends, or is a tunnel
        if place is None:
            await self._turn_away(tcp)
            return
        try:
            await self._serve(tcp, remote, place)
        finally:
            place.give_back()
            tcp.socket.close()  # the one descriptor (see _KeptOpen); closing again is a no-op

    async def _turn_away(self, tcp: trio.SocketStream) -> None:
        """Over a handshake cap: 503 at once (plain TCP; a TLS one is just closed), unread."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            if self.ssl_context is None:
                answer = self.render(Refusal(503, "BUSY", "too many connections; retry later"))
                fields = [
                    *answer.headers,
                    (b"content-length", str(len(answer.body)).encode()),
                    (b"retry-after", b"5"),
                    (b"connection", b"close"),
                ]
                head = b"HTTP/1.1 503 Service Unavailable\r\n" + b"".join(
                    name + b": " + value + b"\r\n" for name, value in fields
                )
                with trio.move_on_after(1):
                    await tcp.send_all(head + b"\r\n" + answer.body)
        await trio.aclose_forcefully(tcp)

    async def _serve(self, tcp: trio.SocketStream, remote: str | None, place: Place) -> None:
        stream: trio.abc.Stream = _KeptOpen(tcp)
        if self.ssl_context is not None:
            stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)
        keep_open = False  # True once a tunnel owns the connection
        try:
            first = True
            while not self.stopping:
                head = await self._next_request(stream, conn, remote, first=first)
                if head is None:
                    return
                first = False
                request = ListenerRequest(
                    head.method.decode("latin-1"),
                    head.target.decode("latin-1"),
                    tuple(head.headers),
                    remote,
                )
                with self.request_scope(request) as extra:
                    if request.path == self.path and _is_websocket_upgrade(head):
                        keep_open = True
                        await self._tunnel(tcp, stream, conn, head, request, extra, place)
                        return
                    if not await self._answer(stream, conn, request, extra):
                        return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
            OSError,
        ) as exc:
            logger.debug("connection ended", extra={"remote": remote, "error": repr(exc)})
        except Exception:
            logger.exception("connection failed", extra={"remote": remote})
        finally:
            if not keep_open:
                await trio.aclose_forcefully(stream)

    # -- reading -------------------------------------------------------------------------

    async def _next_request(
        self, stream: trio.abc.Stream, conn: h11.Connection, remote: str | None, *, first: bool
    ) -> h11.Request | None:
        """The next request head (with its body read if it came along), or None when the
        connection should end (closed, too slow, or a bad request, answered with 400)."""
        timeout = self.handshake_timeout if first else self.keep_alive_timeout
        scope = trio.CancelScope(deadline=trio.current_time() + timeout)
        self.idle.add(scope)
        try:
            with scope:
                request = await _read_head(stream, conn)
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                status = exc.error_status_hint
                code = "BAD_REQUEST" if status == 400 else "HTTP_ERROR"
                unreadable = ListenerRequest("", "", (), remote)
                with trio.move_on_after(1), self.request_scope(unreadable) as extra:
                    answer = self.render(Refusal(status, code, str(exc)))
                    await _send(stream, conn, _with_headers(answer, extra), close=True)
            return None
        finally:
            self.idle.discard(scope)
        if scope.cancelled_caught:
            return None
        return request

    # -- plain requests ------------------------------------------------------------------

    async def _answer(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        request: ListenerRequest,
        extra: Headers,
    ) -> bool:
        """Answer a request that is not a tunnel; whether the connection may stay."""
        path = request.path
        head = request.method == "HEAD"
        close = self.stopping
        route = self.routes.get(path)
        if request.method in ("GET", "HEAD") and route is not None:
            answer = await route(request)
        elif request.method in ("GET", "HEAD") and path == self.path:
            refusal = Refusal(426, "UPGRADE_REQUIRED", "connect with a WebSocket upgrade")
            upgrade = ((b"upgrade", b"websocket"), (b"connection", b"Upgrade"))
            answer = _with_headers(self.render(refusal), upgrade)
        elif route is not None or path == self.path:
            refusal = Refusal(405, "METHOD_NOT_ALLOWED", "the method is not allowed here")
            answer = _with_headers(self.render(refusal), ((b"allow", b"GET, HEAD"),))
        else:
            answer = self.render(Refusal(404, "NOT_FOUND", "no such path"))
        await _send(stream, conn, _with_headers(answer, extra), head=head, close=close)
        return not close

    # -- tunnels -------------------------------------------------------------------------

    async def _tunnel(
        self,
        tcp: trio.SocketStream,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        head: h11.Request,
        request: ListenerRequest,
        extra: Headers,
        place: Place,
    ) -> None:
        """Admit, upgrade, and run the tunnel until it ends; closes the connection."""
        dialed_at = trio.current_time()
        try:
            with trio.fail_after(self.handshake_timeout + self.admit_timeout):
                if _peer_gone(tcp):  # waited in a queue until its agent gave up
                    await trio.aclose_forcefully(stream)
                    return
                upgrade = await self._upgrade(stream, conn, head, request, extra, place.address)
                if upgrade is None:
                    await trio.aclose_forcefully(stream)
                    return
                key, ws_request = upgrade
                if _peer_gone(tcp):  # gave up while its token was checked: not a tunnel
                    logger.info("agent left during its handshake", extra={"key": key})
                    await trio.aclose_forcefully(stream)
                    return
                ws = await ws_request.accept(headers=extra, max_message_size=self.max_message_size)
            # A tunnel now: its place among the handshakes is free (max_tunnels bounds it).
            place.give_back()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        try:
            await self.registry.serve(key, ws, remote_address=request.remote, dialed_at=dialed_at)
        finally:
            with trio.move_on_after(self.drain_timeout) as drain:
                await close_and_drain(ws, tcp.socket)
            if drain.cancelled_caught:
                logger.warning(
                    "agent did not answer our close", extra={"key": key, "remote": request.remote}
                )

    async def _upgrade(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        head: h11.Request,
        request: ListenerRequest,
        extra: Headers,
        address: str,
    ) -> tuple[str, WebSocketRequest] | None:
        """The key and the upgrade to accept, or None after the refusal; refused attempts
        count against ``address`` (the client's host)."""
        ws = WSConnection(ConnectionType.SERVER)
        try:
            ws.initiate_upgrade_connection(list(head.headers), head.target)
            trailing, _ = conn.trailing_data
            if trailing:
                ws.receive_data(bytes(trailing))  # handed to the connection on accept
            ws_request = next(event for event in ws.events() if isinstance(event, WsRequest))
        except (h11.ProtocolError, wsproto.utilities.ProtocolError, StopIteration) as exc:
            refusal = Refusal(400, "BAD_REQUEST", f"not a WebSocket upgrade: {exc}")
            await self._refuse(stream, conn, refusal, extra, request)
            return None
        if self.attempts is not None:
            wait = self.attempts.retry_after(address, trio.current_time())
            if wait > 0:  # guessing tokens: not even the verifier is asked
                refusal = Refusal(
                    429, "TOO_MANY_ATTEMPTS", "too many refused attempts; retry later"
                )
                await self._refuse(stream, conn, refusal, extra, request, retry_after=wait)
                return None
        admitted: str | Refusal = VERIFIER_UNAVAILABLE
        with trio.move_on_after(self.admit_timeout):
            admitted = await self.admit(request)
        if isinstance(admitted, str) and (
            self.registry.get(admitted) is None and len(self.registry) >= self.max_tunnels
        ):
            admitted = Refusal(503, "AT_CAPACITY", "no room for another tunnel; retry later")
        if isinstance(admitted, Refusal):
            if admitted.status == 401 and self.attempts is not None:
                self.attempts.refused(address, trio.current_time())
            await self._refuse(stream, conn, admitted, extra, request)
            return None
        return admitted, WebSocketRequest(stream, ws, ws_request)

    async def _refuse(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        refusal: Refusal,
        extra: Headers,
        request: ListenerRequest,
        *,
        retry_after: float = 5,
    ) -> None:
        """Answer a tunnel upgrade with the refusal; the connection ends."""
        if self.on_refusal is not None:
            self.on_refusal(request, refusal)
        headers: list[tuple[bytes, bytes]] = [(b"cache-control", b"no-store"), *extra]
        if refusal.status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="visiona-tunnel"'))
        elif refusal.status in (429, 503):
            headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
        answer = _with_headers(self.render(refusal), headers)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await _send(stream, conn, answer, close=True)


async def _read_head(stream: trio.abc.Stream, conn: h11.Connection) -> h11.Request | None:
    request: h11.Request | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if request is not None:
                return request  # a body still to come: answered without it
            conn.receive_data(bytes(await stream.receive_some(RECEIVE_SIZE)))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
            return request
        elif isinstance(event, h11.ConnectionClosed):
            return None
        # h11.Data: a request body, which no route reads


def _prepare(tcp: trio.SocketStream, tcp_user_timeout: float | None) -> tuple[str | None, str]:
    """Set ``TCP_USER_TIMEOUT`` where the platform has it; the peer's ``host:port`` (None
    if gone already) and host."""
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    with contextlib.suppress(OSError):
        if tcp_user_timeout is not None and option is not None:
            milliseconds = max(1, round(tcp_user_timeout * 1000))
            tcp.socket.setsockopt(socket.IPPROTO_TCP, option, milliseconds)
    try:
        host, port = tcp.socket.getpeername()[:2]
    except OSError:
        return None, ""
    return f"{host}:{port}", str(host)


def _peer_gone(tcp: trio.SocketStream) -> bool:
    """Whether the client has closed its side (an agent that gave up on a slow handshake):
    a poll that never waits. Bytes it sent after its request do not count."""
    poller = select.poll()
    poller.register(tcp.socket.fileno(), select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in poller.poll(0))


def _is_websocket_upgrade(request: h11.Request) -> bool:
    """``GET`` with ``Connection: upgrade`` and ``Upgrade: websocket``."""
    if request.method != b"GET":
        return False
    connection = _tokens(request.headers, b"connection")
    return b"upgrade" in connection and _tokens(request.headers, b"upgrade") == [b"websocket"]


def _tokens(headers: Headers, name: bytes) -> list[bytes]:
    """The comma-separated values of header ``name`` (h11 gives names in lower case)."""
    return [
        token.strip().lower()
        for key, value in headers
        if key == name
        for token in value.split(b",")
        if token.strip()
    ]


def _with_headers(answer: Answer, headers: Headers) -> Answer:
    return attrs.evolve(answer, headers=(*answer.headers, *headers))


async def _send(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    answer: Answer,
    *,
    head: bool = False,
    close: bool = False,
) -> None:
    """A whole answer (for ``HEAD``, without its body)."""
    fields = [*answer.headers, (b"content-length", str(len(answer.body)).encode())]
    if close:
        fields.append((b"connection", b"close"))
    data = conn.send(h11.Response(status_code=answer.status, headers=fields)) or b""
    if not head:
        data += conn.send(h11.Data(data=answer.body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
